"""The video functions' own configuration (beside functions/common/settings.py's).

| variable | meaning | default |
|---|---|---|
| FACEFLOW_CHUNK_QUEUE_URL | SQS queue of `{job_id, index}` chunk messages (split sends, chunk worker reads) | required by the split function |
| FACEFLOW_CHUNK_SECONDS | target chunk length when splitting a whole video (cut on keyframes) | 2.0 |
| FACEFLOW_SESSION_TTL_S | how long an idle stream session lives in Redis (its S3 checkpoints outlive it) | 86400 |
| FACEFLOW_NOT_READY_DELAY_S | a session chunk that came too early (SQS) is retried after this, doubling per receive, at most 30 s | 2 |
| FACEFLOW_LOCK_MARGIN_MS | a chunk's lock lives for the invocation's remaining time plus this | 10000 |
| FACEFLOW_MAX_VIDEO_BYTES | largest whole video the split function reads (the API refuses larger jobs) | 4294967296 (4 GiB) |
| FACEFLOW_GPU_ENDPOINT | SageMaker async endpoint that whole videos routed to "gpu" are submitted to (functions.common.gpu) | unset: every video stays on Lambda |
| FACEFLOW_ROUTING_FILE | the routing rules (faceflow.routing) | the shipped layers/routing.json |
"""
from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class VideoSettings:
    chunk_queue_url: str | None = None
    chunk_seconds: float = 2.0
    session_ttl_s: int = 24 * 3600
    lock_margin_ms: int = 10_000
    not_ready_delay_s: float = 2.0
    max_video_bytes: int = 4 * 1024 ** 3

    @classmethod
    def from_env(cls) -> "VideoSettings":
        env = os.environ
        return cls(
            chunk_queue_url=env.get("FACEFLOW_CHUNK_QUEUE_URL") or None,
            chunk_seconds=float(env.get("FACEFLOW_CHUNK_SECONDS", cls.chunk_seconds)),
            session_ttl_s=int(env.get("FACEFLOW_SESSION_TTL_S", cls.session_ttl_s)),
            lock_margin_ms=int(env.get("FACEFLOW_LOCK_MARGIN_MS", cls.lock_margin_ms)),
            not_ready_delay_s=float(env.get("FACEFLOW_NOT_READY_DELAY_S", cls.not_ready_delay_s)),
            max_video_bytes=int(env.get("FACEFLOW_MAX_VIDEO_BYTES", cls.max_video_bytes)),
        )
