"""The HTTP API (functions/api) through devstack: moto_server, redis-server, the api and stills
functions under awslambdaric behind the HTTP API stand-in. Real processes, nothing mocked.

Bad requests are 4xx with one error shape (never a 500), the served OpenAPI document says what
the API does, and a large upload is an S3 multipart upload that survives a broken connection.
Skips with the reason when redis-server, moto_server or awslambdaric is missing.
"""
from __future__ import annotations

import io
import json
import math
import time
import urllib.parse
from pathlib import Path
import urllib.request

import numpy as np
import pytest

pytest.importorskip("awslambdaric", reason="awslambdaric not installed: pip install awslambdaric")
cv2 = pytest.importorskip("cv2")

import devstack  # noqa: E402
from devstack import Stack  # noqa: E402

from faceflow import media  # noqa: E402

MIB = 1024 * 1024
PART = 5 * MIB          # S3's smallest part, so the test sends little
THRESHOLD = 8 * MIB     # uploads from here on are multipart in this stack (100 MiB by default)
ERROR_STATUSES = {"400", "404", "409", "410", "413", "415"}
ROOT = Path(__file__).resolve().parents[1]
SAMPLE_JOB_ID = "6f1d2c3b4a5e4f60718293a4b5c6d7e8"  # the job of events/api_upload_status.json and ..._complete


@pytest.fixture(scope="module")
def stack(tmp_path_factory, model_dir):
    reason = devstack.skip_reason()
    if reason:
        pytest.skip(f"devstack cannot run here: {reason}")
    env = {"FACEFLOW_MODEL_DIR": str(model_dir), "FACEFLOW_MULTIPART_THRESHOLD_BYTES": str(THRESHOLD),
           "FACEFLOW_MULTIPART_PART_BYTES": str(PART)}
    with Stack(function_env=env, workdir=tmp_path_factory.mktemp("api-stack")) as running:
        yield running


@pytest.fixture(scope="module")
def openapi(stack) -> dict:
    status, headers, body = stack.request("GET", "/v1/openapi.json")
    assert status == 200 and headers["content-type"].startswith("application/json")
    return json.loads(body)


def post_job(stack, body) -> tuple[int, dict]:
    status, _, data = stack.request("POST", "/v1/jobs", body=body)
    return status, json.loads(data)


def assert_error(status: int, body: bytes, expected: int) -> dict:
    """The one error shape: {"message": text, "status": the HTTP status}."""
    assert status == expected, body
    error = json.loads(body)
    assert set(error) == {"message", "status"}, error
    assert error["status"] == expected and isinstance(error["message"], str) and error["message"]
    return error


def http(method: str, url: str, data: bytes | None = None, headers: dict | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    with urllib.request.urlopen(request, timeout=60) as response:
        return response.status, response.read()


def put_part(url: str, data: bytes) -> None:
    # an explicit type: moto's server stores urllib's default (form-urlencoded) bodies empty
    status, _ = http("PUT", url, data=data, headers={"Content-Type": "application/octet-stream"})
    assert status == 200


# -- bad requests are 400, not 500 -------------------------------------------------------------

def test_a_body_that_is_not_utf8_is_a_400(stack):
    status, _, body = stack.request("POST", "/v1/jobs", body=b'{"filename": "a\xff\xfe.jpg"}',
                                    headers={"Content-Type": "application/json"})
    assert "UTF-8" in assert_error(status, body, 400)["message"]


def test_deeply_nested_json_is_a_400(stack):
    nested = "[" * 100_000 + "]" * 100_000
    status, _, body = stack.request("POST", "/v1/jobs", body=nested, headers={"Content-Type": "application/json"})
    assert_error(status, body, 400)
    # and an integer past Python's digit limit
    status, _, body = stack.request("POST", "/v1/jobs", body='{"filename": "a.jpg", "size": 1' + "0" * 5000 + "}",
                                    headers={"Content-Type": "application/json"})
    assert_error(status, body, 400)


@pytest.mark.parametrize("filename,content_type", [
    ("a.jpg", "text/html"),
    ("a.jpg", "image/jpeg\r\nX-Amz-Acl: public-read"),
    ("a.jpg", "video/mp4"),           # a photo job reads images only
    ("talk.mp4", "image/jpeg"),       # and a video job videos only
    ("a.jpg", "application/octet-stream"),
])
def test_content_type_must_be_one_the_job_reads(stack, filename, content_type):
    status, _, body = stack.request("POST", "/v1/jobs", body={"filename": filename, "content_type": content_type})
    assert_error(status, body, 400)


@pytest.mark.parametrize("filename,content_type", [("a.png", "image/png"), ("a.jpg", "image/jpeg"),
                                                   ("clip.mov", "video/quicktime"), ("clip.mkv", "video/x-matroska")])
def test_a_content_type_the_job_reads_is_signed_into_the_upload(stack, filename, content_type):
    status, created = post_job(stack, {"filename": filename, "content_type": content_type})
    assert status == 201, created
    upload = created["upload"]
    assert upload["method"] == "PUT" and upload["headers"] == {"Content-Type": content_type}
    assert "content-type" in urllib.parse.unquote(upload["url"]).lower()  # signed: another type is refused


# -- one error shape, every status documented --------------------------------------------------

def test_every_error_has_one_shape(stack):
    assert_error(*post_job_raw(stack, b"{", "application/json"), 400)                  # malformed JSON
    assert_error(*post_job_raw(stack, b'{"filename": "x.exe"}', "application/json"), 400)
    assert_error(*post_job_raw(stack, b'{"filename": "x.jpg"}', "text/plain"), 415)
    status, _, body = stack.request("GET", "/v1/jobs/" + "0" * 32)
    assert_error(status, body, 404)
    status, created = post_job(stack, {"filename": "later.jpg"})
    status, _, body = stack.request("GET", f"/v1/jobs/{created['job_id']}/result")
    assert_error(status, body, 409)
    status, _, body = stack.request("GET", f"/v1/jobs/{created['job_id']}/upload")  # not a multipart job
    assert_error(status, body, 409)
    status, _, body = stack.request("POST", "/v1/jobs", body={"filename": "huge.jpg", "size": 10**9})
    assert_error(status, body, 413)
    status, _, body = stack.request("POST", "/v1/analyze", body=b"<html></html>", headers={"Content-Type": "text/html"})
    assert_error(status, body, 415)
    status, _, body = stack.request("POST", "/v1/analyze", body=b"not an image", headers={"Content-Type": "image/jpeg"})
    assert_error(status, body, 400)
    status, _, body = stack.request("POST", "/v1/anonymize?method=smudge", body=b"x",
                                    headers={"Content-Type": "image/jpeg"})
    assert_error(status, body, 400)


def post_job_raw(stack, body: bytes, content_type: str) -> tuple[int, bytes]:
    status, _, data = stack.request("POST", "/v1/jobs", body=body, headers={"Content-Type": content_type})
    return status, data


def test_openapi_documents_bodies_statuses_and_one_error_schema(stack, openapi):
    paths = openapi["paths"]
    error_ref = {"$ref": "#/components/schemas/Error"}
    assert openapi["components"]["schemas"]["Error"]["required"] == ["message"]
    assert set(openapi["components"]["schemas"]["Error"]["properties"]) == {"message", "status"}
    # every route of the template is documented, and nothing else (but the page's static files)
    documented = {(method.upper(), path.replace("{job_id}", "{id}")) for path, ops in paths.items() for method in ops}
    assert documented == {tuple(r.split(" ", 1)) for r in stack.api_routes if r not in stack.template.public_routes}
    assert stack.template.public_routes == ["GET /", "GET /static/{name}"]
    for path, operations in paths.items():
        for method, operation in operations.items():
            responses = operation["responses"]
            assert "422" not in responses, (method, path)  # validation errors are 400s
            for status in set(responses) & ERROR_STATUSES:
                assert responses[status]["content"]["application/json"]["schema"] == error_ref, (method, path, status)
            if path.startswith("/v1/jobs/{job_id}"):
                assert "404" in responses, (method, path)
    assert set(paths["/v1/jobs"]["post"]["responses"]) == {"201", "400", "413", "415"}
    assert set(paths["/v1/jobs/{job_id}/complete"]["post"]["responses"]) == {"202", "404", "409", "503"}
    for path in ("/v1/analyze", "/v1/anonymize"):
        post = paths[path]["post"]
        assert {"400", "413", "415"} <= set(post["responses"])
        body = post["requestBody"]["content"]
        assert {"image/jpeg", "image/png", "image/webp", "image/gif", "multipart/form-data"} <= set(body)
        assert body["image/jpeg"]["schema"] == {"type": "string", "format": "binary"}
    assert set(paths["/v1/anonymize"]["post"]["responses"]["200"]["content"]) == \
        {media_type for _, media_type in media.IMAGE_FORMATS.values()}
    assert "X-Faceflow-Faces" in paths["/v1/anonymize"]["post"]["responses"]["200"]["headers"]
    content_type = openapi["components"]["schemas"]["JobRequest"]["properties"]["content_type"]
    allowed = {s["const"] if "const" in s else tuple(s.get("enum", ())) for s in content_type["anyOf"]}
    assert any(isinstance(a, tuple) and "image/jpeg" in a and "text/html" not in a for a in allowed), content_type


def test_a_2xx_body_matches_its_documented_status(stack, openapi):
    status, created = post_job(stack, {"filename": "doc.jpg"})
    assert status == 201 and "201" in openapi["paths"]["/v1/jobs"]["post"]["responses"]
    assert set(created) == set(openapi["components"]["schemas"]["JobCreated"]["properties"])


# -- large uploads -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def big_png(astronaut_bgr) -> bytes:
    """A PNG of the astronaut (one face) that S3 takes in three 5 MiB parts: enlarged, with
    noise that PNG cannot squeeze."""
    image = cv2.resize(astronaut_bgr, (2560, 2560), interpolation=cv2.INTER_CUBIC)
    noise = np.random.default_rng(7).integers(-12, 13, image.shape, dtype=np.int16)
    ok, buf = cv2.imencode(".png", np.clip(image + noise, 0, 255).astype(np.uint8))
    assert ok
    data = buf.tobytes()
    assert 2 * PART < len(data) <= 3 * PART, len(data)
    return data


def test_small_uploads_stay_one_put(stack):
    status, created = post_job(stack, {"filename": "small.jpg", "size": THRESHOLD - 1})
    assert status == 201 and created["upload"]["method"] == "PUT"


def test_a_large_upload_resumes_after_a_broken_part_and_starts_the_job(stack, big_png):
    status, created = post_job(stack, {"filename": "big.png", "size": len(big_png)})
    assert status == 201, created
    job_id, upload = created["job_id"], created["upload"]
    assert upload["method"] == "multipart" and upload["part_size"] == PART
    total = math.ceil(len(big_png) / PART)
    assert upload["parts_total"] == total == 3
    assert [p["part_number"] for p in upload["parts"]] == [1, 2, 3]
    urls = {p["part_number"]: p["url"] for p in upload["parts"]}

    def part(n: int) -> bytes:
        return big_png[(n - 1) * PART:n * PART]

    put_part(urls[1], part(1)[:MIB])       # the connection broke: S3 kept a short part 1
    put_part(urls[3], part(3))
    # completing now is refused, and leaves the upload open to resume
    status, _, body = stack.request("POST", f"/v1/jobs/{job_id}/complete")
    message = assert_error(status, body, 409)["message"]
    assert "1, 2" in message
    status, _, body = stack.request("GET", f"/v1/jobs/{job_id}/upload")
    assert status == 200, body
    progress = json.loads(body)
    assert [p["part_number"] for p in progress["received"]] == [3]
    assert progress["missing"] == [1, 2]
    assert [p["part_number"] for p in progress["parts"]] == [1, 2]   # fresh URLs for those only
    fresh = {p["part_number"]: p["url"] for p in progress["parts"]}

    put_part(fresh[1], part(1))            # part 1 again, whole
    put_part(fresh[2], part(2))            # part 2, late
    status, _, body = stack.request("GET", f"/v1/jobs/{job_id}/upload")
    assert status == 200 and json.loads(body)["missing"] == []

    status, _, body = stack.request("POST", f"/v1/jobs/{job_id}/complete")
    assert status == 202, body
    assert json.loads(body)["id"] == job_id
    # a repeated completion (its answer was lost) is answered the same
    status, _, body = stack.request("POST", f"/v1/jobs/{job_id}/complete")
    assert status == 202, body
    status, _, body = stack.request("GET", f"/v1/jobs/{job_id}/upload")
    assert_error(status, body, 409)

    key = f"uploads/{job_id}/big.png"
    assert stack.s3.get_object(Bucket=stack.input_bucket, Key=key)["Body"].read() == big_png
    deadline = time.monotonic() + 120
    while True:
        status, _, body = stack.request("GET", f"/v1/jobs/{job_id}")
        job = json.loads(body)
        if job["status"] in ("done", "failed"):
            break
        assert time.monotonic() < deadline, job
        time.sleep(0.5)
    assert job["status"] == "done", job
    assert job["faces"] == 1


def test_an_aborted_upload_fails_the_job(stack):
    """The bucket's lifecycle rule aborts an upload left incomplete; the job says so."""
    status, created = post_job(stack, {"filename": "talk.mp4", "size": 3 * PART})
    assert status == 201 and created["upload"]["method"] == "multipart"
    job_id, upload_id = created["job_id"], created["upload"]["upload_id"]
    stack.s3.abort_multipart_upload(Bucket=stack.input_bucket, Key=f"uploads/{job_id}/talk.mp4", UploadId=upload_id)
    status, _, body = stack.request("GET", f"/v1/jobs/{job_id}/upload")
    assert "aborted" in assert_error(status, body, 409)["message"]
    status, _, body = stack.request("GET", f"/v1/jobs/{job_id}")
    job = json.loads(body)
    assert job["status"] == "failed" and "aborted" in job["error"]


def test_a_declared_size_over_the_limits_is_a_413(stack):
    status, _, body = stack.request("POST", "/v1/jobs", body={"filename": "huge.mp4", "size": 10_001 * PART})
    assert_error(status, body, 413)


def test_a_video_over_the_split_functions_limit_is_refused_before_its_upload(stack):
    """The split function reads at most MaxVideoBytes (4 GiB by default): a larger video is a
    413 at job creation, not a failed job after hours of uploading."""
    status, _, body = stack.request("POST", "/v1/jobs", body={"filename": "long.mp4", "size": 5 * 1024 ** 3})
    assert "over the limit of 4294967296" in assert_error(status, body, 413)["message"]


# -- found by schemathesis ---------------------------------------------------------------------

@pytest.mark.parametrize("content_type", ["multipart/form-data", "multipart/form-data; boundary=x"])
def test_an_unreadable_form_body_is_a_400(stack, content_type):
    status, _, body = stack.request("POST", "/v1/jobs", body=b'{"filename": "a.jpg"}',
                                    headers={"Content-Type": content_type})
    assert_error(status, body, 400)


def test_a_one_frame_gif_is_anonymised(stack):
    from PIL import Image
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 120, 80)).save(buffer, "GIF")
    status, headers, body = stack.request("POST", "/v1/anonymize", body=buffer.getvalue(),
                                          headers={"Content-Type": "image/gif"})
    assert status == 200, body
    assert headers["content-type"] == "image/gif" and headers["x-faceflow-faces"] == "0"
    assert Image.open(io.BytesIO(body)).size == (64, 48)


@pytest.mark.parametrize("method", ["TRACE", "QUERY"])
def test_a_method_no_route_has_is_a_404_not_a_501(stack, method):
    status, _, body = stack.request(method, "/v1/jobs")
    assert status == 404, body
    assert json.loads(body) == {"message": "Not Found"}  # API Gateway's own answer


# -- the sample events -------------------------------------------------------------------------

def test_the_sample_events_drive_a_large_upload(stack):
    """events/api_*.json, as API Gateway sends them (JWT caller): create a 2 GiB video job,
    ask which parts arrived, try to complete it too early."""
    def invoke(name: str, job_id: str | None = None) -> tuple[int, dict]:
        text = (ROOT / "events" / f"{name}.json").read_text()
        if job_id:
            text = text.replace(SAMPLE_JOB_ID, job_id)
        result = stack.invoke_api(json.loads(text))
        assert result.ok, result.error
        return result.payload["statusCode"], json.loads(result.payload["body"])

    status, created = invoke("api_create_job")
    assert status == 201, created
    upload = created["upload"]
    assert upload["method"] == "multipart" and upload["size"] == 2 * 1024**3
    assert upload["parts_total"] == math.ceil(2 * 1024**3 / PART) == len(upload["parts"])
    status, progress = invoke("api_upload_status", created["job_id"])
    assert status == 200 and progress["received"] == [] and len(progress["missing"]) == upload["parts_total"]
    status, error = invoke("api_complete_upload", created["job_id"])
    assert status == 409 and error["status"] == 409
    # the job is the JWT subject's: another caller does not see it
    assert stack.request("GET", f"/v1/jobs/{created['job_id']}")[0] == 404
