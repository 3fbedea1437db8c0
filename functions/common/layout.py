"""Where the functions keep things in S3: every key they read or write is made here.

Input bucket (the only one with triggers):

| key | what |
|---|---|
| `uploads/{job_id}/{name}` | an API job's upload (photo or whole video); any other `uploads/` key gets a derived job id |
| `analyze/{job_id}/{name}` | the same for analysis ("operation": "analyze"): only the report is written |
| `swap/{job_id}/{name}`, `swap/{job_id}/source/{name}` | an API swap job's target and source face (they trigger nothing) |
| `swap/{job_id}/manifest.json`, `swap/.../*.json` | a swap's manifest, the only swap object that triggers (functions.common.swapjobs) |
| `sessions/{session_id}/{seq}.mp4` or `.ts` | a stream session's chunk `seq` |

Output bucket (no trigger, so no loop):

| key | what |
|---|---|
| `results/{job_id}/{name}`, `results/{job_id}/{name}.json` | a job's result and its report |
| `work/{job_id}/plan.json` | a whole video's split plan (chunks, audio, stream info) |
| `work/{job_id}/chunks/{index:05d}{ext}` | the chunks cut from it |
| `work/{job_id}/audio{ext}` | its audio, remuxed |
| `work/{job_id}/face{ext}` | a swap's source face photo, for the chunk workers |
| `work/{job_id}/out/{index:05d}{ext}`, `.json` | a processed chunk and its report (the report last: it means done) |
| `sessions/{session_id}/{seq}{ext}`, `.json` | a session chunk's result and report |
| `sessions/{session_id}/{seq}.state.json` | its state checkpoint (functions.common.sessions.S3Checkpoints) |

Every key is a function of the input (job id, chunk index, session and seq), so a rerun
rewrites the same objects. template.yaml's lifecycle rules and IAM resources name the same
prefixes (tests/test_template.py checks that they agree).
"""
from __future__ import annotations

import re

from .aws import result_keys
from .sessions import SESSION_ID
from .settings import RESULT_PREFIX, SWAP_PREFIX, UPLOAD_PREFIX

__all__ = ["RESULT_PREFIX", "UPLOAD_PREFIX", "SESSION_PREFIX", "WORK_PREFIX", "SESSION_KEY",
           "result_keys", "session_keys", "work_keys", "chunk_key", "out_keys", "out_index", "audio_key", "s3_uri",
           "swap_key", "face_key"]

SESSION_PREFIX = "sessions/"   # input bucket: stream chunks in; output bucket: results out
WORK_PREFIX = "work/"          # output bucket: a whole video's chunks, audio, plan, processed chunks
# A session chunk's key: a session id (functions.common.sessions.SESSION_ID), seq without
# leading zeros (one key per chunk), and a container a stream is cut into.
SESSION_KEY = re.compile(rf"^{SESSION_PREFIX}(?P<sid>{SESSION_ID.pattern.strip('^$')})/"
                         r"(?P<seq>0|[1-9][0-9]{0,8})(?P<ext>\.mp4|\.ts)$")


def s3_uri(bucket: str, key: str) -> str:
    return f"s3://{bucket}/{key}"


def swap_key(job_id: str, name: str) -> str:
    """An API swap job's uploads and manifest: swap/{job_id}/{name}."""
    return f"{SWAP_PREFIX}{job_id}/{name}"


def session_keys(session_id: str, seq: int, ext: str) -> tuple[str, str]:
    """(anonymised chunk, report) in the output bucket; the checkpoint is S3Checkpoints.key."""
    base = f"{SESSION_PREFIX}{session_id}/{seq}"
    return base + ext, base + ".json"


def work_keys(job_id: str) -> dict[str, str]:
    base = f"{WORK_PREFIX}{job_id}/"
    return {"base": base, "plan": base + "plan.json", "chunks": base + "chunks/", "out": base + "out/"}


def chunk_key(job_id: str, index: int, ext: str) -> str:
    return f"{work_keys(job_id)['chunks']}{index:05d}{ext}"


def out_keys(job_id: str, index: int, ext: str) -> tuple[str, str]:
    """(processed chunk, its report)."""
    base = f"{work_keys(job_id)['out']}{index:05d}"
    return base + ext, base + ".json"


def out_index(job_id: str, key: str) -> int | None:
    """The chunk index a processed chunk's report key names (None for any other key)."""
    prefix = work_keys(job_id)["out"]
    stem = key[len(prefix):] if key.startswith(prefix) else ""
    return int(stem[:-5]) if stem.endswith(".json") and stem[:-5].isdigit() else None


def face_key(job_id: str, ext: str) -> str:
    """A chunked swap's source face photo."""
    return f"{work_keys(job_id)['base']}face{ext}"


def audio_key(job_id: str, ext: str) -> str:
    return f"{work_keys(job_id)['base']}audio{ext}"
