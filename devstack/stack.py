"""The whole local stack: moto (S3, SQS, SNS), Redis, every function of template.yaml as an
awslambdaric process behind its Runtime API stand-in, the event deliveries (S3 → stills and
split as asynchronous invocations with retries and the on-failure destination; SQS event
source mappings for the chunk worker, the session function and the failure function; SNS →
the GPU result function), the HTTP API stand-in, and the WebSocket API stand-in in front of
the stream function (`stream_processes` processes of it).

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
from .poller import AsyncPoller, Delivery, SqsEventSource
from .procs import DevstackError
from .runtime_api import InvokeResult
from .sagemaker import AsyncEndpoint, GpuWorker
from .services import MotoServer, RedisServer, missing_tools
from .template import FunctionConfig, GetAtt, Ref, TemplateConfig
from .template import load as load_template
from .websocket_api import WebSocketApi

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
    run throwaway handlers. Timeouts, memory, S3 filters and routes default to template.yaml's.

    `functions`: the names of the functions to run (template.yaml's FunctionName without the
    stack prefix: stills, api, split, chunk-worker, session-chunk, failures, gpu-result); None
    runs every one. `handlers` and `timeouts` override a function's handler and timeout by name.
    Without a template only stills and api exist (their handlers given here)."""

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
                 wait_ready: bool = True, poll: bool = True, functions: Iterable[str] | None = None,
                 handlers: Mapping[str, str] | None = None, timeouts: Mapping[str, float] | None = None,
                 gpu: bool | None = None, stream_processes: int = 2):
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
        self.specs = self._function_specs(functions, dict(handlers or {}), dict(timeouts or {}))
        # the GPU endpoint stand-in runs with the function that takes its answers
        self.gpu = ("gpu-result" in self.specs) if gpu is None else gpu
        self.gpu_endpoint_name = "faceflow-gpu"
        self.gpu_worker: GpuWorker | None = None
        self.sagemaker: AsyncEndpoint | None = None
        self.memory_size = memory_size
        self.init_timeout = init_timeout
        self.wait_ready = wait_ready
        self.poll = poll
        # The stream function runs as this many processes behind the WebSocket API stand-in,
        # which sends consecutive messages to different ones (as Lambda may).
        self.stream_processes = max(1, stream_processes) if "stream" in self.specs else 0
        self.websocket_api: WebSocketApi | None = None
        self.stream_functions: list[LambdaFunction] = []  # functions["stream"] is the first

        logs = self.workdir / "logs"
        self.logs: dict[str, Path] = {name: logs / f"{name}.log"
                                      for name in ("moto", "redis", "stills", "api", "gpu-worker", *self.specs,
                                                   *self.stream_process_names[1:])}
        self.moto = MotoServer(self.logs["moto"])
        self.redis = RedisServer(self.workdir / "redis", self.logs["redis"])
        self.functions: dict[str, LambdaFunction] = {}
        self.poller: AsyncPoller | None = None          # S3 → stills (the deliveries tests wait for)
        self.pollers: dict[str, AsyncPoller] = {}       # every delivery, by "function:source"
        self.http_api: HttpApi | None = None
        self.queue_url = self.dlq_url = self.queue_arn = ""
        self.queues: dict[str, str] = {}                # template queue logical id → URL
        self.topics: dict[str, str] = {}                # template topic logical id → ARN
        self._clients: dict[str, Any] = {}
        self.started = False

    @property
    def stream_process_names(self) -> list[str]:
        """The stream function's processes: "stream", "stream-2", ... (their `logs` keys)."""
        return ["stream" if i == 0 else f"stream-{i + 1}" for i in range(self.stream_processes)]

    def _from_template(self, handler: str | None, attribute: str, default: Any) -> Any:
        config = self.template.functions.get(handler or "")
        value = getattr(config, attribute, None) if config is not None else None
        return value if value is not None else default

    def _memory(self, handler: str) -> int:
        return self.memory_size or self._from_template(handler, "memory_size", 2048)

    def _function_specs(self, names: Iterable[str] | None, handlers: dict[str, str],
                        timeouts: dict[str, float]) -> dict[str, FunctionConfig]:
        """The functions to run, by name, with their handler and timeout settled."""
        known = dict(self.template.lambdas)
        for name, handler, timeout in (("stills", self.stills_handler, self.stills_timeout),
                                       ("api", self.api_handler, self.api_timeout)):
            base = known.get(name) or FunctionConfig(handler or "", name=name, events=[], max_retries=2)
            if not handler:
                known.pop(name, None)
                continue
            known[name] = FunctionConfig(**{**base.__dict__, "handler": handler, "timeout": timeout, "name": name})
        wanted = list(known) if names is None else list(names)
        unknown = [n for n in wanted if n not in known]
        if unknown:
            raise DevstackError(f"no such function(s) {unknown}; known: {sorted(known)}")
        specs = {}
        for name in wanted:
            spec = FunctionConfig(**known[name].__dict__)
            if name in handlers:
                spec.handler = handlers[name]
            if name in timeouts:
                spec.timeout = float(timeouts[name])
            specs[name] = spec
        return specs

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
    def websocket_url(self) -> str | None:
        return self.websocket_api.url if self.websocket_api is not None else None

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
        if self.websocket_api is not None:
            # boto3's own variable: the stream function posts its replies to the stand-in
            env["AWS_ENDPOINT_URL_APIGATEWAYMANAGEMENTAPI"] = self.websocket_api.management_url
            env["DEVSTACK_WEBSOCKET_URL"] = self.websocket_api.url
        if self.sagemaker is not None:
            # functions/common/gpu.py submits here (template.yaml sets the name only with a GPU)
            env["FACEFLOW_GPU_ENDPOINT"] = self.gpu_endpoint_name
            env["AWS_ENDPOINT_URL_SAGEMAKER_RUNTIME"] = self.sagemaker.url
        return env

    def _resolve(self, value: object) -> str | None:
        """A template value for the local stack: a queue's URL, a topic's ARN, a parameter's
        default, a plain string; None for what has no local meaning (!Sub, !If, ...)."""
        if isinstance(value, Ref):
            if value in self.queues:
                return self.queues[value]
            if value in self.topics:
                return self.topics[value]
            return self.template.parameters.get(str(value))
        if isinstance(value, GetAtt):
            return None
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        return None

    def function_env(self, name: str, handler: str) -> dict[str, str]:
        """The environment a function process gets (AWS_LAMBDA_RUNTIME_API is added at start)."""
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(_SCRUB_PREFIXES) or k in _PASS_THROUGH}
        function_name = f"faceflow-{name}"
        pythonpath = [*self.extra_pythonpath, str(self.root), str(self.root / "shared")]
        env.update(self.env)
        spec = self.specs.get(name)
        for variable, value in (spec.variables if spec is not None else {}).items():
            resolved = self._resolve(value)
            if resolved is not None and not variable.startswith("POWERTOOLS_"):
                env[variable] = resolved
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
            if self.gpu:
                self._start_gpu()
            if self.stream_processes:
                self.websocket_api = WebSocketApi([], auth=self.api_auth, account_id=ACCOUNT_ID, region=self.region)
                self.websocket_api.start()
            for name, spec in self.specs.items():
                for process in (self.stream_process_names if name == "stream" else [name]):
                    function = LambdaFunction(f"faceflow-{name}", spec.handler,
                                              env=self.function_env(name, spec.handler), cwd=self.root,
                                              log_path=self.logs[process], timeout=spec.timeout or 30.0,
                                              pickup_timeout=self.init_timeout, memory_size=self._memory(spec.handler),
                                              region=self.region, account_id=ACCOUNT_ID)
                    if name == "stream":
                        self.stream_functions.append(function)
                    self.functions.setdefault(name, function)
                    function.start()
            if self.websocket_api is not None:
                self.websocket_api.invokers.extend(function.invoke for function in self.stream_functions)
            if "api" in self.functions:
                self.http_api = HttpApi(self.functions["api"].invoke, routes=self.api_routes, auth=self.api_auth,
                                        account_id=ACCOUNT_ID, public_routes=self.template.public_routes)
                self.http_api.start()
            self._start_deliveries()
            if self.wait_ready:
                deadline = time.monotonic() + self.init_timeout
                for function in [*self.functions.values(), *self.stream_functions[1:]]:
                    function.wait_ready(max(0.1, deadline - time.monotonic()))
                if self.gpu_worker is not None:
                    self.gpu_worker.wait_ready(max(0.1, deadline - time.monotonic()))
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop everything (safe to call twice, and after a failed start)."""
        errors = []
        steps: list[Callable[[], None]] = []
        pollers = list(self.pollers.values())
        steps.extend(poller.signal_stop for poller in pollers)
        if self.http_api is not None:
            steps.append(self.http_api.stop)
        if self.websocket_api is not None:
            steps.append(self.websocket_api.stop)
        # stopping a function fails its pending invocations, which frees the poller
        steps.extend(function.stop for function in [*self.functions.values(), *self.stream_functions[1:]])
        steps.extend((lambda poller=poller: poller.stop(timeout=15)) for poller in pollers)
        if self.sagemaker is not None:
            steps.append(self.sagemaker.stop)
        if self.gpu_worker is not None:
            steps.append(self.gpu_worker.stop)
        steps.extend([self.redis.stop, self.moto.stop])
        for step in steps:
            try:
                step()
            except Exception as exc:  # noqa: BLE001 - stop the rest regardless
                errors.append(exc)
        self.poller = None
        self.pollers = {}
        self.http_api = None
        self.websocket_api = None
        self.sagemaker = self.gpu_worker = None
        self.functions = {}
        self.stream_functions = []
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

    def _queue(self, name: str, attributes: Mapping[str, str] | None = None) -> tuple[str, str]:
        url = self.sqs.create_queue(QueueName=name, Attributes=dict(attributes or {}))["QueueUrl"]
        arn = self.sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
        return url, arn

    def _create_resources(self) -> None:
        """Buckets; template.yaml's queues (short visibility timeouts, their redrive policies)
        and topics; a queue per asynchronous trigger (S3 → function, SNS → function); the
        input bucket's notifications for the functions that run."""
        s3 = self.s3
        for bucket in (self.input_bucket, self.output_bucket):
            if self.region == "us-east-1":
                s3.create_bucket(Bucket=bucket)
            else:
                s3.create_bucket(Bucket=bucket, CreateBucketConfiguration={"LocationConstraint": self.region})
        # template.yaml's CORS rules: the page PUTs uploads and reads results from the browser
        for logical_id, bucket in (("InputBucket", self.input_bucket), ("OutputBucket", self.output_bucket)):
            if self.template.bucket_cors.get(logical_id):
                s3.put_bucket_cors(Bucket=bucket, CORSConfiguration={"CORSRules": self.template.bucket_cors[logical_id]})
        self._queue_arns: dict[str, str] = {}
        ordered = sorted(self.template.queues.values(), key=lambda q: q.dead_letter is not None)  # DLQs first
        for queue in ordered:
            attributes = {"VisibilityTimeout": str(self.visibility_timeout), "MessageRetentionPeriod": "1209600"}
            if queue.dead_letter in self._queue_arns:
                attributes["RedrivePolicy"] = json.dumps({"deadLetterTargetArn": self._queue_arns[queue.dead_letter],
                                                          "maxReceiveCount": str(queue.max_receive_count or 5)})
            url, arn = self._queue(f"faceflow-{_kebab(queue.logical_id)}", attributes)
            self.queues[queue.logical_id], self._queue_arns[queue.logical_id] = url, arn
        sns = self.client("sns") if self.template.topics else None
        for topic in self.template.topics:
            self.topics[topic] = sns.create_topic(Name=f"faceflow-{_kebab(topic)}")["TopicArn"]
        # the failed asynchronous invocations of a function without a template destination
        self.dlq_url, _ = self._queue(f"{self.queue_name}-dlq", {"MessageRetentionPeriod": "1209600"})
        stills = self.specs.get("stills")
        if stills is not None and stills.on_failure in self.queues:
            self.dlq_url = self.queues[stills.on_failure]
        configurations = []
        self._async_queues: dict[str, tuple[str, str]] = {}
        for name, spec in self.specs.items():
            s3_events = [event for event in spec.events if event.kind == "S3"]
            if not s3_events and name != "stills":
                continue
            queue_name = self.queue_name if name == "stills" else f"faceflow-{name}-s3-events"
            url, arn = self._queue(queue_name, {"VisibilityTimeout": str(self.visibility_timeout)})
            self._async_queues[name] = (url, arn)
            if name == "stills":
                self.queue_url, self.queue_arn = url, arn
                filters = self.s3_filters
            else:
                filters = [rules for event in s3_events for rules in event.filters]
            for number, rules in enumerate(filters or [{}], start=1):
                configurations.append(_queue_configuration(f"faceflow-{name}-{number}", arn, rules))
        for number, (queue, rules) in enumerate(self.template.bucket_queues, start=1):
            if queue in self._queue_arns:
                configurations.append(_queue_configuration(f"faceflow-bucket-{number}", self._queue_arns[queue], rules))
        s3.put_bucket_notification_configuration(Bucket=self.input_bucket,
                                                 NotificationConfiguration={"QueueConfigurations": configurations})

    def _start_gpu(self) -> None:
        """functions/gpu/server.py on CPU, and the SageMaker async stand-in in front of it
        (publishing on template.yaml's GPU topics)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(_SCRUB_PREFIXES) or k in _PASS_THROUGH}
        env.update(self.env)
        env.update({"PYTHONPATH": os.pathsep.join([*self.extra_pythonpath, str(self.root), str(self.root / "shared")]),
                    "PYTHONUNBUFFERED": "1", "POWERTOOLS_LOG_LEVEL": "INFO", "FACEFLOW_GPU_WORKERS": "1"})
        env.update({k: v for k, v in self.function_env_overrides.items() if k == "FACEFLOW_MODEL_DIR"})
        self.gpu_worker = GpuWorker(self.root, env, self.logs["gpu-worker"])
        self.gpu_worker.start()
        topics = {outcome: self.topics.get(topic) for outcome, topic in self.template.gpu_topics.items()}
        self.sagemaker = AsyncEndpoint(self.gpu_worker.url, s3=self.client("s3"), sns=self.client("sns"),
                                       output_bucket=self.output_bucket, success_topic=topics.get("success"),
                                       error_topic=topics.get("error"), region=self.region)
        self.sagemaker.start()

    def _start_deliveries(self) -> None:
        """One poller per event source of each running function (see devstack.poller)."""
        sqs = self.client("sqs")
        for name, spec in self.specs.items():
            function = self.functions[name]
            arn = function.runtime.function_arn
            on_failure = self.queues.get(spec.on_failure or "", self.dlq_url)
            if name in self._async_queues:
                poller = AsyncPoller(sqs, self._async_queues[name][0], function.invoke,
                                     visibility_timeout=self.visibility_timeout,
                                     max_attempts=spec.max_retries + 1 if self.template.lambdas else self.max_receive_count,
                                     on_failure_url=on_failure, function_arn=arn, name=f"{name}:s3")
                self.pollers[f"{name}:s3"] = poller
                if name == "stills":
                    self.poller = poller
            for event in spec.events:
                if event.kind == "SQS" and event.source in self.queues:
                    self.pollers[f"{name}:{event.source}"] = SqsEventSource(
                        sqs, self.queues[event.source], self._queue_arns[event.source], function.invoke,
                        batch_size=event.batch_size, report_batch_item_failures=event.report_batch_item_failures,
                        visibility_timeout=self.visibility_timeout, region=self.region, name=f"{name}:{event.source}")
                elif event.kind == "SNS" and event.source in self.topics:
                    url, queue_arn = self._queue(f"faceflow-{name}-{_kebab(event.source)}",
                                                 {"VisibilityTimeout": str(self.visibility_timeout)})
                    self.client("sns").subscribe(TopicArn=self.topics[event.source], Protocol="sqs",
                                                 Endpoint=queue_arn)
                    self.pollers[f"{name}:{event.source}"] = AsyncPoller(
                        sqs, url, function.invoke, visibility_timeout=self.visibility_timeout, kind="sns",
                        max_attempts=spec.max_retries + 1, on_failure_url=self.queues.get(spec.on_failure or ""),
                        function_arn=arn, name=f"{name}:{event.source}")
        for poller in self.pollers.values():
            if not self.poll:
                poller.pause(wait=False)
            poller.start()

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
        """Stop delivering events to the functions (the ones in hand finish)."""
        for poller in self.pollers.values():
            poller.pause(wait=wait, timeout=timeout)

    def resume_poller(self) -> None:
        for poller in self.pollers.values():
            poller.resume()

    def invoke(self, name: str, event: Any, timeout: float | None = None) -> InvokeResult:
        """Invoke a function by name (RequestResponse) and wait."""
        return self._function(name).invoke(event, timeout)

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
        """Until the stills queue is empty and no poller has anything in hand."""
        deadline = time.monotonic() + timeout
        while True:
            if self.queue_depth() == 0 and all(poller.idle for poller in self.pollers.values()):
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
        if self.websocket_api is not None:
            lines.append(f"websocket api  {self.websocket_api.url}  auth={self.api_auth} -> "
                         f"{len(self.stream_process_names)} stream processes; @connections "
                         f"{self.websocket_api.management_url}")
        for name, function in self.functions.items():
            lines.append(f"{name:<14} {function.handler}  runtime api {function.runtime.address}  "
                         f"log {function.log_path}")
        for key in self.pollers:
            lines.append(f"delivery       {key}")
        if self.sagemaker is not None:
            lines.append(f"gpu endpoint   {self.gpu_endpoint_name} (SageMaker async stand-in {self.sagemaker.url}) -> "
                         f"functions/gpu/server.py {self.gpu_worker.url}  log {self.gpu_worker.log_path}")
        return "\n".join(lines)


def _kebab(logical_id: str) -> str:
    import re
    return re.sub(r"(?<!^)(?=[A-Z])", "-", logical_id).lower()


def _queue_configuration(config_id: str, queue_arn: str, rules: Mapping[str, str]) -> dict:
    configuration = {"Id": config_id, "QueueArn": queue_arn, "Events": ["s3:ObjectCreated:*"]}
    if rules:
        configuration["Filter"] = {"Key": {"FilterRules": [{"Name": name, "Value": value}
                                                           for name, value in rules.items()]}}
    return configuration


def _record_key(record: dict) -> str:
    from urllib.parse import unquote_plus
    return unquote_plus(record.get("s3", {}).get("object", {}).get("key", ""))
