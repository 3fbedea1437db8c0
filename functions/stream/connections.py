"""Per-connection stream state in Redis, for the stream function behind the WebSocket API.

API Gateway invokes the function once per message, on whichever execution environment is
free, and may run two messages of one connection at once. So the state (faceflow.stream's,
tracks included) is read, the frame processed, and the new state written only if nobody wrote
in between (a version compare-and-set in one Lua script); on a conflict the caller reads the
newer state and processes the frame again.

| key | type | fields |
|---|---|---|
| `faceflow:stream:{connection id}` (braces kept: a hash tag, one cluster slot) | hash | `version` (int, +1 per write), `state` (JSON), `created`, `updated` (epoch s), `restored` (epoch s, when rebuilt from an environment's copy) |

The key has a TTL refreshed on every write (FACEFLOW_STREAM_TTL_S, default 900 s: API
Gateway closes a connection idle for 10 minutes); `$disconnect` deletes it. Redis errors
propagate: the invocation fails and the client gets no reply for that frame.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

import redis

SAVED, CONFLICT, MISSING = "saved", "conflict", "missing"

_SAVE = """
-- KEYS: stream   ARGV: expected version, state, ttl_s, now
if redis.call('EXISTS', KEYS[1]) == 0 then return {'missing', -1} end
local version = tonumber(redis.call('HGET', KEYS[1], 'version'))
if version ~= tonumber(ARGV[1]) then return {'conflict', version} end
redis.call('HSET', KEYS[1], 'version', version + 1, 'state', ARGV[2], 'updated', ARGV[4])
redis.call('EXPIRE', KEYS[1], ARGV[3])
return {'saved', version + 1}
"""

_CREATE = """
-- KEYS: stream   ARGV: version, state, ttl_s, now, restored
if redis.call('EXISTS', KEYS[1]) == 1 then
  return {'conflict', tonumber(redis.call('HGET', KEYS[1], 'version'))}
end
redis.call('HSET', KEYS[1], 'version', ARGV[1], 'state', ARGV[2], 'created', ARGV[4], 'updated', ARGV[4])
if ARGV[5] == '1' then redis.call('HSET', KEYS[1], 'restored', ARGV[4]) end
redis.call('EXPIRE', KEYS[1], ARGV[3])
return {'saved', tonumber(ARGV[1])}
"""


@dataclass
class Loaded:
    version: int
    state: dict[str, Any]


@dataclass
class ConnectionStore:
    client: redis.Redis
    ttl_s: int = 900
    prefix: str = "faceflow:stream:"
    _scripts: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        self._scripts["save"] = self.client.register_script(_SAVE)
        self._scripts["create"] = self.client.register_script(_CREATE)

    def key(self, connection_id: str) -> str:
        return f"{self.prefix}{{{connection_id}}}"  # hash tag: one cluster slot per connection

    def load(self, connection_id: str) -> Loaded | None:
        version, state = self.client.hmget(self.key(connection_id), "version", "state")
        if version is None or not state:
            return None
        return Loaded(int(version), json.loads(state))

    def create(self, connection_id: str, state: dict[str, Any], version: int = 0,
               restored: bool = False) -> tuple[str, int]:
        """Store a connection's first state (or one rebuilt after Redis lost it): (SAVED,
        version), or (CONFLICT, their version) when another environment got there first."""
        status, version = self._scripts["create"](
            keys=[self.key(connection_id)],
            args=[version, json.dumps(state), self.ttl_s, time.time(), "1" if restored else "0"])
        return status, int(version)

    def save(self, connection_id: str, version: int, state: dict[str, Any]) -> tuple[str, int]:
        """Replace the state read at `version`: (SAVED, new version), (CONFLICT, their version)
        or (MISSING, -1) when the key is gone (Redis restarted, the TTL ran out)."""
        status, new_version = self._scripts["save"](
            keys=[self.key(connection_id)], args=[version, json.dumps(state), self.ttl_s, time.time()])
        return status, int(new_version)

    def delete(self, connection_id: str) -> None:
        self.client.delete(self.key(connection_id))
