"""What the stream function does with each WebSocket route, apart from Lambda and Powertools:
`$connect` opens the connection's state, `$default` runs one frame through
faceflow.stream.StreamProcessor against it and posts the reply to the connection,
`$disconnect` drops the state.

Two environments may run frames of one connection at the same time: the state is written
only at the version it was read at (functions.stream.connections), and on a conflict the
frame is processed again from the newer state, at most MAX_ATTEMPTS times; the last reply is
sent even if its state could not be written (its frame is masked all the same, the tracks
just miss that frame's detections).

When Redis lost the connection's state (a restart, a failover), the frame is processed from
this environment's last copy of it if it has one (`reset: rebuilt`; the tracks are a few
frames old and still cover a face the detector now misses), otherwise from nothing
(`reset: lost`: whole frames are covered for as long as a track could have held a face).
"""
from __future__ import annotations

import os
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable

from faceflow import stream

from .connections import CONFLICT, MISSING, SAVED, ConnectionStore

MAX_ATTEMPTS = 3
LOCAL_COPIES = 256          # connections whose last state this environment keeps


@dataclass(frozen=True)
class StreamSettings:
    ttl_s: int = 900                # the connection's state in Redis, refreshed on every frame
    max_age_ms: int = 1000          # a frame that waited longer than this is dropped (stale)

    @classmethod
    def from_env(cls) -> "StreamSettings":
        env = os.environ
        return cls(ttl_s=int(env.get("FACEFLOW_STREAM_TTL_S", cls.ttl_s)),
                   max_age_ms=int(env.get("FACEFLOW_STREAM_MAX_AGE_MS", cls.max_age_ms)))


@dataclass
class Handled:
    """What a frame came to: the reply sent, and how its state was kept."""
    reply: dict[str, Any]
    stored: str                     # SAVED, CONFLICT (given up after MAX_ATTEMPTS)
    attempts: int
    reset: str | None = None


@dataclass
class StreamService:
    processor: stream.StreamProcessor
    store: ConnectionStore
    settings: StreamSettings = field(default_factory=StreamSettings)
    copies: OrderedDict = field(default_factory=OrderedDict)   # connection id → (version, state)

    def connect(self, connection_id: str) -> None:
        state = self.processor.new_state()
        status, version = self.store.create(connection_id, state)
        if status != SAVED:  # a reconnect with the same id cannot happen; keep theirs
            return
        self._keep(connection_id, version, state)

    def disconnect(self, connection_id: str) -> None:
        self.store.delete(connection_id)
        self.copies.pop(connection_id, None)

    def message(self, connection_id: str, body: str | bytes, post: Callable[[str], None],
                waited_ms: float | None = None) -> Handled:
        """One client message: processed against the connection's state, the reply posted."""
        handled = self._handle(connection_id, body, waited_ms)
        post(stream.encode_reply(handled.reply))
        return handled

    def _handle(self, connection_id: str, body: str | bytes, waited_ms: float | None) -> Handled:
        outcome, reset = None, None
        for attempt in range(1, MAX_ATTEMPTS + 1):
            loaded = self.store.load(connection_id)
            if loaded is not None:
                version, state, reset = loaded.version, loaded.state, None
            elif connection_id in self.copies:
                (version, state), reset = self.copies[connection_id], stream.REBUILT
            else:
                version, state, reset = 0, None, stream.LOST
            outcome = self._outcome(body, state, reset, waited_ms)
            if loaded is not None:
                status, new_version = self.store.save(connection_id, version, outcome.state)
            else:
                status, new_version = self.store.create(connection_id, outcome.state, version + 1, restored=True)
            if status == SAVED:
                self._keep(connection_id, new_version, outcome.state)
                return Handled(outcome.reply, SAVED, attempt, reset)
            # CONFLICT: another environment wrote first; MISSING: Redis lost it meanwhile.
            assert status in (CONFLICT, MISSING)
        return Handled(outcome.reply, CONFLICT, MAX_ATTEMPTS, reset)

    def _outcome(self, body, state, reset, waited_ms) -> stream.Outcome:
        # A frame after a lost state is never dropped: the state it leaves covers whole frames.
        if reset != stream.LOST and waited_ms is not None and waited_ms > self.settings.max_age_ms:
            # Too late to be worth processing: a client that sends faster than frames are
            # processed gets drops, not a growing delay.
            try:
                seq = stream.parse_message(body, self.processor.options.max_jpeg_bytes).seq
            except stream.ProtocolError as exc:
                return self.processor.refuse(state or self.processor.new_state(), exc)
            return self.processor.drop(state or self.processor.new_state(), seq, stream.STALE)
        return self.processor.handle(body, state, reset=reset)

    def _keep(self, connection_id: str, version: int, state: dict[str, Any]) -> None:
        self.copies[connection_id] = (version, state)
        self.copies.move_to_end(connection_id)
        while len(self.copies) > LOCAL_COPIES:
            self.copies.popitem(last=False)


def waited_ms(request_time_epoch_ms: int | None, now: float | None = None) -> float | None:
    """How long a message waited since API Gateway received it (requestTimeEpoch)."""
    if not request_time_epoch_ms:
        return None
    return (now if now is not None else time.time()) * 1000 - request_time_epoch_ms
