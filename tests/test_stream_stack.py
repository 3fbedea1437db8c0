"""The stream function through the local stack: the WebSocket API stand-in in front of two
stream function processes (awslambdaric), a real Redis, loopback only. Frames are sent in
lockstep (one reply before the next frame), so consecutive frames land on alternate processes
and each test's outcome does not depend on timing. Also: the version conflict of two
environments racing (functions.stream.service against a real Redis) and the JWT authorizer
against a loopback issuer."""
from __future__ import annotations

import base64
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import cv2
import numpy as np
import pytest

from faceflow import stream
from faceflow.face import DETECTED, TRACKED
from faceflow.stream import FrameMessage

from conftest import require_services

websockets = pytest.importorskip("websockets", reason="websockets is not installed (pip install -e '.[stream]')")
from websockets.exceptions import ConnectionClosed, InvalidStatus  # noqa: E402
from websockets.sync.client import connect  # noqa: E402

import devstack  # noqa: E402

RECV_TIMEOUT_S = 60   # a cold start loads the models


@pytest.fixture(scope="module")
def scene(astronaut_bgr, engine):
    """frame(i, occluded) and the face's box on frame 0: the public-domain astronaut face
    moving 2 px a frame; occluded frames hide it under a grey block."""
    face = cv2.resize(astronaut_bgr[0:256, 96:352], (180, 180), interpolation=cv2.INTER_AREA)

    def frame(i: int, occluded: bool = False) -> np.ndarray:
        canvas = np.full((360, 640, 3), (60, 90, 40), np.uint8)
        canvas[90:270, 200 + 2 * i:380 + 2 * i] = (128, 128, 128) if occluded else face
        return canvas

    found = engine.detect(frame(0))
    assert len(found) == 1 and engine.detect(frame(5, True)) == []
    return frame, found[0].box


@pytest.fixture(scope="module")
def stack(tmp_path_factory, model_dir):
    require_services()
    with devstack.Stack(functions=("stream",), api_auth="jwt", function_env={"FACEFLOW_MODEL_DIR": str(model_dir)},
                        workdir=tmp_path_factory.mktemp("stream-stack")) as running:
        yield running


def open_stream(stack, user: str = "alice"):
    return connect(stack.websocket_url, additional_headers={"Authorization": f"Bearer {devstack.make_jwt(user)}"},
                   open_timeout=RECV_TIMEOUT_S, close_timeout=5, max_size=2 * stream.MESSAGE_LIMIT_BYTES)


def jpeg(bgr: np.ndarray, quality: int = 85) -> bytes:
    return cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, quality])[1].tobytes()


def exchange(ws, seq: int, bgr: np.ndarray | None = None, data: bytes | None = None, **options) -> dict:
    """Send one frame as a client does over API Gateway (text, in 32 KiB fragments) and read
    its reply."""
    text = stream.encode_frame(FrameMessage(seq, seq / 25, data if data is not None else jpeg(bgr), **options))
    ws.send(stream.fragments(text))
    reply = stream.decode_reply(ws.recv(timeout=RECV_TIMEOUT_S))
    assert reply.get("seq") == seq or reply["type"] == stream.ERROR, reply
    return reply


def processes_of(stack, connection_id: str) -> list[int]:
    return [d.process for d in stack.websocket_api.dispatches
            if d.connection_id == connection_id and d.route == "$default"]


def settle(stack, timeout: float = 30.0) -> None:
    """Until every invocation made so far has ended (a reply is posted before its invocation
    ends: killing an environment right after a reply would fail that invocation)."""
    deadline = time.monotonic() + timeout
    while any(d.ok is None for d in stack.websocket_api.dispatches):
        assert time.monotonic() < deadline, "invocations still running"
        time.sleep(0.05)


def only_connection(stack) -> str:
    (connection_id,) = stack.websocket_api.connections
    return connection_id


def assert_covers(face: dict, box, seq: int) -> None:
    x, y, w, h = box[0] + 2 * seq, box[1], box[2], box[3]
    fx, fy, fw, fh = face["box"]
    assert fx <= x + 10 and fy <= y + 10 and fx + fw >= x + w - 10 and fy + fh >= y + h - 10, (seq, face)


# --- through the stack ----------------------------------------------------------------------------

def test_two_function_processes_serve_the_stream(stack):
    pids = {function.pid for function in stack.stream_functions}
    assert len(stack.stream_functions) == 2 and len(pids) == 2 and None not in pids
    assert stack.functions["stream"] is stack.stream_functions[0]


def test_a_face_stays_covered_through_an_occlusion_across_two_processes(stack, scene):
    frame, box = scene
    plan = [False] * 4 + [True] * 6 + [False] * 2
    with open_stream(stack) as ws:
        connection_id = only_connection(stack)
        replies = [exchange(ws, seq, frame(seq, occluded)) for seq, occluded in enumerate(plan)]
    processes = processes_of(stack, connection_id)
    assert len(processes) == len(plan)
    assert all(a != b for a, b in zip(processes, processes[1:])), f"consecutive frames on one process: {processes}"
    tracks = set()
    for seq, (reply, occluded) in enumerate(zip(replies, plan)):
        assert reply["type"] == stream.RESULT and reply["status"] == stream.OK, reply
        assert len(reply["faces"]) == 1, (seq, reply["faces"])
        face = reply["faces"][0]
        assert face["source"] == (TRACKED if occluded else DETECTED), (seq, face)
        assert_covers(face, box, seq)
        tracks.add(face["track"])
        shown = cv2.imdecode(np.frombuffer(reply["jpeg"], np.uint8), cv2.IMREAD_COLOR)
        x, y, w, h = (int(v) for v in (box[0] + 2 * seq, box[1], box[2], box[3]))
        changed = np.abs(shown[y:y + h, x:x + w].astype(int) - frame(seq, occluded)[y:y + h, x:x + w]).max(axis=2) > 24
        assert occluded or changed.mean() > 0.5, seq  # a visible face comes back masked
    assert len(tracks) == 1, "one track across both processes"


def test_duplicate_and_out_of_order_frames(stack, scene):
    frame, _ = scene
    with open_stream(stack) as ws:
        assert exchange(ws, 0, frame(0))["status"] == stream.OK
        first = exchange(ws, 1, frame(1))
        again = exchange(ws, 1, frame(1))
        assert again["status"] == stream.DUPLICATE and again["faces"] == first["faces"]
        assert exchange(ws, 3, frame(3))["status"] == stream.OK
        late = exchange(ws, 2, frame(2, occluded=True))  # arrives after 3, its face hidden
        assert late["status"] == stream.LATE and late["faces"] and late["faces"][0]["source"] == TRACKED
        after = exchange(ws, 4, frame(4))
        assert after["status"] == stream.OK and after["faces"][0]["track"] == first["faces"][0]["track"]


def test_a_redis_restart_mid_stream_rebuilds_the_tracks_and_the_face_stays_covered(stack, scene):
    frame, box = scene
    with open_stream(stack) as ws:
        for seq in range(4):
            assert exchange(ws, seq, frame(seq))["faces"][0]["source"] == DETECTED
        stack.restart_redis()  # empty: every connection's state is gone
        replies = [exchange(ws, seq, frame(seq, occluded=True)) for seq in range(4, 9)]
    # The first frame after the restart is rebuilt from its process's last copy of the state.
    assert replies[0].get("reset") == stream.REBUILT
    for seq, reply in enumerate(replies, start=4):
        assert [f["source"] for f in reply["faces"]] == [TRACKED], (seq, reply)
        assert_covers(reply["faces"][0], box, seq)


def test_a_state_lost_everywhere_resets_clearly_and_covers_whole_frames(stack, scene):
    frame, _ = scene
    with open_stream(stack) as ws:
        for seq in range(3):
            exchange(ws, seq, frame(seq))
        settle(stack)
        for function in stack.stream_functions:   # new environments: no copy of any state
            function.kill_environment()
        stack.restart_redis()
        lost = exchange(ws, 3, frame(3, occluded=True))
        assert lost["reset"] == stream.LOST and lost["covered"] == "frame"
        shown = cv2.cvtColor(cv2.imdecode(np.frombuffer(lost["jpeg"], np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2GRAY)
        assert cv2.Laplacian(shown, cv2.CV_64F).var() < 1, "no detail left anywhere in the frame"
        visible = exchange(ws, 4, frame(4))
        assert "reset" not in visible and visible["covered"] == "frame"


def test_a_frame_too_large_is_refused_clearly(stack, scene):
    with open_stream(stack) as ws:
        # Within API Gateway's 128 KiB message but over the protocol's JPEG limit: an error reply.
        over = b"\xff\xd8" + bytes(stream.MAX_JPEG_BYTES + 100)
        reply = exchange(ws, 0, data=over)
        assert reply["type"] == stream.ERROR and reply["code"] == stream.TOO_LARGE and reply["seq"] == 0
        # Over 1080p: refused before decoding.
        reply = exchange(ws, 1, data=jpeg(np.zeros((1200, 2000, 3), np.uint8), 10))
        assert reply["code"] == stream.TOO_LARGE and "pixel limit" in reply["error"]
        assert reply["dropped"] == 2
    with open_stream(stack) as ws:
        # Over the message limit: API Gateway (the stand-in) closes the connection with 1009.
        with pytest.raises(ConnectionClosed) as closed:  # while sending, or at the next read
            ws.send(stream.fragments(json.dumps({"v": 1, "type": "frame", "pad": "x" * (stream.MESSAGE_LIMIT_BYTES + 10)})))
            ws.recv(timeout=RECV_TIMEOUT_S)
        assert closed.value.rcvd.code == 1009


def test_a_malformed_message_is_refused_clearly(stack):
    with open_stream(stack) as ws:
        ws.send("hello")
        reply = stream.decode_reply(ws.recv(timeout=RECV_TIMEOUT_S))
        assert reply["type"] == stream.ERROR and reply["code"] == stream.MALFORMED and "JSON" in reply["error"]
        ws.send(json.dumps({"v": 1, "type": "frame", "seq": 5, "timestamp": 0.2}))
        reply = stream.decode_reply(ws.recv(timeout=RECV_TIMEOUT_S))
        assert (reply["code"], reply["seq"]) == (stream.MALFORMED, 5) and "jpeg" in reply["error"]
    with open_stream(stack) as ws:
        ws.send(b"\x00\x01")  # API Gateway takes text frames only
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=RECV_TIMEOUT_S)
        assert closed.value.rcvd.code == 1003


def connects(stack) -> int:
    return sum(d.route == "$connect" for d in stack.websocket_api.dispatches)


def test_an_unauthorised_connect_is_refused_before_the_function(stack):
    before = connects(stack)
    with pytest.raises(InvalidStatus) as refused:
        connect(stack.websocket_url, open_timeout=10)
    assert refused.value.response.status_code == 401
    expired = devstack.make_jwt("alice", exp=int(time.time()) - 60)
    with pytest.raises(InvalidStatus) as refused:
        connect(stack.websocket_url, additional_headers={"Authorization": f"Bearer {expired}"}, open_timeout=10)
    assert refused.value.response.status_code == 401
    assert connects(stack) == before


def test_the_state_is_dropped_on_disconnect(stack, scene):
    frame, _ = scene
    import redis
    client = redis.Redis.from_url(stack.redis_url, decode_responses=True)
    with open_stream(stack) as ws:
        connection_id = only_connection(stack)
        exchange(ws, 0, frame(0))
        key = f"faceflow:stream:{{{connection_id}}}"
        assert 0 < client.ttl(key) <= 900
    deadline = time.monotonic() + 30
    while client.exists(key) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not client.exists(key)


# --- two environments racing, against a real Redis ------------------------------------------------

def test_a_version_conflict_between_two_environments_is_retried_from_the_newer_state(redis_server, engine, scene):
    import redis
    from functions.stream.connections import ConnectionStore
    from functions.stream.service import StreamService

    frame, _ = scene
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    other = StreamService(stream.StreamProcessor(engine), ConnectionStore(client))

    class Racing(ConnectionStore):
        """Before this environment's first write, the other one writes frame 1."""
        raced = False

        def save(self, connection_id, version, state):
            if not self.raced:
                self.raced = True
                other.message("c1", stream.encode_frame(FrameMessage(1, 0.04, jpeg(frame(1)))), lambda text: None)
            return super().save(connection_id, version, state)

    mine = StreamService(stream.StreamProcessor(engine), Racing(client))
    mine.connect("c1")
    posted = []
    handled = mine.message("c1", stream.encode_frame(FrameMessage(2, 0.08, jpeg(frame(2)))), posted.append)
    assert handled.attempts == 2 and handled.stored == "saved"
    state = ConnectionStore(client).load("c1")
    assert state.version == 2 and state.state["next_seq"] == 3 and state.state["frames"] == 2
    assert json.loads(posted[0])["status"] == stream.OK


def test_a_stale_frame_is_dropped_and_counted(redis_server, engine, scene):
    import redis
    from functions.stream.connections import ConnectionStore
    from functions.stream.service import StreamService, StreamSettings

    frame, _ = scene
    service = StreamService(stream.StreamProcessor(engine),
                            ConnectionStore(redis.Redis.from_url(redis_server.url, decode_responses=True)),
                            StreamSettings(max_age_ms=200))
    service.connect("c2")
    posted = []
    service.message("c2", stream.encode_frame(FrameMessage(0, 0.0, jpeg(frame(0)))), posted.append, waited_ms=900)
    service.message("c2", stream.encode_frame(FrameMessage(1, 0.04, jpeg(frame(1)))), posted.append, waited_ms=20)
    dropped, done = (json.loads(p) for p in posted)
    assert dropped == {"v": 1, "type": stream.DROP, "seq": 0, "reason": stream.STALE, "dropped": 1}
    assert done["status"] == stream.OK and done["dropped"] == 1


# --- the JWT authorizer -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def issuer():
    """A loopback OpenID issuer: discovery document, JWKS, and a signing function."""
    crypto = pytest.importorskip("cryptography.hazmat.primitives.asymmetric.rsa")
    jwt = pytest.importorskip("jwt")
    key = crypto.generate_private_key(public_exponent=65537, key_size=2048)
    public = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
    documents = {}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            body = json.dumps(documents.get(self.path, {})).encode()
            self.send_response(200 if self.path in documents else 404)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    url = f"http://127.0.0.1:{server.server_address[1]}"
    documents["/.well-known/openid-configuration"] = {"issuer": url, "jwks_uri": f"{url}/keys"}
    documents["/keys"] = {"keys": [{**public, "kid": "k1", "use": "sig", "alg": "RS256"}]}
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()

    def sign(claims: dict, signing_key=key) -> str:
        return jwt.encode({"iss": url, "sub": "alice", "aud": "faceflow-client", "exp": int(time.time()) + 600,
                           **claims}, signing_key, algorithm="RS256", headers={"kid": "k1"})

    yield url, sign
    server.shutdown()
    server.server_close()


def test_the_jwt_authorizer_allows_a_valid_token_and_refuses_others(issuer, monkeypatch):
    from cryptography.hazmat.primitives.asymmetric import rsa

    from functions.stream import authorizer

    url, sign = issuer
    monkeypatch.setenv("FACEFLOW_JWT_ISSUER", url)
    monkeypatch.setenv("FACEFLOW_JWT_AUDIENCE", "other,faceflow-client")
    arn = "arn:aws:execute-api:us-east-1:123456789012:a1b2c3d4e5/v1/$connect"

    def call(token: str | None):
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return authorizer.handler({"type": "REQUEST", "methodArn": arn, "headers": headers}, None)

    allowed = call(sign({"scope": "stream"}))
    assert allowed["principalId"] == "alice" and allowed["context"]["scope"] == "stream"
    assert allowed["policyDocument"]["Statement"] == [{"Action": "execute-api:Invoke", "Effect": "Allow", "Resource": arn}]
    assert call(sign({"aud": None, "client_id": "faceflow-client"}))["principalId"] == "alice"  # an access token
    stranger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    for token in (None, "not.a.jwt", sign({"exp": int(time.time()) - 120}), sign({"aud": "someone-else"}),
                  sign({"iss": "https://elsewhere.example.com"}), sign({}, signing_key=stranger),
                  base64.urlsafe_b64encode(b'{"alg":"none"}').decode() + ".e30."):
        with pytest.raises(Exception, match="^Unauthorized$"):
            call(token)


def test_the_sample_events_run_through_the_function(stack):
    """events/stream_*.json as API Gateway sends them: the reply to a connection the stand-in
    does not know is answered 410 (GoneException), which ends that connection's state."""
    import redis
    events = devstack.stack.ROOT / "events"
    client = redis.Redis.from_url(stack.redis_url, decode_responses=True)
    for name in ("stream_connect", "stream_frame"):
        event = json.loads((events / f"{name}.json").read_text())
        event["requestContext"]["requestTimeEpoch"] = int(time.time() * 1000)
        result = stack.invoke("stream", event)
        assert result.ok and result.payload == {"statusCode": 200}, result.error
        if name == "stream_connect":
            assert client.exists("faceflow:stream:{L0SM9cOFvHcCIhw=}")
    assert not client.exists("faceflow:stream:{L0SM9cOFvHcCIhw=}")
    assert "connection gone before its reply" in stack.log_text("stream")
    result = stack.invoke("stream", json.loads((events / "stream_disconnect.json").read_text()))
    assert result.ok and result.payload == {"statusCode": 200}


# --- the stand-in on its own, and the template -----------------------------------------------------

def test_the_stand_in_with_iam_auth_and_its_management_api():
    """auth="iam": an unsigned connect is 403 before any invocation, a SigV4-signed one reaches
    $connect with the caller in requestContext.identity; the @connections API answers boto3 as
    API Gateway does (GoneException for a closed connection)."""
    import boto3
    from botocore.config import Config

    events = []

    def invoke(event):
        events.append(event)
        return devstack.InvokeResult(True, payload={"statusCode": 200})

    api = devstack.WebSocketApi([invoke], auth="iam")
    api.start()
    try:
        with pytest.raises(InvalidStatus) as refused:
            connect(api.url, open_timeout=10)
        assert refused.value.response.status_code == 403 and events == []
        headers = devstack.sigv4_headers("GET", api.url.replace("ws://", "http://") + "/", access_key="AKIDALICE")
        management = boto3.client("apigatewaymanagementapi", endpoint_url=api.management_url, region_name="us-east-1",
                                  aws_access_key_id="testing", aws_secret_access_key="testing",
                                  config=Config(retries={"max_attempts": 1}))
        with connect(api.url, additional_headers={"Authorization": headers["Authorization"]}, open_timeout=10) as ws:
            (connection_id,) = api.connections
            assert events[0]["requestContext"]["routeKey"] == "$connect"
            assert events[0]["requestContext"]["identity"]["userArn"].endswith(":user/AKIDALICE")
            management.post_to_connection(ConnectionId=connection_id, Data=b'{"hello": 1}')
            assert ws.recv(timeout=10) == '{"hello": 1}'
            assert management.get_connection(ConnectionId=connection_id)["Identity"]["SourceIp"] == "127.0.0.1"
            with pytest.raises(management.exceptions.PayloadTooLargeException):
                management.post_to_connection(ConnectionId=connection_id, Data=b"x" * (stream.MESSAGE_LIMIT_BYTES + 1))
            management.delete_connection(ConnectionId=connection_id)
            with pytest.raises(ConnectionClosed):
                ws.recv(timeout=10)
        deadline = time.monotonic() + 10
        while not any(e["requestContext"]["routeKey"] == "$disconnect" for e in events):
            assert time.monotonic() < deadline, "no $disconnect"
            time.sleep(0.05)
        with pytest.raises(management.exceptions.GoneException):
            management.post_to_connection(ConnectionId=connection_id, Data=b"late")
    finally:
        api.stop()


def test_the_websocket_api_in_the_template():
    cfn_yaml = pytest.importorskip("cfnlint.decode.cfn_yaml", reason="cfn-lint is not installed")
    template = cfn_yaml.load(str(devstack.stack.ROOT / "template.yaml"))
    resources = template["Resources"]
    assert resources["WebSocketApi"]["Properties"]["ProtocolType"] == "WEBSOCKET"
    routes = {r["Properties"]["RouteKey"]: r["Properties"] for r in resources.values()
              if r["Type"] == "AWS::ApiGatewayV2::Route"}
    assert set(routes) == {"$connect", "$default", "$disconnect"}
    # $connect authorised as the HTTP API is: IAM, or the JWT authorizer
    assert routes["$connect"]["AuthorizationType"] == {"Fn::If": ["UseJwt", "CUSTOM", "AWS_IAM"]}
    assert routes["$connect"]["AuthorizerId"] == {"Fn::If": ["UseJwt", {"Ref": "WebSocketAuthorizer"},
                                                             {"Ref": "AWS::NoValue"}]}
    assert {routes[k]["AuthorizationType"] for k in ("$default", "$disconnect")} == {"NONE"}
    target = {"Fn::Sub": "integrations/${WebSocketIntegration}"}
    assert all(route["Target"] == target for route in routes.values())
    # the integration invokes the `live` alias (the one with provisioned concurrency)
    uri = json.dumps(resources["WebSocketIntegration"]["Properties"]["IntegrationUri"])
    assert "StreamFunction.Alias" in uri
    function = resources["StreamFunction"]["Properties"]
    assert function["ImageConfig"]["Command"] == ["functions.stream.app.handler"]
    assert "ProvisionedConcurrencyConfig" in function
    (statement,) = function["Policies"][0]["Statement"]
    assert statement["Action"] == ["execute-api:ManageConnections"]
    assert statement["Resource"]["Fn::Sub"].endswith(":${WebSocketApi}/${WebSocketStage}/POST/@connections/*")
    authorizer = resources["StreamAuthorizerFunction"]
    assert authorizer["Condition"] == "UseJwt" and resources["WebSocketAuthorizer"]["Condition"] == "UseJwt"
    assert authorizer["Properties"]["ImageConfig"]["Command"] == ["functions.stream.authorizer.handler"]
