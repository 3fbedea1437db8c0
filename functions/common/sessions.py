"""Coordination of chunked video in Redis: ordered stream sessions and whole-video jobs.

Two ways a video is cut into chunks, two structures here:

* **Stream sessions** (live or uploaded-as-you-go video: `sessions/{id}/{seq}.mp4`). Chunk
  `seq` needs the tracker state left by chunk `seq - 1`, so chunks run strictly in order,
  one at a time, whatever order their events arrive in. `claim` says what to do with a chunk:

  - PROCESS: `seq == next_seq` and the session lock was taken (SET NX PX with a random
    token); the claim carries the state to start from.
  - DUPLICATE: `seq < next_seq`, already done; the claim carries the stored result.
  - NOT_YET: a predecessor is not done; the caller fails retryably (Lambda / SQS redeliver
    later). A chunk never runs without its predecessor's state.
  - BUSY: another worker holds the lock (the same chunk, redelivered while running).

  `commit` then, atomically (one Lua script): checks that the lock is still ours (or has
  expired with nobody else holding it) and that `next_seq`/`version` are still those of the
  claim, stores the new state and the chunk's result, advances `next_seq` and `version`,
  refreshes the TTL and releases the lock. A worker killed mid-chunk leaves its lock to expire
  (its PX is the invocation's remaining time plus a margin); the retry then claims again. A
  worker that outlives its lock and races the retry writes the same bytes to the same keys
  (processing is deterministic); whichever commits second gets ALREADY_DONE or SessionError.

  Redis is not the only copy of a session: with a `Checkpoints` store (S3, see
  `S3Checkpoints`), `commit` first writes `{seq, next_seq, version, state, result}` next to the
  chunk's output. When the session key is gone (Redis restarted without persistence, failed
  over, or the TTL ran out on an idle session), `claim` restores it from the highest
  checkpoint reachable without a gap from `seq - 1`, instead of starting again from nothing.
  Without a checkpoint for `seq - 1`, a chunk `seq > 0` is NOT_YET (its predecessor may not be
  done): the session never silently restarts state-less. Only chunk 0 of a session with no
  checkpoint at all starts a new session. Checkpoints must therefore live (S3 lifecycle) at
  least as long as a session may pause; without a `Checkpoints` store, a session that Redis
  lost stays NOT_YET (its chunks end in the dead-letter queue) rather than restart state-less.

* **Whole-video jobs** (one upload split into N chunks processed in parallel, then merged).
  `plan` records N; `chunk_done` adds the chunk's index to a SET (SADD: a repeated completion
  does not count twice), writes the progress into the job record, and answers `merge=True`
  when every chunk is done, the merge has not finished, and the merge lease (SET NX PX) was
  free: once per job on the normal path, and again only if a merge failed or its worker died
  (lease released or expired) before `merge_finished`. The merge is idempotent (deterministic
  output keys), so a repeat after a lost `merged` flag only rewrites the same objects.

Key layout (`faceflow:` prefix; every key has a TTL, refreshed on each write):

| key | type | fields / members |
|---|---|---|
| `faceflow:session:{sid}` (braces kept: a hash tag) | hash | `version` (int, +1 per commit), `next_seq` (int), `state` (JSON), `created`, `updated` (epoch s), `restored` (epoch s, when rebuilt from a checkpoint) |
| `faceflow:session:{sid}:lock` | string, PX | random token of the worker holding the session |
| `faceflow:session:{sid}:results` | hash | `{seq}` → result JSON (output/report pointers, frames, faces) |
| `faceflow:video:{job}` | hash | `total` (chunks), `plan` (where the split plan lives), `created`, `merged` ("1" once the merge finished) |
| `faceflow:video:{job}:done` | set | indexes of processed chunks |
| `faceflow:video:{job}:merge` | string, PX | token of the worker running the merge |
| `faceflow:job:{job}` | hash (functions.common.jobs.JobStore) | written here only if it exists: `chunks_done`, `chunks_total`, `progress` (JSON `{"chunks_done", "chunks_total"}`), `updated` |

Nothing here falls back silently: a Redis error propagates and the invocation fails (retried).
"""
from __future__ import annotations

import json
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Protocol

import redis

from .jobs import job_key

PROCESS, DUPLICATE, NOT_YET, BUSY = "process", "duplicate", "not_yet", "busy"
COMMITTED, ALREADY_DONE = "committed", "already_done"
SESSION_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class SessionError(RuntimeError):
    """A commit could not be made; the caller fails retryably."""


# --- Lua: each script runs atomically inside Redis -----------------------------------------

_CLAIM = """
-- KEYS: session, lock, results   ARGV: seq, token, lock_ms
if redis.call('EXISTS', KEYS[1]) == 0 then return {'unknown'} end
local seq = tonumber(ARGV[1])
local next_seq = tonumber(redis.call('HGET', KEYS[1], 'next_seq'))
local version = redis.call('HGET', KEYS[1], 'version')
if seq < next_seq then
  return {'duplicate', next_seq, version, redis.call('HGET', KEYS[3], ARGV[1]) or ''}
end
if seq > next_seq then return {'not_yet', next_seq, version} end
if not redis.call('SET', KEYS[2], ARGV[2], 'NX', 'PX', ARGV[3]) then
  return {'busy', next_seq, version, redis.call('PTTL', KEYS[2])}
end
return {'process', next_seq, version, redis.call('HGET', KEYS[1], 'state') or ''}
"""

_CREATE = """
-- KEYS: session   ARGV: next_seq, version, state, ttl_s, now, restored
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'next_seq', ARGV[1], 'version', ARGV[2], 'state', ARGV[3],
           'created', ARGV[5], 'updated', ARGV[5])
if ARGV[6] == '1' then redis.call('HSET', KEYS[1], 'restored', ARGV[5]) end
redis.call('EXPIRE', KEYS[1], ARGV[4])
return 1
"""

_COMMIT = """
-- KEYS: session, lock, results   ARGV: seq, token, version, state, result, ttl_s, now
local holder = redis.call('GET', KEYS[2])
if redis.call('EXISTS', KEYS[1]) == 0 then
  if holder == ARGV[2] then redis.call('DEL', KEYS[2]) end
  return {'lost'}
end
local next_seq = tonumber(redis.call('HGET', KEYS[1], 'next_seq'))
local version = redis.call('HGET', KEYS[1], 'version')
local seq = tonumber(ARGV[1])
if (holder and holder ~= ARGV[2]) or next_seq ~= seq or version ~= ARGV[3] then
  if holder == ARGV[2] then redis.call('DEL', KEYS[2]) end
  return {'conflict', next_seq, version}
end
local new_version = tonumber(version) + 1
redis.call('HSET', KEYS[1], 'state', ARGV[4], 'next_seq', seq + 1, 'version', new_version,
           'updated', ARGV[7])
redis.call('HSET', KEYS[3], ARGV[1], ARGV[5])
redis.call('EXPIRE', KEYS[1], ARGV[6])
redis.call('EXPIRE', KEYS[3], ARGV[6])
if holder then redis.call('DEL', KEYS[2]) end
return {'committed', seq + 1, new_version}
"""

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

_PLAN = """
-- KEYS: video, done, job   ARGV: total, plan, ttl_s, now
local old = redis.call('HGET', KEYS[1], 'total')
if old and old ~= ARGV[1] then return redis.error_reply('plan of ' .. old .. ' chunks already recorded') end
redis.call('HSETNX', KEYS[1], 'created', ARGV[4])
redis.call('HSET', KEYS[1], 'total', ARGV[1], 'plan', ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[3])
local done = redis.call('SCARD', KEYS[2])
if redis.call('EXISTS', KEYS[3]) == 1 then
  redis.call('HSET', KEYS[3], 'chunks_done', done, 'chunks_total', ARGV[1], 'updated', ARGV[4],
             'progress', cjson.encode({chunks_done = done, chunks_total = tonumber(ARGV[1])}))
  redis.call('EXPIRE', KEYS[3], ARGV[3])
end
return done
"""

_CHUNK_DONE = """
-- KEYS: video, done, job, merge lease   ARGV: index, lease_ms, ttl_s, now, token
local total = redis.call('HGET', KEYS[1], 'total')
if not total then return {'unknown'} end
total = tonumber(total)
local index = tonumber(ARGV[1])
if index < 0 or index >= total then return redis.error_reply('chunk ' .. ARGV[1] .. ' out of range') end
local added = redis.call('SADD', KEYS[2], ARGV[1])
local done = redis.call('SCARD', KEYS[2])
redis.call('EXPIRE', KEYS[1], ARGV[3])
redis.call('EXPIRE', KEYS[2], ARGV[3])
if redis.call('EXISTS', KEYS[3]) == 1 then
  redis.call('HSET', KEYS[3], 'chunks_done', done, 'chunks_total', total, 'updated', ARGV[4],
             'progress', cjson.encode({chunks_done = done, chunks_total = total}))
  redis.call('EXPIRE', KEYS[3], ARGV[3])
end
local merge = 0
if done >= total and redis.call('HGET', KEYS[1], 'merged') ~= '1' then
  if redis.call('SET', KEYS[4], ARGV[5], 'NX', 'PX', ARGV[2]) then merge = 1 end
end
return {'ok', done, total, merge, added}
"""

_RESTORE_JOB = """
-- KEYS: video, done   ARGV: total, plan, ttl_s, now, indexes...
if redis.call('HGET', KEYS[1], 'total') then return 0 end
redis.call('HSET', KEYS[1], 'total', ARGV[1], 'plan', ARGV[2], 'created', ARGV[4], 'restored', ARGV[4])
for i = 5, #ARGV do redis.call('SADD', KEYS[2], ARGV[i]) end
redis.call('EXPIRE', KEYS[1], ARGV[3])
if redis.call('EXISTS', KEYS[2]) == 1 then redis.call('EXPIRE', KEYS[2], ARGV[3]) end
return 1
"""

_START_MERGE = """
-- KEYS: video, done, merge lease   ARGV: lease_ms, token, force
local total = redis.call('HGET', KEYS[1], 'total')
if not total then return {'unknown'} end
local done = redis.call('SCARD', KEYS[2])
if done < tonumber(total) then return {'incomplete', done, total} end
if ARGV[3] ~= '1' and redis.call('HGET', KEYS[1], 'merged') == '1' then return {'merged', done, total} end
if not redis.call('SET', KEYS[3], ARGV[2], 'NX', 'PX', ARGV[1]) then return {'busy', done, total} end
return {'ok', done, total}
"""

_MERGE_FINISHED = """
-- KEYS: video, lease   ARGV: token
redis.call('HSET', KEYS[1], 'merged', '1')
if redis.call('GET', KEYS[2]) == ARGV[1] then redis.call('DEL', KEYS[2]) end
return 1
"""


# --- checkpoints ------------------------------------------------------------------------------

class Checkpoints(Protocol):
    """Where session state survives Redis: one record per committed chunk."""

    def save(self, session_id: str, seq: int, record: dict[str, Any]) -> None: ...

    def load(self, session_id: str, seq: int) -> dict[str, Any] | None: ...

    def seqs(self, session_id: str) -> Iterable[int]: ...


class S3Checkpoints:
    """Checkpoints as `{prefix}{sid}/{seq}.state.json` objects (next to the chunk's output)."""

    SUFFIX = ".state.json"

    def __init__(self, s3, bucket: str, prefix: str = "sessions/"):
        self.s3, self.bucket, self.prefix = s3, bucket, prefix

    def key(self, session_id: str, seq: int) -> str:
        return f"{self.prefix}{session_id}/{seq}{self.SUFFIX}"

    def save(self, session_id: str, seq: int, record: dict[str, Any]) -> None:
        self.s3.put_object(Bucket=self.bucket, Key=self.key(session_id, seq),
                           Body=json.dumps(record).encode(), ContentType="application/json")

    def load(self, session_id: str, seq: int) -> dict[str, Any] | None:
        try:
            obj = self.s3.get_object(Bucket=self.bucket, Key=self.key(session_id, seq))
        except self.s3.exceptions.NoSuchKey:
            return None
        return json.loads(obj["Body"].read())

    def seqs(self, session_id: str) -> Iterable[int]:
        prefix = f"{self.prefix}{session_id}/"
        for page in self.s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
            for item in page.get("Contents", []):
                name = item["Key"][len(prefix):]
                stem = name[:-len(self.SUFFIX)] if name.endswith(self.SUFFIX) else ""
                if stem.isdigit():
                    yield int(stem)


# --- stream sessions --------------------------------------------------------------------------

@dataclass
class Claim:
    status: str
    session_id: str
    seq: int
    next_seq: int | None = None
    version: int | None = None
    token: str | None = None
    state: dict[str, Any] | None = None
    result: dict[str, Any] | None = None
    lock_ms: int | None = None      # BUSY: how long the holder's lock still runs
    restored: bool = False          # the session was rebuilt from a checkpoint for this claim


@dataclass
class Commit:
    status: str                     # COMMITTED, or ALREADY_DONE (someone else committed this seq)
    next_seq: int
    version: int | None = None
    restored: bool = False


@dataclass
class SessionStore:
    client: redis.Redis
    ttl_s: int = 24 * 3600
    checkpoints: Checkpoints | None = None
    prefix: str = "faceflow:session:"
    _scripts: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        for name, lua in (("claim", _CLAIM), ("create", _CREATE), ("commit", _COMMIT),
                          ("release", _RELEASE)):
            self._scripts[name] = self.client.register_script(lua)

    def keys(self, session_id: str) -> list[str]:
        base = f"{self.prefix}{{{session_id}}}"  # hash tag: one cluster slot (see jobs.job_key)
        return [base, base + ":lock", base + ":results"]

    def get(self, session_id: str) -> dict[str, Any] | None:
        raw = self.client.hgetall(self.keys(session_id)[0])
        if not raw:
            return None
        return {**raw, "next_seq": int(raw["next_seq"]), "version": int(raw["version"]),
                "state": json.loads(raw["state"]) if raw.get("state") else None}

    # --- claim ---------------------------------------------------------------------------
    def claim(self, session_id: str, seq: int, lock_ms: int) -> Claim:
        if not SESSION_ID.match(session_id):
            raise ValueError(f"bad session id {session_id!r}")
        if seq < 0:
            raise ValueError(f"bad sequence number {seq}")
        claim = self._claim(session_id, seq, lock_ms)
        if claim is not None:
            return claim
        # The session key is gone: never seen, expired, or lost with Redis.
        restored = self._restore(session_id, seq)
        if not restored:
            if seq > 0:
                return Claim(NOT_YET, session_id, seq)
            self._scripts["create"](keys=self.keys(session_id)[:1],
                                    args=[0, 0, "", self.ttl_s, time.time(), 0])
        claim = self._claim(session_id, seq, lock_ms)
        if claim is None:  # deleted again between the two calls: let the retry sort it out
            return Claim(NOT_YET, session_id, seq)
        claim.restored = restored
        return claim

    def _claim(self, session_id: str, seq: int, lock_ms: int) -> Claim | None:
        token = uuid.uuid4().hex
        reply = self._scripts["claim"](keys=self.keys(session_id), args=[seq, token, int(lock_ms)])
        status = reply[0]
        if status == "unknown":
            return None
        claim = Claim(status, session_id, seq, next_seq=int(reply[1]), version=int(reply[2]))
        if status == PROCESS:
            claim.token = token
            claim.state = json.loads(reply[3]) if reply[3] else None
        elif status == DUPLICATE:
            claim.result = json.loads(reply[3]) if reply[3] else None
            if claim.result is None and self.checkpoints is not None:
                record = self.checkpoints.load(session_id, seq)  # done before a restore
                claim.result = record.get("result") if record else None
        elif status == BUSY:
            claim.lock_ms = int(reply[3])
        return claim

    def _restore(self, session_id: str, seq: int) -> bool:
        """Rebuild a lost session from the checkpoints: the highest one reachable from
        `seq - 1` (or 0) without a gap. False when `seq - 1` (or, for seq 0, seq 0 itself) has
        no checkpoint."""
        if self.checkpoints is None:
            return False
        have = set(self.checkpoints.seqs(session_id))
        start = max(seq - 1, 0)
        if start not in have:
            return False
        last = start
        while last + 1 in have:
            last += 1
        record = self.checkpoints.load(session_id, last)
        if record is None:
            return False
        self._scripts["create"](keys=self.keys(session_id)[:1],
                                args=[record["next_seq"], record["version"],
                                      json.dumps(record["state"]) if record.get("state") is not None else "",
                                      self.ttl_s, time.time(), 1])
        return True

    # --- commit / release -----------------------------------------------------------------
    def commit(self, claim: Claim, new_state: dict[str, Any] | None, result: dict[str, Any]) -> Commit:
        """Store `new_state` as the session's state after `claim.seq` and advance. With
        checkpoints, the checkpoint is written first: once it exists the chunk counts as done
        even if Redis loses the commit."""
        if claim.status != PROCESS:
            raise ValueError(f"commit of a {claim.status} claim")
        sid, seq = claim.session_id, claim.seq
        if self.checkpoints is not None:
            self.checkpoints.save(sid, seq, {"session_id": sid, "seq": seq, "next_seq": seq + 1,
                                             "version": claim.version + 1, "state": new_state,
                                             "result": result, "written": time.time()})
        reply = self._scripts["commit"](
            keys=self.keys(sid),
            args=[seq, claim.token, claim.version, json.dumps(new_state) if new_state is not None else "",
                  json.dumps(result), self.ttl_s, time.time()])
        if reply[0] == COMMITTED:
            return Commit(COMMITTED, int(reply[1]), int(reply[2]))
        if reply[0] == "lost":
            # Redis lost the session while this chunk ran: rebuild it (from the checkpoint just
            # written) and check that it now stands past this chunk.
            if self._restore(sid, seq + 1):
                session = self.get(sid)
                if session and session["next_seq"] > seq:
                    return Commit(ALREADY_DONE, session["next_seq"], session["version"], restored=True)
            raise SessionError(f"session {sid} was lost while chunk {seq} ran")
        next_seq = int(reply[1])
        if next_seq > seq:  # another worker (after our lock expired) committed this chunk
            return Commit(ALREADY_DONE, next_seq, int(reply[2]))
        raise SessionError(f"session {sid}: chunk {seq} lost its lock to another worker")

    def release(self, claim: Claim) -> None:
        """Give the lock back after a failure, so the retry need not wait for it to expire."""
        if claim.token:
            self._scripts["release"](keys=self.keys(claim.session_id)[1:2], args=[claim.token])

    def skip(self, session_id: str, seq: int, result: dict[str, Any], lock_ms: int) -> str:
        """Commit chunk `seq` with `result` and the state before it, as if it had run without
        faces (its worker failed for good): the session goes on. Returns what happened:
        "skipped", DUPLICATE (it was done), NOT_YET (an earlier chunk is missing; nothing
        changes) or BUSY (a worker holds it: try again later)."""
        claim = self.claim(session_id, seq, lock_ms)
        if claim.status != PROCESS:
            return claim.status
        self.commit(claim, claim.state, result)
        return "skipped"


# --- whole-video jobs -------------------------------------------------------------------------

@dataclass
class ChunkDone:
    done: int
    total: int
    merge: bool           # this caller must run the merge now (holds the merge lease)
    token: str | None     # the merge lease token, for merge_finished / merge_failed
    added: bool           # False: this chunk had already been counted
    restored: bool = False


@dataclass
class VideoJobs:
    client: redis.Redis
    ttl_s: int = 7 * 24 * 3600
    prefix: str = "faceflow:video:"
    job_prefix: str = "faceflow:job:"   # functions.common.jobs.JobStore's
    _scripts: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        for name, lua in (("plan", _PLAN), ("chunk_done", _CHUNK_DONE), ("restore", _RESTORE_JOB),
                          ("start_merge", _START_MERGE), ("merge_finished", _MERGE_FINISHED),
                          ("release", _RELEASE)):
            self._scripts[name] = self.client.register_script(lua)

    def keys(self, job_id: str) -> list[str]:
        base = job_key(self.prefix, job_id)  # the same hash tag as the job's own hash
        return [base, base + ":done", job_key(self.job_prefix, job_id), base + ":merge"]

    def plan(self, job_id: str, total: int, plan: str) -> int:
        """Record that `job_id` has `total` chunks (its plan stored at `plan`). Repeating
        it with the same total is harmless; returns the chunks already done."""
        if total < 1:
            raise ValueError("a video job has at least one chunk")
        return int(self._scripts["plan"](keys=self.keys(job_id)[:3],
                                         args=[total, plan, self.ttl_s, time.time()]))

    def is_done(self, job_id: str, index: int) -> bool:
        return bool(self.client.sismember(self.keys(job_id)[1], str(index)))

    def progress(self, job_id: str) -> dict[str, Any] | None:
        video, done = self.keys(job_id)[:2]
        raw = self.client.hgetall(video)
        if not raw:
            return None
        return {"chunks_total": int(raw["total"]), "chunks_done": self.client.scard(done),
                "merged": raw.get("merged") == "1", "plan": raw.get("plan")}

    def chunk_done(self, job_id: str, index: int, lease_ms: int,
                   recover: Callable[[], tuple[int, str, list[int]] | None] | None = None) -> ChunkDone:
        """Count chunk `index` as processed. `merge` is True for the one caller that must now
        merge. When the job's record is gone from Redis, `recover()` may rebuild it:
        (total, plan, indexes already done) from durable storage, or None."""
        token = uuid.uuid4().hex
        reply = self._scripts["chunk_done"](keys=self.keys(job_id),
                                            args=[index, int(lease_ms), self.ttl_s, time.time(), token])
        restored = False
        if reply[0] == "unknown":
            found = recover() if recover else None
            if found is None:
                raise SessionError(f"video job {job_id} has no plan in Redis and none was recovered")
            total, plan, indexes = found
            self._scripts["restore"](keys=self.keys(job_id)[:2],
                                     args=[total, plan, self.ttl_s, time.time(), *map(str, indexes)])
            restored = True
            reply = self._scripts["chunk_done"](keys=self.keys(job_id),
                                                args=[index, int(lease_ms), self.ttl_s, time.time(), token])
            if reply[0] == "unknown":
                raise SessionError(f"video job {job_id} vanished again while being restored")
        merge = bool(int(reply[3]))
        return ChunkDone(int(reply[1]), int(reply[2]), merge, token if merge else None,
                         bool(int(reply[4])), restored)

    def start_merge(self, job_id: str, lease_ms: int, force: bool = False) -> tuple[str, str | None]:
        """Take the merge lease outside `chunk_done` (a replayed merge): ("ok", token) when
        every chunk is done, the merge has not finished (or `force`) and nobody is merging;
        otherwise (why not: "unknown", "incomplete", "merged", "busy", None)."""
        keys = self.keys(job_id)
        token = uuid.uuid4().hex
        reply = self._scripts["start_merge"](keys=[keys[0], keys[1], keys[3]],
                                             args=[int(lease_ms), token, "1" if force else "0"])
        return (reply[0], token) if reply[0] == "ok" else (reply[0], None)

    def merge_finished(self, job_id: str, token: str | None) -> None:
        keys = self.keys(job_id)
        self._scripts["merge_finished"](keys=[keys[0], keys[3]], args=[token or ""])

    def merge_failed(self, job_id: str, token: str | None) -> None:
        """Free the merge lease at once, so the retried message can merge again."""
        if token:
            self._scripts["release"](keys=self.keys(job_id)[3:4], args=[token])

    def merged(self, job_id: str) -> bool:
        return self.client.hget(self.keys(job_id)[0], "merged") == "1"
