"""Run the built images against the local stack, as Lambda and SageMaker would run them.

    python .ci/image_check.py --function-image IMAGE [--gpu-image IMAGE] [--photo PATH]

The stills handler runs inside the function image (its own entry point: awslambdaric and the
image's CMD) with host networking, talking to devstack's pieces started here on 127.0.0.1:
moto_server, redis-server and a Lambda Runtime API stand-in. One S3 event for a real photo
uploaded to moto is invoked; the output must be a decodable image of the same size whose face
boxes changed, with its JSON sidecar, the same faces the engine finds on this machine, and a
job recorded as done. The container must run as a non-root user and see no network interface
but loopback: .ci/image runs this script in a network namespace of its own that has only
loopback. The GPU image (its CPU variant) must load its engine and answer /ping, then run an
anonymize job from and to moto, and answer frames of a live stream over its gRPC service.

Prints one JSON line of timings at the end; exits non-zero with the reason on any failure.
"""
from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "shared")]

import cv2  # noqa: E402
import numpy as np  # noqa: E402

from devstack import RuntimeAPI, Stack, free_port  # noqa: E402
from faceflow import media  # noqa: E402

STILLS_HANDLER = "functions.stills.app.handler"
# Variables of the functions' environment that the container gets; the rest (PATH, PYTHONPATH,
# LAMBDA_TASK_ROOT, the model folder) are the image's own.
PASSED_PREFIXES = ("AWS_", "FACEFLOW_", "POWERTOOLS_")
PASSED_NAMES = ("_HANDLER", "TZ", "PYTHONUNBUFFERED")
NOT_PASSED = ("FACEFLOW_MODEL_DIR",)
FACE_CHANGE_MIN = 15.0  # mean |difference| inside the face boxes, as tests/test_functions.py asks
INIT_TIMEOUT_S = 180.0  # cold start of a container on a loaded 2-core machine
PING_TIMEOUT_S = 180.0


class CheckFailed(Exception):
    pass


def expect(condition: bool, message: str) -> None:
    if not condition:
        raise CheckFailed(message)


def default_photo() -> tuple[str, bytes]:
    """A real photo with several faces from ../shared/data, else skimage's astronaut (PD)."""
    photo = ROOT.parent / "shared" / "data" / "images" / "pyfeat_multi_face.jpg"
    if photo.is_file():
        return photo.name, photo.read_bytes()
    print(f"image check: {photo} is absent; using skimage's astronaut() (public domain)", flush=True)
    from skimage import data
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(data.astronaut(), cv2.COLOR_RGB2BGR),
                           [cv2.IMWRITE_JPEG_QUALITY, 92])
    expect(ok, "cannot encode the astronaut")
    return "astronaut.jpg", buf.tobytes()


def decode(data: bytes, what: str) -> np.ndarray:
    pixels = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    expect(pixels is not None, f"{what} does not decode")
    return pixels


def podman(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise CheckFailed(f"podman {' '.join(args[:3])}...: exit {proc.returncode}: {proc.stderr.strip()[-2000:]}")
    return proc


class Container:
    """`podman run` of an image in the foreground (so its log is ours), removed on exit."""

    def __init__(self, image: str, env: dict[str, str], log_path: Path, args: list[str] = ()):
        self.name = f"faceflow-image-check-{uuid.uuid4().hex[:8]}"
        env_args = [arg for key, value in sorted(env.items()) for arg in ("--env", f"{key}={value}")]
        # Host networking: the caller's network namespace, which has only loopback; a read-only
        # root file system with a tmpfs /tmp, as Lambda gives.
        command = ["podman", "run", "--rm", "--name", self.name, "--network=host", "--read-only",
                   *env_args, image, *args]
        self.log_path = log_path
        self._log = open(log_path, "ab")
        self.proc = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def exec(self, *command: str) -> str:
        return podman("exec", self.name, *command).stdout

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]

    def stop(self) -> None:
        if self.alive():
            podman("stop", "--time", "3", self.name, check=False, timeout=60)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            podman("kill", self.name, check=False, timeout=30)
            self.proc.wait(timeout=30)
        self._log.close()


def check_isolation(container: Container) -> dict:
    """Non-root, and no network interface but loopback inside the running container."""
    probe = ("import json, os, socket; "
             "print(json.dumps({'uid': os.getuid(), 'interfaces': [n for _, n in socket.if_nameindex()]}))")
    found = json.loads(container.exec("python3", "-c", probe).strip().splitlines()[-1])
    expect(found["uid"] != 0, f"the container runs as root: {found}")
    expect(found["interfaces"] == ["lo"], f"the container sees network interfaces beyond loopback: {found}")
    return found


def host_face_count(data: bytes, name: str) -> int:
    """Faces the engine finds in the same bytes on this machine (same code, same model bundle)."""
    from faceflow.engine import Engine
    return len(Engine().anonymize_bytes(data, source=name).report["faces"])


def function_env(stack: Stack, runtime: RuntimeAPI) -> dict[str, str]:
    env = {key: value for key, value in stack.function_env("stills", STILLS_HANDLER).items()
           if (key.startswith(PASSED_PREFIXES) or key in PASSED_NAMES) and key not in NOT_PASSED}
    env["AWS_LAMBDA_RUNTIME_API"] = runtime.address
    return env


def check_function_image(image: str, photo: tuple[str, bytes], workdir: Path, save: Path | None = None) -> dict:
    name, data = photo
    timings: dict[str, float] = {}
    with Stack(stills_handler=None, api_handler=None, workdir=workdir / "stack") as stack:
        runtime = RuntimeAPI("faceflow-stills", timeout=stack.stills_timeout, pickup_timeout=INIT_TIMEOUT_S,
                             memory_size=2048, log_path=workdir / "stills-container.log")
        runtime.start()
        container = None
        try:
            started = time.monotonic()
            container = Container(image, function_env(stack, runtime), workdir / "stills-container.log")
            try:
                runtime.wait_ready(INIT_TIMEOUT_S)
            except Exception as exc:
                raise CheckFailed(f"the function container did not start: {exc}\n{container.log_tail()}") from None
            timings["function_ready_s"] = round(time.monotonic() - started, 2)
            isolation = check_isolation(container)

            key = f"uploads/image-check/{name}"
            stack.s3.put_object(Bucket=stack.input_bucket, Key=key, Body=data, ContentType=media.media_type_for(name))
            started = time.monotonic()
            result = runtime.invoke(stack.s3_event(key))
            timings["invoke_s"] = round(time.monotonic() - started, 2)
            expect(result.ok, f"the invocation failed: {result.error}\n{container.log_tail()}")
            results = result.payload["results"]
            expect(len(results) == 1 and results[0]["status"] == "done", f"not done: {results}")
            job_id, outputs = results[0]["job_id"], results[0]["outputs"]

            bucket = stack.output_bucket
            image_key = outputs["image"].removeprefix(f"s3://{bucket}/")
            report_key = outputs["report"].removeprefix(f"s3://{bucket}/")
            out_data = stack.s3.get_object(Bucket=bucket, Key=image_key)["Body"].read()
            out = decode(out_data, "the output image")
            if save is not None:
                save.mkdir(parents=True, exist_ok=True)
                (save / Path(image_key).name).write_bytes(out_data)
            original = decode(data, "the photo")
            expect(out.shape == original.shape, f"output {out.shape} is not the photo's size {original.shape}")
            report = json.loads(stack.s3.get_object(Bucket=bucket, Key=report_key)["Body"].read())
            expect(report["job_id"] == job_id, f"sidecar of another job: {report['job_id']} != {job_id}")
            faces = report["faces"]
            expected = host_face_count(data, name)
            expect(len(faces) == expected >= 1,
                   f"the container found {len(faces)} faces, the engine here finds {expected}")
            diff = np.abs(original.astype(np.int16) - out.astype(np.int16)).mean(axis=2)
            for face in faces:
                x, y, w, h = (int(round(v)) for v in face["box"])
                inside = diff[max(0, y):y + h, max(0, x):x + w]
                expect(inside.size > 0 and inside.mean() > FACE_CHANGE_MIN,
                       f"face {face['box']} barely changed (mean |diff| {inside.mean():.1f})")

            from functions.common.jobs import JobStore
            job = JobStore.from_url(stack.redis_url, ttl_s=3600).get(job_id)
            expect(job is not None and job["status"] == "done", f"job record: {job}")
            return {**timings, "faces": len(faces), "photo": name, **{f"container_{k}": v for k, v in isolation.items()}}
        finally:
            if container is not None:
                container.stop()
            runtime.stop()


def check_gpu_image(image: str, photo: tuple[str, bytes], workdir: Path) -> dict:
    """The GPU worker's CPU variant: /ping says 200 once its engine is in; one anonymize job;
    a gRPC stream round trip."""
    name, data = photo
    timings: dict[str, float] = {}
    with Stack(stills_handler=None, api_handler=None, workdir=workdir / "gpu-stack") as stack:
        port = free_port()
        env = {key: value for key, value in stack.env.items() if key.startswith(PASSED_PREFIXES)}
        grpc_port = free_port()
        env.update(FACEFLOW_GPU_PORT=str(port), FACEFLOW_GPU_HOST="127.0.0.1", FACEFLOW_GPU_GRPC_PORT=str(grpc_port))
        started = time.monotonic()
        container = Container(image, env, workdir / "gpu-container.log")
        try:
            url = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + PING_TIMEOUT_S
            while True:
                expect(container.alive(), f"the GPU container exited\n{container.log_tail()}")
                try:
                    with urllib.request.urlopen(f"{url}/ping", timeout=5) as response:
                        if response.status == 200:
                            break
                except (urllib.error.URLError, ConnectionError, socket.timeout):
                    pass
                expect(time.monotonic() < deadline, f"no 200 from /ping after {PING_TIMEOUT_S:.0f}s\n"
                                                    f"{container.log_tail()}")
                time.sleep(0.5)
            timings["gpu_ready_s"] = round(time.monotonic() - started, 2)

            key = f"uploads/gpu-check/{name}"
            stack.s3.put_object(Bucket=stack.input_bucket, Key=key, Body=data, ContentType=media.media_type_for(name))
            output_key = f"results/gpu-check/{name}"
            job = {"job_id": "gpu-check", "operation": "anonymize", "input": f"s3://{stack.input_bucket}/{key}",
                   "output": f"s3://{stack.output_bucket}/{output_key}"}
            request = urllib.request.Request(f"{url}/invocations", data=json.dumps(job).encode(), method="POST",
                                             headers={"Content-Type": "application/json"})
            started = time.monotonic()
            try:
                with urllib.request.urlopen(request, timeout=120) as response:
                    status, body = response.status, response.read()
            except urllib.error.HTTPError as exc:
                status, body = exc.code, exc.read()
            timings["gpu_job_s"] = round(time.monotonic() - started, 2)
            expect(status == 200, f"/invocations: {status} {body[:500]!r}\n{container.log_tail()}")
            out = decode(stack.s3.get_object(Bucket=stack.output_bucket, Key=output_key)["Body"].read(),
                         "the GPU worker's output")
            expect(out.shape == decode(data, "the photo").shape, "the GPU worker's output is not the photo's size")
            report = json.loads(stack.s3.get_object(Bucket=stack.output_bucket, Key=output_key + ".json")["Body"].read())
            expect(len(report["faces"]) >= 1, f"the GPU worker found no face: {report}")
            timings["gpu_faces"] = len(report["faces"])
            started = time.monotonic()
            replies = stream_round_trip(grpc_port, data)
            timings["gpu_stream_s"] = round(time.monotonic() - started, 2)
            expect([r.get("type") for r in replies] == ["result"] * len(replies),
                   f"the gRPC stream service answered {replies}\n{container.log_tail()}")
            expect(all(r.get("faces") and r.get("jpeg") for r in replies),
                   f"a stream reply without faces or frame: {[{k: v for k, v in r.items() if k != 'jpeg'} for r in replies]}")
            timings["gpu_stream_faces"] = len(replies[-1]["faces"])
            return timings
        finally:
            container.stop()


def stream_round_trip(port: int, photo: bytes, frames: int = 3) -> list[dict]:
    """Frames of the photo (at 640 px, as a camera would send) through the GPU container's gRPC
    stream service, one at a time: each answer before the next frame goes."""
    import queue

    import grpc

    from faceflow import stream, stream_pb2_grpc
    from faceflow.streamgrpc import frame_to_proto, reply_from_proto

    image = decode(photo, "the photo")
    small = cv2.resize(image, (640, round(image.shape[0] * 640 / image.shape[1])), interpolation=cv2.INTER_AREA)
    ok, jpeg = cv2.imencode(".jpg", small, [cv2.IMWRITE_JPEG_QUALITY, 80])
    expect(ok, "cannot encode the stream frame")
    outgoing: queue.Queue = queue.Queue()

    def requests():
        while (message := outgoing.get(timeout=60)) is not None:
            yield frame_to_proto(message)

    replies = []
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        try:
            grpc.channel_ready_future(channel).result(timeout=60)
        except grpc.FutureTimeoutError:
            raise CheckFailed(f"the gRPC stream service on port {port} did not come up") from None
        answers = stream_pb2_grpc.FaceStreamStub(channel).Stream(requests(), timeout=120)
        for seq in range(frames):
            outgoing.put(stream.FrameMessage(seq=seq, timestamp=seq / 25, jpeg=jpeg.tobytes()))
            replies.append(reply_from_proto(next(answers)))
        outgoing.put(None)
        for _ in answers:  # the server closes its side once ours is closed
            pass
    return replies


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--function-image", required=True)
    parser.add_argument("--gpu-image")
    parser.add_argument("--photo", type=Path, help="a photo with faces (default: one from ../shared/data)")
    parser.add_argument("--save", type=Path, help="a folder to write the function's output image to, to look at")
    args = parser.parse_args(argv)
    photo = (args.photo.name, args.photo.read_bytes()) if args.photo else default_photo()
    interfaces = [n for _, n in socket.if_nameindex()]
    if interfaces != ["lo"]:
        print(f"image check: warning: this network namespace has {interfaces}; .ci/image runs this "
              "check in one with loopback only", flush=True)
    with tempfile.TemporaryDirectory(prefix="faceflow-image-check-") as tmp:
        workdir = Path(tmp)
        try:
            summary = check_function_image(args.function_image, photo, workdir, args.save)
            if args.gpu_image:
                summary.update(check_gpu_image(args.gpu_image, photo, workdir))
        except CheckFailed as exc:
            print(f"image check FAILED: {exc}", file=sys.stderr, flush=True)
            return 1
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
