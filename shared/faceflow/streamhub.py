"""Many real-time streams on one engine: bounded queues, detection batched across streams,
every frame that gets no result counted.

    hub = StreamHub(engine, batch=8, depth=3)
    outbox = Outbox(8)
    stream = hub.open(outbox.offer)      # replies come to `outbox.offer`, in the stream's order
    stream.submit(message)               # never blocks: admitted, or answered with a drop
    ...
    stream.end()                         # no more frames; the admitted ones still get replies
    stream.idle                          # True once every admitted frame is answered
    hub.close()

The transports are thin: `faceflow serve`'s WebSocket route (faceflow.web.stream_route) and the GPU
container's gRPC server (functions/gpu/stream_server.py) each read messages, `submit` them, and
send what arrives in their Outbox. The per-frame step itself is faceflow.stream's
StreamProcessor; this module only schedules it.

Backpressure, on the server's side: a stream has at most `depth` frames admitted and not yet
answered. A frame arriving beyond that pushes out the oldest frame still waiting for the
detector (for live video the newest frame is worth more), which is answered as a drop
("backlog"); a result the transport's outbox has no room for (a client that does not read) is
dropped too ("stale"). Either way the stream's state counts it and every later reply carries
the total (`dropped`); a drop reply that finds no room is not sent (its frame is counted
already). Frames are done in order, so a result also settles every earlier frame of the stream.
Nothing waits in a queue without bound, so latency cannot grow.

Two threads share the work (onnxruntime and OpenCV release the GIL, so they overlap): one
decodes the waiting frames of all streams, one of each stream in turn, and runs the detector on
them in batches (`Engine.detect_batch`, one call per frame size); the other tracks, masks and
encodes each frame against its stream's state, in each stream's order. The detector takes
whatever frames are waiting when it is free, so batches grow with the load and a lone stream is
never held back to fill one.
"""
from __future__ import annotations

import logging
import threading
from collections import deque
from typing import Any, Callable

import numpy as np

from .face import Face
from .stream import (BACKLOG, DROP_REASONS, RESULT, STALE, FrameMessage, ProtocolError, StreamOptions,
                     StreamProcessor, encode_frame, parse_message)

logger = logging.getLogger(__name__)

DEFAULT_BATCH = 8     # frames per detector call, at most
# Frames of one stream admitted and not yet answered, at most: 3 (120 ms at 25 fps) rides out
# a short stall of a busy machine without a drop (2 dropped a few % of frames on 2 loaded cores).
DEFAULT_DEPTH = 3
# Not one of stream.py's error codes: a frame the server failed on (a defect, logged).
INTERNAL = "internal"

Deliver = Callable[[dict[str, Any]], bool]


class Outbox:
    """A bounded, thread-safe queue of replies for one connection: `offer` never blocks (False
    when full). `wake` (optional) is called after each item is added, e.g. to wake an asyncio
    sender from the hub's threads."""

    def __init__(self, size: int, wake: Callable[[], None] | None = None):
        self.size, self.wake = size, wake
        self._items: deque = deque()
        self._ready = threading.Condition()

    def offer(self, item) -> bool:
        """Add `item` if there is room now; False if not."""
        return self.put(item, timeout=0)

    def put(self, item, timeout: float) -> bool:
        """Add `item`, waiting up to `timeout` seconds for room; False if none came."""
        with self._ready:
            if len(self._items) >= self.size:
                self._ready.wait_for(lambda: len(self._items) < self.size, timeout)
            if len(self._items) >= self.size:
                return False
            self._items.append(item)
            self._ready.notify_all()
        if self.wake is not None:
            self.wake()
        return True

    def take(self, timeout: float | None = None):
        """The next item, or None when none came within `timeout` seconds."""
        with self._ready:
            if not self._items:
                self._ready.wait_for(lambda: self._items, timeout)
            item = self._items.popleft() if self._items else None
            self._ready.notify_all()  # room for a waiting `put`
            return item

    def __len__(self) -> int:
        return len(self._items)


class HubStream:
    """One client's stream on a hub: its state, its waiting frames, where its replies go."""

    def __init__(self, hub: "StreamHub", deliver: Deliver):
        self.hub, self.deliver = hub, deliver
        self.state: dict[str, Any] | None = None
        self.waiting: deque[FrameMessage] = deque()  # admitted, not yet taken by the detector
        self.admitted = 0            # frames admitted and not yet answered
        self.ended = False           # no more frames will come
        self.closed = False          # the client is gone: nothing more is sent
        self._state_lock = threading.Lock()

    @property
    def idle(self) -> bool:
        """The input has ended and every admitted frame is answered."""
        with self.hub._cond:
            return self.ended and self.admitted == 0

    @property
    def drops(self) -> dict[str, int]:
        with self._state_lock:
            return dict((self.state or {}).get("drops", {}))

    def submit(self, data: str | bytes | FrameMessage) -> None:
        """A message off the wire (text or binary) or a FrameMessage built by a transport; it
        is checked here. Never blocks on the detector."""
        hub = self.hub
        try:
            if isinstance(data, FrameMessage):
                # Checked as the wire form is: the same fields, the same limits.
                data = encode_frame(data, binary=True)
            message = parse_message(data, hub.processor.options.max_jpeg_bytes)
        except ProtocolError as exc:
            self._answer(lambda state, error=exc: hub.processor.refuse(state or hub.processor.new_state(), error),
                         slot=False)
            return
        pushed_out = None
        with hub._cond:
            if self.closed or self.ended:
                return
            if self.admitted >= hub.depth:
                if not self.waiting:  # all of them are being worked on: this one goes
                    pushed_out, message = message, None
                else:
                    pushed_out = self.waiting.popleft()
            else:
                self.admitted += 1
            if message is not None:
                self.waiting.append(message)
                if self not in hub._ready:
                    hub._ready.append(self)
                hub._cond.notify()
        if pushed_out is not None:
            seq, message_fps = pushed_out.seq, pushed_out.fps
            self._answer(lambda state: hub.processor.drop(state or hub.processor.new_state(message_fps), seq,
                                                          BACKLOG), slot=False)

    def end(self) -> None:
        """No more frames: those admitted are still answered."""
        with self.hub._cond:
            self.ended = True

    def close(self) -> None:
        """The client is gone: waiting frames are forgotten, nothing more is delivered."""
        with self.hub._cond:
            self.closed = self.ended = True
            self.admitted -= len(self.waiting)
            self.waiting.clear()
            if self in self.hub._ready:
                self.hub._ready.remove(self)

    def _answer(self, step: Callable[[dict[str, Any] | None], Any], slot: bool) -> None:
        """Run `step` (state or None -> Outcome) on this stream's state and deliver the reply; a
        result the outbox refuses is counted as stale. `slot`: the reply answers an admitted
        frame.

        The step runs outside the state's lock: the finishing thread's step (mask, encode) is
        long, and a drop counted meanwhile (`submit`, on a transport's thread or event loop)
        must not wait for it. Only the finishing thread runs long steps, so the one thing that
        can change the state meanwhile is such a count, which is carried over."""
        processor = self.hub.processor
        try:
            with self._state_lock:
                if self.closed:
                    return
                before = self.state
            outcome = step(before)
            with self._state_lock:
                if self.closed:
                    return
                state = outcome.state
                if self.state is not before:
                    state = _with_drops_since(state, before, self.state)
                if not self.deliver(outcome.reply) and outcome.reply.get("type") == RESULT:
                    # (A drop or an error that finds no room is counted already.)
                    state = processor.drop(state, outcome.reply.get("seq"), STALE).state
                self.state = state
        finally:
            if slot:
                with self.hub._cond:
                    self.admitted = max(0, self.admitted - 1)
                    self.hub._cond.notify_all()


def _with_drops_since(state: dict[str, Any], before: dict[str, Any] | None, now: dict[str, Any]) -> dict[str, Any]:
    """`state` plus the drops counted in `now` since `before`."""
    drops = dict(state.get("drops", {}))
    earlier = (before or {}).get("drops", {})
    for reason, count in now.get("drops", {}).items():
        extra = count - earlier.get(reason, 0)
        if extra > 0:
            drops[reason] = drops.get(reason, 0) + extra
    return {**state, "drops": drops}


class StreamHub:
    """Streams served by one engine: see the module's docstring."""

    def __init__(self, engine, *, batch: int = DEFAULT_BATCH, depth: int = DEFAULT_DEPTH,
                 options: StreamOptions | None = None):
        if batch < 1 or depth < 1:
            raise ValueError("batch and depth must be at least 1")
        self.engine, self.batch, self.depth = engine, batch, depth
        self.processor = StreamProcessor(engine, options or StreamOptions())
        self._cond = threading.Condition()
        self._ready: deque[HubStream] = deque()     # streams with a waiting frame, in turn
        # Detected frames on their way to the finishing thread: one batch while the next is
        # detected, so both threads stay busy and nothing piles up between them.
        self._detected = Outbox(1)
        self._closing = False
        self.batches = 0                             # detector calls, and frames in them
        self.batched_frames = 0
        self._threads = [threading.Thread(target=self._detect_loop, name="faceflow-stream-detect", daemon=True),
                         threading.Thread(target=self._finish_loop, name="faceflow-stream-finish", daemon=True)]
        for thread in self._threads:
            thread.start()

    def open(self, deliver: Deliver) -> HubStream:
        """A new stream; `deliver(reply) -> bool` gets its replies (False: no room, dropped)."""
        return HubStream(self, deliver)

    def close(self) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        for thread in self._threads:
            thread.join(timeout=10)

    # --- detection: all streams --------------------------------------------------------------
    def _next_group(self) -> list[tuple[HubStream, FrameMessage]] | None:
        with self._cond:
            while not self._ready and not self._closing:
                self._cond.wait(0.5)
            if self._closing:
                return None
            group = []
            while self._ready and len(group) < self.batch:
                stream = self._ready.popleft()
                group.append((stream, stream.waiting.popleft()))
                if stream.waiting:
                    self._ready.append(stream)
            return group

    def _detect_loop(self) -> None:
        while True:
            group = self._next_group()
            if group is None:
                self._detected.put(None, timeout=1)
                return
            items = []
            for stream, message in group:
                try:
                    items.append([stream, message, self.processor.decode(message), None, None])
                except ProtocolError as exc:
                    items.append([stream, message, None, None, exc])
                except Exception as exc:  # noqa: BLE001 - answered and logged, the hub goes on
                    logger.exception("stream frame could not be decoded")
                    items.append([stream, message, None, None, exc])
            self._detect(items)
            while not self._detected.put(items, timeout=0.5):  # wait for the finishing thread
                if self._closing:
                    return

    def _detect(self, items: list[list]) -> None:
        by_size: dict[tuple[int, ...], list[list]] = {}
        for item in items:
            if item[2] is not None:
                by_size.setdefault(item[2].shape, []).append(item)
        for same in by_size.values():
            try:
                found = self.engine.detect_batch([item[2] for item in same])
            except Exception as exc:  # noqa: BLE001
                logger.exception("stream detection failed")
                for item in same:
                    item[4] = exc
                continue
            self.batches += 1
            self.batched_frames += len(same)
            for item, faces in zip(same, found):
                item[3] = faces

    # --- tracking, masking, encoding: each stream in order ----------------------------------------
    def _finish_loop(self) -> None:
        while True:
            items = self._detected.take(timeout=0.5)
            if items is None:
                if self._closing:
                    return
                continue
            for stream, message, bgr, faces, error in items:
                stream._answer(lambda state, m=message, b=bgr, f=faces, e=error: self._step(state, m, b, f, e),
                               slot=True)

    def _step(self, state: dict[str, Any] | None, message: FrameMessage, bgr: np.ndarray | None,
              faces: list[Face] | None, error: Exception | None):
        processor = self.processor
        if error is None:
            try:
                # (None: the stream's first frame, whose fps the new state takes.)
                return processor.process(message, state, bgr=bgr, detections=faces)
            except ProtocolError as exc:
                error = exc
            except Exception as exc:  # noqa: BLE001 - a defect: logged, the stream goes on
                logger.exception("stream frame failed")
                error = exc
        state = state if state is not None else processor.new_state(message.fps)
        if isinstance(error, ProtocolError):
            return processor.refuse(state, error)
        return processor.refuse(state, ProtocolError(INTERNAL, "internal error on this frame (see the server log)",
                                                     message.seq))


__all__ = ["StreamHub", "HubStream", "Outbox", "DEFAULT_BATCH", "DEFAULT_DEPTH", "DROP_REASONS"]
