"""What the whole-stack tests do as an API client would: make a small clip of a public-domain
face, create a job and PUT its upload, poll the job until it ends."""
from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path

import av
import cv2
import numpy as np


def panning_clip(path: Path, face_bgr: np.ndarray, side: int, fps: int, frames: int, step: int,
                 gop: int | None = None) -> bytes:
    """`frames` frames of `face_bgr` (resized to side x side) rolled sideways by `step` pixels a
    frame, as H.264 (a keyframe every `gop` frames when given); the file's bytes."""
    face = cv2.resize(face_bgr, (side, side))
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = side, side, "yuv420p"
        if gop is not None:
            stream.codec_context.gop_size = gop
        for i in range(frames):
            frame = np.ascontiguousarray(np.roll(face, i * step, axis=1))
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="bgr24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path.read_bytes()


def upload_to(job: dict, body: bytes) -> None:
    """PUT `body` to the presigned upload URL of a job POST /v1/jobs created."""
    put = urllib.request.Request(job["upload"]["url"], data=body, method="PUT", headers=job["upload"]["headers"])
    with urllib.request.urlopen(put, timeout=30) as response:
        assert response.status == 200


def create_job(stack, filename: str, body: bytes, **fields) -> str:
    status, _, reply = stack.request("POST", "/v1/jobs", {"filename": filename, **fields})
    assert status == 201, reply
    job = json.loads(reply)
    upload_to(job, body)
    return job["job_id"]


def job_record(stack, job_id: str) -> dict:
    status, _, body = stack.request("GET", f"/v1/jobs/{job_id}")
    assert status == 200, body
    return json.loads(body)


def wait_for_job(stack, job_id: str, timeout: float = 240.0, until=("done", "failed")) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        job = job_record(stack, job_id)
        if job["status"] in until:
            return job
        assert time.monotonic() < deadline, f"job {job_id} still {job['status']} ({job.get('stage')}) after {timeout}s"
        time.sleep(0.5)
