"""Why work failed for good, in words a client can act on.

Two kinds of record reach the failure function (functions/failures/app.py):

* Lambda's on-failure destination record of an asynchronous invocation (S3 → stills or
  split) whose retries are spent: {"requestContext": {"functionArn", "condition",
  "approximateInvokeCount"}, "requestPayload": <the S3 event>, "responsePayload": <the last
  error>}. The job ids come from the S3 keys, as the functions derive them.
* A message a queue's redrive policy moved to its dead-letter queue after the consumer failed
  it on every receive: a whole video's chunk ({"job_id", "index"}) or a stream session's
  chunk (an S3 notification for sessions/...). A dead-lettered message carries no error: a
  worker that times out or is killed for memory cannot say why, so the reason names those.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote_plus

from faceflow import media

from .aws import job_for_key, object_identity
from .sessions import SESSION_ID

_TIMED_OUT = re.compile(r"Task timed out after (?P<seconds>[0-9.]+) seconds")
_KILLED = ("signal: killed", "signal 9", "Runtime.OutOfMemory", "out of memory")
SERVICE_ERROR_ADVICE = "upload it again later; if it fails again, report the job id"


@dataclass(frozen=True)
class Failure:
    """One job to mark failed (`job_id`), or a stream session's chunk to skip (`job_id` None,
    `detail` has the session id and seq), with the reason."""
    kind: str              # "async", "chunk", "merge", "session-chunk"
    reason: str
    job_id: str | None = None
    detail: dict | None = None   # ids for the log line: function, chunk index, session


def cause(error: dict | None) -> str:
    """The last attempt's error as an actionable phrase."""
    error = error if isinstance(error, dict) else {}
    error_type = str(error.get("errorType") or "")
    message = str(error.get("errorMessage") or "")
    timed_out = _TIMED_OUT.search(message)
    if timed_out or error_type == "Sandbox.Timedout":
        seconds = f" after {float(timed_out['seconds']):g} s" if timed_out else ""
        return (f"timed out{seconds}; retry with a smaller photo or a shorter video, "
                f"or raise the function timeout")
    if any(marker in f"{error_type} {message}" for marker in _KILLED):
        return ("ran out of memory (the function was stopped); retry with a smaller photo or a shorter "
                "video, or raise the function memory")
    if error_type == "Runtime.ExitError":
        return f"the function crashed ({message or 'no message'}); {SERVICE_ERROR_ADVICE}"
    text = f"{error_type}: {message}" if error_type and message else error_type or message or "no error reported"
    return f"internal error ({text[:300]}); {SERVICE_ERROR_ADVICE}"


def from_destination_record(record: dict) -> list[Failure]:
    """The jobs of an on-failure destination record (an S3 event whose retries are spent)."""
    context = record.get("requestContext") or {}
    function = str(context.get("functionArn") or "").split(":")[6:7] or ["the function"]
    attempts = context.get("approximateInvokeCount")
    if context.get("condition") == "EventAgeExceeded":
        why = "it waited too long for a free function (the event expired); upload it again"
    else:
        why = cause(record.get("responsePayload"))
    tries = f"{attempts} attempts" if isinstance(attempts, int) and attempts > 0 else "every attempt"
    reason = f"processing failed after {tries}: {why}"
    failures = []
    payload = record.get("requestPayload") or {}
    for s3_record in payload.get("Records") or [] if isinstance(payload, dict) else []:
        s3 = (s3_record or {}).get("s3") or {}
        bucket, obj = (s3.get("bucket") or {}).get("name"), s3.get("object") or {}
        if not bucket or not obj.get("key"):
            continue
        upload = object_identity(bucket, obj["key"], obj.get("versionId"), obj.get("eTag"))
        job_id, _ = job_for_key(upload["bucket"], upload["key"], upload["version"])
        failures.append(Failure("async", reason, job_id, {"function": function[0]}))
    return failures


def from_chunk_message(message: dict, progress: dict | None) -> Failure:
    """A whole video's chunk message that was dead-lettered. `progress` is the job's
    VideoJobs.progress(): when every chunk is done but the job is not merged, it was the
    merge (which runs in the worker of the last chunk) that failed."""
    job_id, index = message["job_id"], int(message["index"])
    total = (progress or {}).get("chunks_total")
    of = f" of {total}" if total else ""
    if progress and total and progress.get("chunks_done") == total and not progress.get("merged"):
        return Failure("merge", "merging the processed chunks failed on every attempt (timed out, ran out of "
                                "memory or an internal error); upload the video again later, or raise the chunk "
                                "worker's timeout and memory", job_id, {"chunk": index})
    return Failure("chunk", f"chunk {index + 1}{of} failed on every attempt (the chunk worker timed out, ran out "
                            f"of memory or hit an internal error); retry with a shorter video, or raise the chunk "
                            f"worker's timeout and memory", job_id, {"chunk": index})


def classify(body: Any) -> str:
    """Which kind of failure record a queue message body is: "async", "chunk", "session-chunk"
    or "" (not one of ours)."""
    if not isinstance(body, dict):
        return ""
    if isinstance(body.get("requestContext"), dict) and "requestPayload" in body:
        return "async"
    job_id, index = body.get("job_id"), body.get("index")
    if isinstance(job_id, str) and media.JOB_ID.match(job_id) and isinstance(index, int) and index >= 0:
        return "chunk"
    records = body.get("Records")
    if isinstance(records, list) and records and isinstance(records[0], dict) and "s3" in records[0]:
        return "session-chunk"
    return ""


def from_session_chunk(body: dict) -> list[Failure]:
    """A stream session's chunk that was dead-lettered. Sessions have no job record: the
    chunk is skipped (`detail` names the session id and seq: ids, never the key), so the
    session goes on from the state before it instead of waiting for it forever."""
    out = []
    for record in body.get("Records") or []:
        key = unquote_plus(str(((record.get("s3") or {}).get("object") or {}).get("key") or ""))
        parts = key.split("/")
        stem = parts[2].split(".")[0] if len(parts) == 3 else ""
        if parts[0] != "sessions" or not stem.isdigit() or not SESSION_ID.match(parts[1]):
            continue
        out.append(Failure("session-chunk", "the chunk failed on every attempt (timed out, ran out of memory or an "
                                            "internal error) and was skipped: it has no output",
                           None, {"session_id": parts[1], "seq": int(stem)}))
    return out
