"""The GPU endpoint, locally: functions/gpu/server.py (the GPU container's HTTP server) run
on CPU on loopback, behind a stand-in for SageMaker's asynchronous inference.

`AsyncEndpoint` answers InvokeEndpointAsync (POST /endpoints/{name}/async-invocations, what
boto3's sagemaker-runtime client sends when AWS_ENDPOINT_URL_SAGEMAKER_RUNTIME points here)
with 202, the InferenceId and the output and failure locations; then, in the background, as
SageMaker does: it reads the request object (InputLocation), POSTs it to the worker's
/invocations, writes the worker's answer to the output location (2xx) or the failure
location, and publishes the notification on the success or error topic, response included
(template.yaml's IncludeInferenceResponseIn). Locations are under results/_gpu/responses/ and
results/_gpu/failures/ of the output bucket, as template.yaml's OutputConfig says.
"""
from __future__ import annotations

import json
import logging
import re
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping

from .httpd import LoopbackServer, RequestHandler
from .procs import LOOPBACK, Child, DevstackError, free_port, tail

log = logging.getLogger("devstack.sagemaker")

RESPONSES_PREFIX = "results/_gpu/responses/"
FAILURES_PREFIX = "results/_gpu/failures/"
_PATH = re.compile(r"^/endpoints/(?P<name>[A-Za-z0-9-]{1,63})/async-invocations$")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class GpuWorker:
    """`python -m functions.gpu.server serve` on a free loopback port (CPU providers here)."""

    def __init__(self, root: Path, env: Mapping[str, str], log_path: Path, startup_timeout: float = 180.0):
        self.root, self.env, self.log_path, self.startup_timeout = Path(root), dict(env), Path(log_path), startup_timeout
        self.port: int | None = None
        self.grpc_port: int | None = None   # the worker's gRPC stream service
        self.child: Child | None = None

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def start(self) -> None:
        self.port, self.grpc_port = free_port(), free_port()
        argv = [sys.executable, "-m", "functions.gpu.server", "serve", "--host", LOOPBACK, "--port", str(self.port)]
        # a free port for the stream service too: its fixed default may be another stack's
        env = {**self.env, "FACEFLOW_GPU_GRPC_PORT": str(self.grpc_port)}
        self.child = Child("gpu-worker", argv, self.log_path, env=env, cwd=self.root)

    def wait_ready(self, timeout: float | None = None) -> None:
        deadline = time.monotonic() + (timeout or self.startup_timeout)
        while time.monotonic() < deadline:
            if not self.child.alive():
                raise DevstackError(f"the GPU worker exited with {self.child.poll()}:\n{tail(self.log_path)}")
            try:
                with urllib.request.urlopen(self.url + "/ping", timeout=2) as reply:
                    if reply.status == 200:
                        return
            except (OSError, urllib.error.HTTPError):
                pass
            time.sleep(0.2)
        raise DevstackError(f"the GPU worker did not answer /ping in time:\n{tail(self.log_path)}")

    def stop(self) -> None:
        if self.child is not None:
            self.child.stop()
            self.child = None


class _Handler(RequestHandler):
    """boto3's sagemaker-runtime side (the owner is the AsyncEndpoint)."""
    server_version = "devstack-sagemaker"

    def do_POST(self) -> None:  # noqa: N802
        self.read_body()  # InvokeEndpointAsync sends its input by location, not in the body
        status, headers, body = self.owner.accept(self.path, {k.lower(): v for k, v in self.headers.items()})
        self.reply(status, body, list(headers.items()))


class AsyncEndpoint:
    """SageMaker's asynchronous inference in front of one worker (see the module doc)."""

    def __init__(self, worker_url: str, *, s3: Any, sns: Any, output_bucket: str, success_topic: str | None,
                 error_topic: str | None, region: str = "us-east-1", invoke_timeout: float = 3600.0):
        self.worker_url = worker_url
        self.s3, self.sns = s3, sns
        self.output_bucket = output_bucket
        self.success_topic, self.error_topic = success_topic, error_topic
        self.region = region
        self.invoke_timeout = invoke_timeout
        self.invocations: list[dict] = []     # what was done with each request, for tests
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="sagemaker-async")
        self._server = LoopbackServer(_Handler, self, "sagemaker-async")
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        return self._server.url

    def start(self) -> None:
        self._server.start()

    def stop(self) -> None:
        self._server.stop()
        self._pool.shutdown(wait=False, cancel_futures=True)

    def accept(self, path: str, headers: Mapping[str, str]) -> tuple[int, dict[str, str], dict]:
        match = _PATH.match(path.split("?")[0])
        input_location = headers.get("x-amzn-sagemaker-inputlocation", "")
        if match is None:
            return 404, {}, {"message": f"unknown path {path[:100]}"}
        if not input_location.startswith("s3://"):
            return 400, {"x-amzn-errortype": "ValidationError"}, {"message": "InputLocation must be an s3:// URI"}
        inference_id = headers.get("x-amzn-sagemaker-inference-id") or str(uuid.uuid4())
        answer = uuid.uuid4()
        output = f"s3://{self.output_bucket}/{RESPONSES_PREFIX}{answer}.out"
        failure = f"s3://{self.output_bucket}/{FAILURES_PREFIX}{answer}-error.out"
        request = {"endpointName": match["name"], "inputLocation": input_location, "inferenceId": inference_id,
                   "contentType": headers.get("x-amzn-sagemaker-content-type", "application/json"),
                   "accept": headers.get("x-amzn-sagemaker-accept", "application/json"),
                   "receivedTime": _now(), "output": output, "failure": failure}
        self._pool.submit(self._run, request)
        return 202, {"X-Amzn-SageMaker-OutputLocation": output, "X-Amzn-SageMaker-FailureLocation": failure}, \
            {"InferenceId": inference_id}

    def _run(self, request: dict) -> None:
        try:
            bucket, key = request["inputLocation"][5:].split("/", 1)
            body = self.s3.get_object(Bucket=bucket, Key=key)["Body"].read()
            call = urllib.request.Request(self.worker_url + "/invocations", data=body, method="POST",
                                          headers={"Content-Type": request["contentType"]})
            try:
                with urllib.request.urlopen(call, timeout=self.invoke_timeout) as reply:
                    status, answer = reply.status, reply.read()
            except urllib.error.HTTPError as exc:
                status, answer = exc.code, exc.read()
        except Exception as exc:  # noqa: BLE001 - the worker is unreachable: SageMaker reports a failure
            status, answer = 500, json.dumps({"error": f"the GPU endpoint could not run the job: {exc}"}).encode()
        ok = 200 <= status < 300
        location = request["output"] if ok else request["failure"]
        bucket, key = location[5:].split("/", 1)
        self.s3.put_object(Bucket=bucket, Key=key, Body=answer, ContentType="application/json")
        note = {"awsRegion": self.region, "eventTime": _now(), "receivedTime": request["receivedTime"],
                "invocationStatus": "Completed" if ok else "Failed",
                "requestParameters": {"accept": request["accept"], "contentType": request["contentType"],
                                      "endpointName": request["endpointName"],
                                      "inputLocation": request["inputLocation"]},
                "responseParameters": {"contentType": "application/json",
                                       ("outputLocation" if ok else "failureLocation"): location},
                "responseBody": {"content": answer.decode(errors="replace"), "encoding": "JSON"},
                "inferenceId": request["inferenceId"], "eventVersion": "1.0", "eventSource": "aws:sagemaker",
                "eventName": "InferenceResult"}
        if not ok:
            kind = "ClientError: Received client error" if status < 500 else "ServerError: Received server error"
            note["failureReason"] = (f"{kind} ({status}) from primary with message \"{answer.decode(errors='replace')}\". "
                                     "See the endpoint's logs for more information.")
        topic = self.success_topic if ok else self.error_topic
        if topic:
            self.sns.publish(TopicArn=topic, Message=json.dumps(note))
        with self._lock:
            self.invocations.append({"inferenceId": request["inferenceId"], "status": status, "location": location})
