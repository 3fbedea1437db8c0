"""The whole local stack: moto (S3 + SQS), Redis, the two functions as awslambdaric processes
behind Runtime API stand-ins, the SQS → stills poller, and the HTTP API stand-in.

    with Stack() as stack:                      # real handlers from functions/, wiring from template.yaml
        stack.s3.put_object(Bucket=stack.input_bucket, Key="uploads/a.jpg", Body=data,
                            ContentType="image/jpeg")
        stack.wait_for_deliveries(1)
        status, headers, body = stack.request("GET", "/v1/jobs/...")

See devstack/README.md.
"""
from __future__ import annotations

import http.client
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping
from urllib.parse import urlsplit

from .events import s3_event
from .functions import LambdaFunction
from .http_api import HttpApi, make_jwt, sigv4_headers
from .poller import Delivery, SqsS3Poller
from .procs import DevstackError
from .runtime_api import InvokeResult
from .services import MotoServer, RedisServer, missing_tools
from .template import TemplateConfig
from .template import load as load_template

log = logging.getLogger("devstack")

ROOT = Path(__file__).resolve().parents[1]
ACCOUNT_ID = "123456789012"  # moto's default account
DUMMY_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                     "AWS_SESSION_TOKEN": "testing", "AWS_SECURITY_TOKEN": "testing"}
# variables of the parent's environment that must not leak into a function's
_SCRUB_PREFIXES = ("AWS_", "POWERTOOLS_", "FACEFLOW_", "_X_AMZN", "LAMBDA_", "_LAMBDA", "_HANDLER", "PYTHONPATH")
_PASS_THROUGH = ("FACEFLOW_MODEL_DIR",)


class Stack:
    """A local faceflow stack made of real processes; all ports are free loopback ports picked at
    start. Handlers, extra PYTHONPATH entries and extra function env are configurable so tests can
    run throwaway handlers. Timeouts, memory, S3 filters and routes default to template.yaml's."""

    def __init__(self, *, stills_handler: str | None = "functions.stills.app.handler",
                 api_handler: str | None = "functions.api.app.handler",
                 extra_pythonpath: Iterable[str | os.PathLike] = (),
                 function_env: Mapping[str, str] | None = None,
                 workdir: str | os.PathLike | None = None, root: str | os.PathLike | None = None,
                 template: str | os.PathLike | None = "template.yaml",
                 input_bucket: str = "faceflow-input", output_bucket: str = "faceflow-output",
                 queue_name: str = "faceflow-uploads", region: str = "us-east-1",
                 s3_filters: list[dict[str, str]] | str = "template",
                 api_routes: Iterable[str] | str | None = "template", api_auth: str = "none",
                 visibility_timeout: int = 2, max_receive_count: int = 3,
                 stills_timeout: float | None = None, api_timeout: float | None = None,
                 memory_size: int | None = None, init_timeout: float = 180.0,
                 wait_ready: bool = True, poll: bool = True):
        self.root = Path(root or ROOT).resolve()
        self.template_path = (self.root / template) if template is not None else None
        self.template = load_template(self.template_path) if self.template_path else TemplateConfig()
        self.stills_handler = stills_handler
        self.api_handler = api_handler
        self.extra_pythonpath = [str(Path(p).resolve()) for p in extra_pythonpath]
        self.function_env_overrides = dict(function_env or {})
        self._own_workdir = workdir is None
        self.workdir = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="faceflow-devstack-"))
        self.input_bucket = input_bucket
        self.output_bucket = output_bucket
        self.queue_name = queue_name
        self.region = region
        self.s3_filters = [dict(f) for f in (self.template.s3_filters if s3_filters == "template" else s3_filters)]
        if api_routes == "template":
            self.api_routes: list[str] | None = list(self.template.routes)
        else:
            self.api_routes = list(api_routes) if api_routes else None
        self.api_auth = api_auth
        self.visibility_timeout = visibility_timeout
        self.max_receive_count = max_receive_count
        self.stills_timeout = stills_timeout or self._from_template(stills_handler, "timeout", 120.0)
        self.api_timeout = api_timeout or self._from_template(api_handler, "timeout", 29.0)
        self.memory_size = memory_size
        self.init_timeout = init_timeout
        self.wait_ready = wait_ready
        self.poll = poll

        logs = self.workdir / "logs"
        self.logs: dict[str, Path] = {name: logs / f"{name}.log" for name in ("moto", "redis", "stills", "api")}
        self.moto = MotoServer(self.logs["moto"])
        self.redis = RedisServer(self.workdir / "redis", self.logs["redis"])
        self.functions: dict[str, LambdaFunction] = {}
        self.poller: SqsS3Poller | None = None
        self.http_api: HttpApi | None = None
        self.queue_url = self.dlq_url = self.queue_arn = ""
        self._clients: dict[str, Any] = {}
        self.started = False

    def _from_template(self, handler: str | None, attribute: str, default: Any) -> Any:
        config = self.template.functions.get(handler or "")
        value = getattr(config, attribute, None) if config is not None else None
        return value if value is not None else default

    def _memory(self, handler: str) -> int:
        return self.memory_size or self._from_template(handler, "memory_size", 2048)

    # -- endpoints -------------------------------------------------------------------------------------
    @property
    def endpoint_url(self) -> str:
        return self.moto.endpoint_url

    @property
    def redis_url(self) -> str:
        return self.redis.url

    @property
    def redis_port(self) -> int:
        return self.redis.port

    @property
    def api_url(self) -> str | None:
        return self.http_api.url if self.http_api is not None else None

    @property
    def stills_log(self) -> Path:
        return self.logs["stills"]

    @property
    def api_log(self) -> Path:
        return self.logs["api"]

    @property
    def env(self) -> dict[str, str]:
        """What a client (a test, a shell) needs to talk to the stack: boto3's endpoint and dummy
        credentials, the functions' FACEFLOW_* settings, and DEVSTACK_* endpoints."""
        env = {"AWS_ENDPOINT_URL": self.endpoint_url, **DUMMY_CREDENTIALS,
               "AWS_DEFAULT_REGION": self.region, "AWS_REGION": self.region,
               "FACEFLOW_INPUT_BUCKET": self.input_bucket, "FACEFLOW_OUTPUT_BUCKET": self.output_bucket,
               "FACEFLOW_REDIS_URL": self.redis_url, **self.template.settings,
               "DEVSTACK_QUEUE_URL": self.queue_url, "DEVSTACK_DLQ_URL": self.dlq_url,
               "DEVSTACK_WORKDIR": str(self.workdir)}
        if self.api_url:
            env["DEVSTACK_API_URL"] = self.api_url
        return env

    def function_env(self, name: str, handler: str) -> dict[str, str]:
        """The environment a function process gets (AWS_LAMBDA_RUNTIME_API is added at start)."""
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(_SCRUB_PREFIXES) or k in _PASS_THROUGH}
        function_name = f"faceflow-{name}"
        pythonpath = [*self.extra_pythonpath, str(self.root), str(self.root / "shared")]
        env.update(self.env)
        env.update({
            "AWS_LAMBDA_FUNCTION_NAME": function_name,
            "AWS_LAMBDA_FUNCTION_MEMORY_SIZE": str(self._memory(handler)),
            "AWS_LAMBDA_FUNCTION_VERSION": "$LATEST",
            "AWS_LAMBDA_LOG_GROUP_NAME": f"/aws/lambda/{function_name}",
            "AWS_LAMBDA_LOG_STREAM_NAME": f"devstack/[$LATEST]{name}",
            "AWS_LAMBDA_INITIALIZATION_TYPE": "on-demand",
            "_HANDLER": handler,
            "LAMBDA_TASK_ROOT": str(self.root),
            "PYTHONPATH": os.pathsep.join(pythonpath),
            "PYTHONUNBUFFERED": "1",
            "PYTHONDONTWRITEBYTECODE": "1",
            "TZ": ":UTC",
            "POWERTOOLS_TRACE_DISABLED": "true",
            # template.yaml's value for this handler (faceflow-stills / faceflow-api), else faceflow
            "POWERTOOLS_SERVICE_NAME": self._from_template(handler, "service_name", "faceflow"),
            "POWERTOOLS_METRICS_NAMESPACE": "faceflow",
            "POWERTOOLS_LOG_LEVEL": "INFO",
            "DEVSTACK": "1",
        })
        env.update(self.function_env_overrides)
        return env

    # -- lifecycle -------------------------------------------------------------------------------------
    def start(self) -> "Stack":
        if self.started:
            return self
        problems = missing_tools()
        if problems:
            if self._own_workdir:
                shutil.rmtree(self.workdir, ignore_errors=True)
            raise DevstackError("; ".join(problems))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.started = True
        try:
            self.moto.start()
            self.redis.start()
            self._create_resources()
            handlers = {"stills": (self.stills_handler, self.stills_timeout),
                        "api": (self.api_handler, self.api_timeout)}
            for name, (handler, timeout) in handlers.items():
                if not handler:
                    continue
                function = LambdaFunction(f"faceflow-{name}", handler, env=self.function_env(name, handler),
                                          cwd=self.root, log_path=self.logs[name], timeout=timeout,
                                          pickup_timeout=self.init_timeout, memory_size=self._memory(handler),
                                          region=self.region, account_id=ACCOUNT_ID)
                self.functions[name] = function
                function.start()
            if "api" in self.functions:
                self.http_api = HttpApi(self.functions["api"].invoke, routes=self.api_routes, auth=self.api_auth,
                                        account_id=ACCOUNT_ID)
                self.http_api.start()
            if "stills" in self.functions:
                self.poller = SqsS3Poller(self.client("sqs"), self.queue_url, self.functions["stills"].invoke,
                                          visibility_timeout=self.visibility_timeout)
                if not self.poll:
                    self.poller.pause(wait=False)
                self.poller.start()
            if self.wait_ready:
                deadline = time.monotonic() + self.init_timeout
                for function in self.functions.values():
                    function.wait_ready(max(0.1, deadline - time.monotonic()))
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop everything (safe to call twice, and after a failed start)."""
        errors = []
        steps: list[Callable[[], None]] = []
        poller = self.poller
        if poller is not None:
            steps.append(poller.signal_stop)
        if self.http_api is not None:
            steps.append(self.http_api.stop)
        # stopping a function fails its pending invocations, which frees the poller
        steps.extend(function.stop for function in self.functions.values())
        if poller is not None:
            steps.append(lambda: poller.stop(timeout=15))
        steps.extend([self.redis.stop, self.moto.stop])
        for step in steps:
            try:
                step()
            except Exception as exc:  # noqa: BLE001 - stop the rest regardless
                errors.append(exc)
        self.poller = None
        self.http_api = None
        self.functions = {}
        self._clients.clear()
        self.started = False
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)
        if errors:
            log.warning("devstack: errors while stopping: %s", errors)

    def __enter__(self) -> "Stack":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # -- AWS -------------------------------------------------------------------------------------------
    def client(self, service: str, **kwargs: Any) -> Any:
        """A boto3 client for `service` pointed at moto, with dummy credentials (cached)."""
        key = service if not kwargs else None
        if key and key in self._clients:
            return self._clients[key]
        import boto3
        from botocore.config import Config

        session = boto3.session.Session(aws_access_key_id="testing", aws_secret_access_key="testing",
                                        aws_session_token="testing", region_name=self.region)
        config = kwargs.pop("config", None) or Config(retries={"max_attempts": 2, "mode": "standard"},
                                                      connect_timeout=5, read_timeout=30)
        client = session.client(service, endpoint_url=self.endpoint_url, config=config, **kwargs)
        if key:
            self._clients[key] = client
        return client

    @property
    def s3(self) -> Any:
        return self.client("s3")

    @property
    def sqs(self) -> Any:
        return self.client("sqs")

    def _create_resources(self) -> None:
        s3, sqs = self.s3, self.sqs
        for bucket in (self.input_bucket, self.output_bucket):
            if self.region == "us-east-1":
                s3.create_bucket(Bucket=bucket)
            else:
                s3.create_bucket(Bucket=bucket, CreateBucketConfiguration={"LocationConstraint": self.region})
        self.dlq_url = sqs.create_queue(QueueName=f"{self.queue_name}-dlq",
                                        Attributes={"MessageRetentionPeriod": "1209600"})["QueueUrl"]
        dlq_arn = sqs.get_queue_attributes(QueueUrl=self.dlq_url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
        redrive = {"deadLetterTargetArn": dlq_arn, "maxReceiveCount": str(self.max_receive_count)}
        self.queue_url = sqs.create_queue(QueueName=self.queue_name, Attributes={
            "VisibilityTimeout": str(self.visibility_timeout), "RedrivePolicy": json.dumps(redrive)})["QueueUrl"]
        self.queue_arn = sqs.get_queue_attributes(QueueUrl=self.queue_url,
                                                  AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
        configurations = []
        for number, rules in enumerate(self.s3_filters or [{}], start=1):
            configuration = {"Id": f"faceflow-uploads-{number}", "QueueArn": self.queue_arn,
                             "Events": ["s3:ObjectCreated:*"]}
            if rules:
                configuration["Filter"] = {"Key": {"FilterRules": [{"Name": name, "Value": value}
                                                                   for name, value in rules.items()]}}
            configurations.append(configuration)
        s3.put_bucket_notification_configuration(Bucket=self.input_bucket,
                                                 NotificationConfiguration={"QueueConfigurations": configurations})

    def queue_depth(self, dlq: bool = False) -> int:
        """Messages in the queue (visible + in flight + delayed)."""
        attrs = self.sqs.get_queue_attributes(
            QueueUrl=self.dlq_url if dlq else self.queue_url,
            AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible",
                            "ApproximateNumberOfMessagesDelayed"])["Attributes"]
        return sum(int(v) for v in attrs.values())

    def dlq_messages(self, max_messages: int = 10) -> list[dict]:
        """Bodies (parsed) of messages in the dead-letter queue; they are left there (visibility 0)."""
        response = self.sqs.receive_message(QueueUrl=self.dlq_url, MaxNumberOfMessages=max_messages,
                                            VisibilityTimeout=0, WaitTimeSeconds=0)
        return [json.loads(m["Body"]) for m in response.get("Messages", [])]

    def s3_event(self, key: str, bucket: str | None = None, event_name: str = "ObjectCreated:Put") -> dict:
        """The S3 notification (Lambda event) for an object that is in the bucket now, as S3 would
        send it: feed it to invoke_stills() to deliver it (again)."""
        bucket = bucket or self.input_bucket
        head = self.s3.head_object(Bucket=bucket, Key=key)
        return s3_event(bucket, key, size=head["ContentLength"], etag=head["ETag"],
                        version_id=head.get("VersionId"), event_name=event_name, region=self.region)

    # -- functions ---------------------------------------------------------------------------------------
    def invoke_stills(self, event: Any, timeout: float | None = None) -> InvokeResult:
        """Invoke the stills function directly (not through the queue) and wait."""
        return self._function("stills").invoke(event, timeout)

    def invoke_api(self, event: Any, timeout: float | None = None) -> InvokeResult:
        return self._function("api").invoke(event, timeout)

    def _function(self, name: str) -> LambdaFunction:
        if name not in self.functions:
            raise DevstackError(f"the {name} function is not running in this stack")
        return self.functions[name]

    def pause_poller(self, wait: bool = True, timeout: float = 60.0) -> None:
        """Stop delivering queue messages to the stills function (the one in hand finishes)."""
        if self.poller is not None:
            self.poller.pause(wait=wait, timeout=timeout)

    def resume_poller(self) -> None:
        if self.poller is not None:
            self.poller.resume()

    @property
    def deliveries(self) -> list[Delivery]:
        return list(self.poller.deliveries) if self.poller is not None else []

    def wait_for_deliveries(self, count: int = 1, timeout: float = 60.0, outcome: str | None = "ok",
                            key: str | None = None) -> list[Delivery]:
        """Wait until `count` S3 deliveries (skipped test events excluded) with `outcome` ("ok",
        "error", or None for any) — for objects with `key` when given — have been made; returns them."""
        if self.poller is None:
            raise DevstackError("the stack has no poller (no stills function)")

        def matching(deliveries: list[Delivery]) -> list[Delivery]:
            found = [d for d in deliveries if d.outcome != "skipped" and (outcome is None or d.outcome == outcome)]
            if key is not None:
                found = [d for d in found if any(_record_key(r) == key for r in d.event["Records"])]
            return found

        return matching(self.poller.wait_for(lambda ds: len(matching(ds)) >= count, timeout))

    def wait_idle(self, timeout: float = 60.0) -> None:
        """Until the queue is empty and the poller has nothing in hand."""
        deadline = time.monotonic() + timeout
        while True:
            if self.queue_depth() == 0 and (self.poller is None or self.poller.idle):
                return
            if time.monotonic() > deadline:
                raise DevstackError(f"queue not drained after {timeout}s (depth {self.queue_depth()})")
            time.sleep(0.1)

    def restart_function(self, name: str) -> None:
        """Kill the function's environment; the next one starts (a cold start)."""
        self._function(name).kill_environment()

    # -- redis ---------------------------------------------------------------------------------------------
    def stop_redis(self) -> None:
        self.redis.stop()

    def kill_redis(self) -> None:
        self.redis.kill()

    def start_redis(self) -> None:
        """Start Redis again on the same port (empty: nothing is persisted)."""
        self.redis.start()

    def restart_redis(self) -> None:
        self.redis.stop()
        self.redis.start()

    # -- logs ------------------------------------------------------------------------------------------------
    def log_text(self, name: str) -> str:
        path = self.logs[name]
        return path.read_text(errors="replace") if path.exists() else ""

    def log_json(self, name: str) -> list[dict]:
        """The JSON-object lines of a log (Powertools logs and EMF metrics); other lines skipped."""
        records = []
        for line in self.log_text(name).splitlines():
            line = line.strip()
            if line.startswith("{"):
                try:
                    value = json.loads(line)
                except ValueError:
                    continue
                if isinstance(value, dict):
                    records.append(value)
        return records

    def metrics(self, name: str) -> list[dict]:
        """The CloudWatch EMF documents a function printed (objects with an "_aws" key)."""
        return [r for r in self.log_json(name) if "_aws" in r]

    # -- HTTP ------------------------------------------------------------------------------------------------
    def request(self, method: str, path: str, body: bytes | str | dict | None = None,
                headers: Mapping[str, str] | None = None, timeout: float = 60.0,
                user: str | None = None) -> tuple[int, dict[str, str], bytes]:
        """One HTTP request to the HTTP API stand-in: (status, headers with lower-case names and
        repeated ones joined with ", ", body). A dict body is sent as JSON. `user` authenticates
        the request as that caller when the API has auth: a JWT with sub=user ("jwt"), or a SigV4
        signature with access key id = user ("iam")."""
        if self.http_api is None:
            raise DevstackError("the stack has no HTTP API (no api function)")
        headers = dict(headers or {})
        if isinstance(body, dict):
            body = json.dumps(body)
            headers.setdefault("Content-Type", "application/json")
        if isinstance(body, str):
            body = body.encode()
        if user is not None and self.api_auth == "jwt":
            headers["Authorization"] = f"Bearer {make_jwt(user)}"
        elif user is not None and self.api_auth == "iam":
            headers = sigv4_headers(method, self.api_url + path, body or b"", headers, access_key=user,
                                    region=self.region)
        parts = urlsplit(self.api_url)
        connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
        try:
            connection.request(method, path, body=body, headers=headers)
            response = connection.getresponse()
            data = response.read()
            out: dict[str, str] = {}
            for name, value in response.getheaders():  # repeated headers (Set-Cookie) joined with ", "
                name = name.lower()
                out[name] = f"{out[name]}, {value}" if name in out else value
            return response.status, out, data
        finally:
            connection.close()

    def describe(self) -> str:
        lines = [f"workdir        {self.workdir}",
                 f"moto           {self.endpoint_url}",
                 f"redis          {self.redis_url}",
                 f"input bucket   {self.input_bucket}  (s3:ObjectCreated:* {self.s3_filters} -> {self.queue_url})",
                 f"output bucket  {self.output_bucket}",
                 f"dead letters   {self.dlq_url}"]
        if self.api_url:
            lines.append(f"http api       {self.api_url}  auth={self.api_auth} "
                         f"routes={self.api_routes or '$default'}")
        for name, function in self.functions.items():
            lines.append(f"{name:<14} {function.handler}  runtime api {function.runtime.address}  "
                         f"log {function.log_path}")
        return "\n".join(lines)


def _record_key(record: dict) -> str:
    from urllib.parse import unquote_plus
    return unquote_plus(record.get("s3", {}).get("object", {}).get("key", ""))
