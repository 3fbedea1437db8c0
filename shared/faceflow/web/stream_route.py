"""`faceflow serve`'s WebSocket route for real-time streams: `/v1/stream`.

The same protocol and limits as the deployed WebSocket API (faceflow.stream): text messages
(JSON, the JPEG in base64, as API Gateway passes them; fragmented ones are joined) or the
binary form; each reply goes back in the form of the message it answers. One connection is one
stream, its tracker state kept in memory for the connection's life. All connections share one
faceflow.streamhub.StreamHub on serve's engine: detection is batched across them and every
queue is bounded (a connection sending faster than it is served has frames dropped, each
answered with a "drop" reply; see streamhub).

    from faceflow.web.stream_route import add_stream_route
    add_stream_route(app, engines)   # GET /v1/stream; `engines`: an Engine, or a callable making one
"""
from __future__ import annotations

import asyncio
import threading
from typing import Any, Callable

from aiohttp import WSMsgType, web

from ..stream import ENVELOPE_BYTES, MESSAGE_LIMIT_BYTES, encode_reply
from ..streamhub import DEFAULT_BATCH, DEFAULT_DEPTH, Outbox, StreamHub

PATH = "/v1/stream"
# Messages up to this size are read and, over the protocol's limit, refused with a clear
# "too_large" error reply; a larger one closes the connection (1009, message too big) unread.
MAX_READ_BYTES = 4 * (MESSAGE_LIMIT_BYTES + ENVELOPE_BYTES)
# Replies waiting to be sent on one connection: the admitted frames' results and a few drops.
OUTBOX_EXTRA = 6


class HubHolder:
    """The app's StreamHub, made on the first stream (the app starts without loading a model
    for streams nobody opens) and closed with the app."""

    def __init__(self, engine: Any | Callable[[], Any], batch: int, depth: int):
        self._engine, self.batch, self.depth = engine, batch, depth
        self._hub: StreamHub | None = None
        self._lock = threading.Lock()

    def get(self) -> StreamHub:
        with self._lock:
            if self._hub is None:
                engine = self._engine() if callable(self._engine) and not hasattr(self._engine, "detect_batch") \
                    else self._engine
                self._hub = StreamHub(engine, batch=self.batch, depth=self.depth)
            return self._hub

    def close(self) -> None:
        with self._lock:
            if self._hub is not None:
                self._hub.close()
                self._hub = None


HUB = web.AppKey("faceflow_stream_hub", HubHolder)


def add_stream_route(app: web.Application, engine: Any | Callable[[], Any], *, batch: int = DEFAULT_BATCH,
                     depth: int = DEFAULT_DEPTH, path: str = PATH) -> None:
    """Serve streams at `path` on `engine` (an Engine, or a callable that makes one, called
    once on the first stream); the hub stops with the app."""
    app[HUB] = HubHolder(engine, batch, depth)

    async def close_hub(app: web.Application) -> None:
        await asyncio.get_running_loop().run_in_executor(None, app[HUB].close)

    app.on_cleanup.append(close_hub)
    app.router.add_get(path, handle_stream)


async def handle_stream(request: web.Request) -> web.WebSocketResponse:
    """One stream: read frames, hand them to the hub, send its replies as they come."""
    hub = await asyncio.get_running_loop().run_in_executor(None, request.app[HUB].get)  # may load the model
    # No per-message deflate: JPEG does not compress, and deflating every frame cost CPU and
    # (over a threshold aiohttp deflates on an executor thread) latency; API Gateway has none.
    ws = web.WebSocketResponse(max_msg_size=MAX_READ_BYTES, heartbeat=30, compress=False)
    await ws.prepare(request)
    loop = asyncio.get_running_loop()
    ready = asyncio.Event()
    outbox = Outbox(hub.depth + OUTBOX_EXTRA, wake=lambda: loop.call_soon_threadsafe(ready.set))
    binary = {"last": False}   # the form of the latest message: replies go in that form

    def deliver(reply: dict[str, Any]) -> bool:
        return outbox.offer((reply, binary["last"]))

    stream = hub.open(deliver)
    sender = asyncio.create_task(_send(ws, outbox, ready, stream))
    try:
        async for msg in ws:
            if msg.type == WSMsgType.TEXT:
                binary["last"] = False
                stream.submit(msg.data)
            elif msg.type == WSMsgType.BINARY:
                binary["last"] = True
                stream.submit(msg.data)
            elif msg.type == WSMsgType.ERROR:
                break
        # The client closed: a client waits for its replies before closing, so what is left
        # can no longer be sent.
    except ConnectionResetError:
        pass
    finally:
        stream.close()
        sender.cancel()
        if not ws.closed:
            await ws.close()
    return ws


async def _send(ws: web.WebSocketResponse, outbox: Outbox, ready: asyncio.Event, stream) -> None:
    while True:
        item = outbox.take(timeout=0)
        if item is None:
            if stream.idle and not len(outbox):
                return
            ready.clear()
            if len(outbox):
                continue
            try:
                await asyncio.wait_for(ready.wait(), timeout=0.2)
            except asyncio.TimeoutError:
                pass
            continue
        reply, binary = item
        if ws.closed:
            return
        data = encode_reply(reply, binary)
        if binary:
            await ws.send_bytes(data)
        else:
            await ws.send_str(data)
