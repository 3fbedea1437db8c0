"""Real-time streams on the GPU worker: the gRPC service of shared/faceflow/stream.proto.

Each call of `FaceStream.Stream` is one live stream: frames in, one reply per frame out (a
result, a drop or an error; faceflow.stream's protocol as protobuf messages). All streams share
one faceflow.streamhub.StreamHub on the worker's engine, which batches the frames waiting
across streams into each detector call (`Engine.detect_batch`) and keeps every queue bounded:
a stream that sends faster than it is served gets its oldest waiting frame dropped (answered
with reason "backlog"); a client that does not read its replies loses them ("stale").

server.py starts it beside the HTTP server (`start`); on CPU it serves the same (tests).

| variable | meaning | default |
|---|---|---|
| FACEFLOW_GPU_GRPC_PORT | port of the gRPC stream service; 0: no service | 50051 |
| FACEFLOW_GPU_STREAM_BATCH | frames per detector call, at most, across streams | 16 |
| FACEFLOW_GPU_STREAM_DEPTH | frames of one stream admitted and not yet answered | 3 |
| FACEFLOW_GPU_STREAMS | streams served at once (more are refused: RESOURCE_EXHAUSTED) | 64 |
"""
from __future__ import annotations

import os
import threading
from concurrent import futures
from typing import Callable, Iterator

import grpc
from aws_lambda_powertools import Logger

from faceflow import stream_pb2_grpc
from faceflow.stream import ENVELOPE_BYTES, MAX_JPEG_BYTES
from faceflow.streamgrpc import frame_from_proto, reply_to_proto
from faceflow.streamhub import DEFAULT_DEPTH, Outbox, StreamHub

logger = Logger(service=os.environ.get("POWERTOOLS_SERVICE_NAME", "faceflow-gpu"), child=True)

DEFAULT_PORT = 50051
# Replies waiting to be sent on one stream: the admitted frames' results and a few drops.
OUTBOX_EXTRA = 6
# gRPC's own cap on a message: a frame's JPEG and its fields; larger ones are refused by gRPC
# itself (RESOURCE_EXHAUSTED) before they are read. Between that and the protocol's limit a
# frame is read and refused by the protocol (error "too_large"), as the WebSocket routes do.
MAX_MESSAGE_BYTES = 4 * (MAX_JPEG_BYTES + ENVELOPE_BYTES)


def _env_int(name: str, default: int, low: int) -> int:
    raw = os.environ.get(name, "")
    try:
        value = int(raw) if raw.strip() else default
    except ValueError:
        raise SystemExit(f"{name}={raw!r}: not an integer") from None
    if value < low:
        raise SystemExit(f"{name}={value}: must be at least {low}")
    return value


class FaceStream(stream_pb2_grpc.FaceStreamServicer):
    """The service; `engine()` gives the loaded engine, or None while it loads."""

    def __init__(self, engine: Callable[[], object | None], batch: int, depth: int, streams: int):
        self._engine, self.batch, self.depth = engine, batch, depth
        self._hub: StreamHub | None = None
        self._hub_lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(streams)

    @property
    def hub(self) -> StreamHub | None:
        with self._hub_lock:
            if self._hub is None:
                engine = self._engine()
                if engine is not None:
                    self._hub = StreamHub(engine, batch=self.batch, depth=self.depth)
            return self._hub

    def close(self) -> None:
        with self._hub_lock:
            if self._hub is not None:
                self._hub.close()

    def Stream(self, request_iterator, context) -> Iterator:  # noqa: N802 - gRPC's name
        hub = self.hub
        if hub is None:
            context.abort(grpc.StatusCode.UNAVAILABLE, "the engine is not loaded yet; retry")
        if not self._slots.acquire(blocking=False):
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "too many streams at once; retry later")
        outbox = Outbox(self.depth + OUTBOX_EXTRA)
        stream = hub.open(outbox.offer)
        reader = threading.Thread(target=self._read, args=(request_iterator, stream), daemon=True,
                                  name="faceflow-stream-read")
        reader.start()
        try:
            # Bounded waits: the loop also sees a client that went away.
            while context.is_active():
                reply = outbox.take(timeout=0.1)
                if reply is not None:
                    yield reply_to_proto(reply)
                elif stream.idle and not len(outbox):
                    return
        finally:
            stream.close()
            self._slots.release()

    @staticmethod
    def _read(request_iterator, stream) -> None:
        try:
            for frame in request_iterator:
                stream.submit(frame_from_proto(frame))
        except grpc.RpcError:
            pass  # the client went away: the call ends
        except Exception:  # noqa: BLE001
            logger.exception("stream read failed")
        finally:
            stream.end()


def serve(engine: Callable[[], object | None], host: str = "0.0.0.0", port: int = DEFAULT_PORT, *,
          batch: int = 16, depth: int = DEFAULT_DEPTH, streams: int = 64) -> tuple[grpc.Server, int, FaceStream]:
    """A started gRPC server of the stream service: (server, the port bound, the service).
    `port` 0 binds a free port (tests)."""
    # Each stream holds a thread for its replies and one reads its frames (the reader is
    # started by the call, outside this pool).
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=streams + 2, thread_name_prefix="faceflow-grpc"),
                         options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                                  ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                                  # gRPC shares a port taken by another process by default (its
                                  # connections would go to either): a taken port is an error
                                  ("grpc.so_reuseport", 0)],
                         maximum_concurrent_rpcs=streams + 2)
    service = FaceStream(engine, batch, depth, streams)
    stream_pb2_grpc.add_FaceStreamServicer_to_server(service, server)
    try:
        bound = server.add_insecure_port(f"{host}:{port}" if ":" not in host else f"[{host}]:{port}")
    except RuntimeError:  # grpcio raises where older versions returned 0
        bound = 0
    if not bound:
        server.stop(None)
        raise OSError(f"cannot listen on {host}:{port} for the gRPC stream service (port in use?)")
    server.start()
    return server, bound, service


def start(worker, host: str) -> grpc.Server | None:
    """The stream service on the worker's engine (server.py); None when the port is 0 or
    cannot be had: the HTTP worker (the endpoint's jobs) goes on without it, with an error
    logged."""
    port = _env_int("FACEFLOW_GPU_GRPC_PORT", DEFAULT_PORT, 0)
    if port == 0:
        return None
    try:
        server, bound, _ = serve(lambda: worker.engine, host, port,
                                 batch=_env_int("FACEFLOW_GPU_STREAM_BATCH", 16, 1),
                                 depth=_env_int("FACEFLOW_GPU_STREAM_DEPTH", DEFAULT_DEPTH, 1),
                                 streams=_env_int("FACEFLOW_GPU_STREAMS", 64, 1))
    except OSError as exc:
        logger.error("gRPC stream service not started", extra={"reason": str(exc)})
        return None
    logger.info("gRPC stream service listening", extra={"host": host, "port": bound})
    return server


def main(argv: list[str] | None = None) -> int:
    """The stream service alone, on CPU or GPU (benchmarks, local use)."""
    import argparse
    import signal

    from faceflow.engine import Engine

    parser = argparse.ArgumentParser(prog="python -m functions.gpu.stream_server",
                                     description="faceflow's gRPC stream service without the HTTP worker")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--depth", type=int, default=DEFAULT_DEPTH)
    parser.add_argument("--providers", default=None, help="onnxruntime providers (cpu, gpu, or a comma list)")
    args = parser.parse_args(argv)
    engine = Engine(providers=args.providers)
    server, bound, service = serve(lambda: engine, args.host, args.port, batch=args.batch, depth=args.depth)
    print(f"listening on {args.host}:{bound}", flush=True)
    stopped = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopped.set())
    signal.signal(signal.SIGINT, lambda *_: stopped.set())
    stopped.wait()
    server.stop(grace=2).wait()
    service.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
