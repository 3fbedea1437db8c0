"""`faceflow serve` as a person runs it: the CLI on a free loopback port, asked over HTTP. The same
routes and OpenAPI document as the deployed API, local jobs with the same shapes, the
compatibility routes of the two services faceflow follows, and bounded requests."""
from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("aiohttp", reason="the serve extra is not installed: pip install -e '.[serve]'")
cv2 = pytest.importorskip("cv2")

from conftest import data_path  # noqa: E402
from serve_process import ServeProcess  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def serve(tmp_path_factory, model_dir):
    with ServeProcess(tmp_path_factory.mktemp("serve"), env={"FACEFLOW_MODEL_DIR": str(model_dir)}) as server:
        yield server


@pytest.fixture(scope="module")
def photo() -> bytes:
    return data_path("images", "pyfeat_multi_face.jpg").read_bytes()


def assert_error(status: int, body: bytes, expected: int) -> dict:
    assert status == expected, body[:300]
    error = json.loads(body)
    assert error["status"] == expected and error["message"], error
    return error


def multipart(field: str, filename: str, data: bytes, content_type: str = "image/jpeg") -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{field}\"; filename=\"{filename}\"\r\n"
            f"Content-Type: {content_type}\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def api_document() -> dict:
    """The deployed API's document, as functions/api/app.py --openapi prints it."""
    env = {**os.environ, "FACEFLOW_INPUT_BUCKET": "in", "FACEFLOW_OUTPUT_BUCKET": "out",
           "FACEFLOW_REDIS_URL": "redis://127.0.0.1:9", "POWERTOOLS_TRACE_DISABLED": "true",
           "POWERTOOLS_METRICS_NAMESPACE": "faceflow", "AWS_DEFAULT_REGION": "us-east-1"}
    for name in ("FACEFLOW_MULTIPART_THRESHOLD_BYTES", "FACEFLOW_MAX_SYNC_BYTES"):
        env.pop(name, None)
    out = subprocess.run([sys.executable, "-m", "functions.api.app", "--openapi"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120, check=True).stdout
    return json.loads(out)


def test_serve_and_the_deployed_api_have_the_same_document(serve):
    status, served = serve.json("GET", "/v1/openapi.json")
    assert status == 200
    deployed = api_document()
    assert set(served["paths"]) == set(deployed["paths"]) >= {"/v1/jobs", "/v1/analyze", "/v1/anonymize"}
    assert served["paths"] == deployed["paths"]
    assert served["components"] == deployed["components"]
    assert "/process" not in served["paths"] and "/" not in served["paths"]


def test_analyze_a_real_photo(serve, photo):
    status, headers, body = serve.request("POST", "/v1/analyze?attributes=gender,age", photo,
                                          {"Content-Type": "image/jpeg"})
    assert status == 200, body[:300]
    record = json.loads(body)
    assert (record["width"], record["height"]) == (1000, 667)
    assert len(record["faces"]) >= 4
    assert all("age" in face and "gender" in face for face in record["faces"])
    status, _, body = serve.request("POST", "/v1/analyze?format=rekognition&attributes=none", photo,
                                    {"Content-Type": "image/jpeg"})
    assert status == 200 and len(json.loads(body)["FaceDetails"]) == len(record["faces"])


def test_anonymize_a_real_photo_raw_and_as_a_form(serve, photo, low_engine):
    status, headers, body = serve.request("POST", "/v1/anonymize?method=pixelate", photo,
                                          {"Content-Type": "image/jpeg"})
    assert status == 200 and headers["content-type"] == "image/jpeg"
    faces = int(headers["x-faceflow-faces"])
    assert faces >= 4
    out = cv2.imdecode(np.frombuffer(body, np.uint8), cv2.IMREAD_COLOR)
    assert out.shape == (667, 1000, 3)
    assert low_engine.detect(out) == []  # every face masked
    form, content_type = multipart("file", "party.jpg", photo)
    status, headers, _ = serve.request("POST", "/v1/anonymize", form, {"Content-Type": content_type})
    assert status == 200 and int(headers["x-faceflow-faces"]) == faces


def test_the_privacy_guard_route_process(serve, photo, low_engine):
    # its clients: curl -F image=@photo.jpg http://host/process
    form, content_type = multipart("image", "photo.jpg", photo)
    status, headers, body = serve.request("POST", "/process", form, {"Content-Type": content_type})
    assert status == 200 and headers["content-type"] == "image/jpeg"
    out = cv2.imdecode(np.frombuffer(body, np.uint8), cv2.IMREAD_COLOR)
    assert out.shape == (667, 1000, 3) and low_engine.detect(out) == []
    form, content_type = multipart("image", "notes.txt", b"not an image", "text/plain")
    assert_error(*serve.request("POST", "/process", form, {"Content-Type": content_type})[::2], 400)


def test_the_face_reading_route_analyze(serve, photo):
    status, record = serve.json("POST", "/analyze", {"image": base64.b64encode(photo).decode()})
    assert status == 200, record
    assert len(record["faces"]) >= 4 and all("box" in face for face in record["faces"])
    drawn = cv2.imdecode(np.frombuffer(base64.b64decode(record["image"]), np.uint8), cv2.IMREAD_COLOR)
    original = cv2.imdecode(np.frombuffer(photo, np.uint8), cv2.IMREAD_COLOR)
    assert drawn.shape == original.shape
    x, y, w, h = (int(round(v)) for v in record["faces"][0]["box"])
    # the box is drawn in green on the photo's pixels
    assert (drawn[y, x + w // 2] == (0, 255, 0)).all() or (np.abs(drawn[y, x + w // 2].astype(int)
                                                                   - (0, 255, 0)) < 60).all()
    assert_error(*serve.request("POST", "/analyze", b'{"image": "%%%"}',
                                {"Content-Type": "application/json"})[::2], 400)
    assert_error(*serve.request("POST", "/analyze", b'{"picture": "x"}',
                                {"Content-Type": "application/json"})[::2], 400)


def test_bad_requests_are_4xx_in_the_error_shape(serve):
    assert_error(*serve.request("POST", "/v1/analyze", b"\x00not an image", {"Content-Type": "image/jpeg"})[::2], 400)
    assert_error(*serve.request("POST", "/v1/anonymize", b"<html>", {"Content-Type": "text/html"})[::2], 415)
    too_big = b"\xff" * (5 * 1024 * 1024 + 1)
    assert_error(*serve.request("POST", "/v1/anonymize", too_big, {"Content-Type": "image/jpeg"})[::2], 413)
    # over API Gateway's 10 MB: refused before the body is read
    assert_error(*serve.request("POST", "/v1/jobs", b" " * (10 * 1024 * 1024 + 1),
                                {"Content-Type": "application/json"})[::2], 413)
    assert_error(*serve.request("POST", "/v1/jobs", b"{", {"Content-Type": "application/json"})[::2], 400)
    assert_error(*serve.request("GET", "/v1/jobs/" + "0" * 32)[::2], 404)
    assert_error(*serve.request("GET", "/no/such/route")[::2], 404)
    assert serve.json("POST", "/v1/jobs", {"filename": "notes.txt"})[0] == 400
    assert serve.json("POST", "/v1/jobs", {"filename": "a.jpg", "size": 26 * 1024 * 1024})[0] == 413


def upload(serve, filename: str, data: bytes, **fields) -> dict:
    status, created = serve.json("POST", "/v1/jobs", {"filename": filename, "size": len(data), **fields})
    assert status == 201, created
    assert created["status"] == "queued" and created["upload"]["method"] == "PUT"
    target = created["upload"]
    assert target["url"].startswith(serve.url + "/")  # serve itself takes the upload
    status, _, body = serve.request("PUT", target["url"], data, target["headers"])
    assert status == 200, body
    return created


def test_a_photo_job_from_upload_to_download(serve, photo, low_engine):
    created = upload(serve, "party.jpg", photo)
    job_id = created["job_id"]
    job = serve.wait_for_job(job_id, 120)
    assert job["status"] == "done", job
    assert job["faces"] >= 4 and job["route"] == "local"
    status, links = serve.json("GET", f"/v1/jobs/{job_id}/result")
    assert status == 200 and set(links) >= {"image_url", "report_url", "expires_in"}
    status, headers, image = serve.request("GET", links["image_url"])
    assert status == 200 and headers["content-type"] == "image/jpeg"
    assert low_engine.detect(cv2.imdecode(np.frombuffer(image, np.uint8), cv2.IMREAD_COLOR)) == []
    status, headers, report = serve.request("GET", links["report_url"])
    assert status == 200 and headers["content-type"].startswith("application/json")
    assert len(json.loads(report)["faces"]) == job["faces"]
    # the input has arrived: it cannot be sent again; a multipart call is a 409 as on the API
    assert_error(*serve.request("PUT", created["upload"]["url"], photo, created["upload"]["headers"])[::2], 409)
    assert_error(*serve.request("POST", f"/v1/jobs/{job_id}/complete")[::2], 409)
    assert_error(*serve.request("GET", f"/v1/jobs/{job_id}/upload")[::2], 409)


def test_an_upload_that_is_not_what_the_job_said_is_refused(serve, photo):
    status, created = serve.json("POST", "/v1/jobs", {"filename": "party.jpg"})
    url, headers = created["upload"]["url"], created["upload"]["headers"]
    assert_error(*serve.request("PUT", url, photo, {"Content-Type": "image/png"})[::2], 400)
    assert_error(*serve.request("PUT", url, b"", headers)[::2], 400)
    assert_error(*serve.request("PUT", url.replace(created["job_id"], "f" * 32), photo, headers)[::2], 404)
    assert_error(*serve.request("GET", f"/v1/jobs/{created['job_id']}/result")[::2], 409)
    # a photo that cannot be read: the job fails with the reason, its result is gone for good
    status, _, _ = serve.request("PUT", url, b"\xff\xd8 not really a JPEG", headers)
    assert status == 200
    job = serve.wait_for_job(created["job_id"], 60)
    assert job["status"] == "failed" and "cannot" in job["error"]
    assert_error(*serve.request("GET", f"/v1/jobs/{created['job_id']}/result")[::2], 410)


def test_an_analysis_job_has_only_its_report(serve, photo):
    created = upload(serve, "party.jpg", photo, operation="analyze")
    job = serve.wait_for_job(created["job_id"], 120)
    assert job["status"] == "done" and job["operation"] == "analyze"
    status, links = serve.json("GET", f"/v1/jobs/{created['job_id']}/result")
    assert status == 200 and links.get("image_url") is None
    report = json.loads(serve.request("GET", links["report_url"])[2])
    assert len(report["faces"]) >= 4 and "age" in report["faces"][0]


@pytest.mark.slow
def test_a_video_job_reports_progress_and_gives_the_video(serve):
    clip = data_path("video", "pyfeat_WolfgangLanger_Pexels.mp4").read_bytes()
    created = upload(serve, "talk.mp4", clip)
    job = serve.wait_for_job(created["job_id"], 600)
    assert job["status"] == "done", job
    assert job["progress"]["frames_done"] == job["progress"]["frames_total"] == 472
    status, links = serve.json("GET", f"/v1/jobs/{created['job_id']}/result")
    assert status == 200 and links["video_url"].endswith(".mp4")
    # the per-frame report, as `faceflow anonymize --report` and the deployed jobs write it
    report = json.loads(serve.request("GET", links["report_url"])[2])
    assert len(report["frames"]) == 472 and report["summary"]["faces"] == job["faces"] > 0
    assert all({"frame", "time", "faces"} <= set(frame) for frame in report["frames"])
    status, headers, video = serve.request("GET", links["video_url"])
    assert status == 200 and headers["content-type"] == "video/mp4" and len(video) > 100_000
    av = pytest.importorskip("av")
    path = serve.folder / "result.mp4"
    path.write_bytes(video)
    with av.open(str(path)) as container:
        assert sum(1 for _ in container.decode(video=0)) == 472


def test_the_page_and_its_files_are_served_with_their_types(serve):
    index = ROOT / "shared" / "faceflow" / "web" / "static" / "index.html"
    if not index.exists():
        pytest.skip("the page's files are not in this checkout")
    status, headers, body = serve.request("GET", "/")
    assert status == 200 and headers["content-type"] == "text/html; charset=utf-8"
    assert "default-src 'self'" in headers["content-security-policy"]
    for name, kind in (("app.js", "text/javascript"), ("app.css", "text/css")):
        if (index.parent / name).exists():
            status, headers, _ = serve.request("GET", f"/static/{name}")
            assert status == 200 and headers["content-type"].startswith(kind)
    assert b"https://" not in body.split(b"<body")[0]  # nothing from a CDN


def test_a_busy_server_answers_503_and_a_slow_request_504(tmp_path, model_dir, photo):
    # one worker, no waiting room, 50 ms a request: the first request (loading the engine takes
    # longer) is a 504, and while its work goes on the next is a 503
    with ServeProcess(tmp_path, "--workers", "1", "--queue", "0", "--timeout", "0.05",
                      env={"FACEFLOW_MODEL_DIR": str(model_dir)}) as server:
        answers: list[int] = []

        def ask() -> None:
            answers.append(server.request("POST", "/v1/analyze", photo, {"Content-Type": "image/jpeg"})[0])
        first = threading.Thread(target=ask)
        first.start()
        first.join(timeout=60)
        status, _, body = server.request("POST", "/v1/analyze", photo, {"Content-Type": "image/jpeg"})
        assert answers == [504]
        error = assert_error(status, body, 503)
        assert "busy" in error["message"]
        # the metrics route answers meanwhile: it needs no worker
        assert server.request("GET", "/metrics")[0] == 200


def test_serve_binds_to_loopback_by_default():
    from faceflow.cli import build_parser
    args = build_parser().parse_args(["serve"])
    assert (args.host, args.port) == ("127.0.0.1", 8080)


def test_the_deployed_api_imports_stay_light():
    # the API's cold start: the shared web package brings neither serve's server, its metrics,
    # nor the engine (loaded on first use of a photo route)
    env = {**os.environ, "FACEFLOW_INPUT_BUCKET": "in", "FACEFLOW_OUTPUT_BUCKET": "out",
           "FACEFLOW_REDIS_URL": "redis://127.0.0.1:9", "POWERTOOLS_TRACE_DISABLED": "true",
           "AWS_DEFAULT_REGION": "us-east-1"}
    probe = ("import json, sys; import functions.api.app; print(json.dumps(sorted(m for m in "
             "('cv2', 'onnxruntime', 'aiohttp', 'prometheus_client', 'faceflow.engine', 'faceflow.web.serve') "
             "if m in sys.modules)))")
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=120, check=True).stdout
    assert json.loads(out) == []


def test_one_upload_at_a_time_and_a_broken_one_leaves_nothing(serve, photo):
    import socket
    status, created = serve.json("POST", "/v1/jobs", {"filename": "party.jpg"})
    url, headers = created["upload"]["url"], created["upload"]["headers"]
    path = url[len(serve.url):]
    with socket.create_connection(("127.0.0.1", serve.port), timeout=10) as connection:
        connection.sendall(f"PUT {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/jpeg\r\n"
                           f"Content-Length: {len(photo)}\r\n\r\n".encode() + photo[:len(photo) // 2])
        deadline = time.monotonic() + 30
        while serve.json("GET", f"/v1/jobs/{created['job_id']}")[1]["stage"] != "uploading":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        # a second upload while the first is under way would write the same file
        assert_error(*serve.request("PUT", url, photo, headers)[::2], 409)
    # the server notices the broken connection; then the job takes its input again
    deadline = time.monotonic() + 30
    while serve.json("GET", f"/v1/jobs/{created['job_id']}")[1]["stage"] != "awaiting upload":
        assert time.monotonic() < deadline
        time.sleep(0.1)
    folder = serve.folder / "work" / "jobs" / created["job_id"]
    assert list(folder.iterdir()) == []  # nothing half-written
    status, _, body = serve.request("PUT", url, photo, headers)
    assert status == 200, body
    assert serve.wait_for_job(created["job_id"], 120)["status"] == "done"


# -- swap jobs: two uploads, then complete, as on the deployed API ------------------------------

@pytest.fixture(scope="module")
def swap_photos(astronaut_bgr) -> dict[str, bytes]:
    """A public-domain face (skimage's astronaut) as the target, mirrored as the source, and a
    photo without a face."""
    encode = lambda bgr: cv2.imencode(".jpg", bgr)[1].tobytes()  # noqa: E731
    return {"target": encode(astronaut_bgr), "face": encode(cv2.flip(astronaut_bgr, 1)),
            "no-face": encode(np.full((240, 320, 3), 128, np.uint8))}


def create_swap(serve, filename: str, source_filename: str = "me.jpg", **fields) -> dict:
    status, created = serve.json("POST", "/v1/jobs", {"filename": filename, "operation": "swap",
                                                      "source_filename": source_filename, **fields})
    assert status == 201, created
    job_id = created["job_id"]
    assert created["complete_url"] == f"/v1/jobs/{job_id}/complete"
    for upload in (created["upload"], created["source_upload"]):  # serve itself takes both
        assert upload["method"] == "PUT" and upload["url"].startswith(serve.url + "/")
    assert created["source_upload"]["url"] != created["upload"]["url"]
    assert created["source_upload"]["headers"] == {"Content-Type": "image/jpeg"}
    return created


def put(serve, upload: dict, data: bytes) -> None:
    status, _, body = serve.request("PUT", upload["url"], data, upload["headers"])
    assert status == 200, body


def job_folder(serve, job_id: str) -> Path:
    return serve.folder / "work" / "jobs" / job_id


def test_a_photo_swap_job_waits_for_both_uploads_and_gives_the_marked_photo(serve, swap_photos):
    from PIL import Image

    from faceflow import synthetic
    created = create_swap(serve, "group.jpg", swap_options={"engine": "landmark", "largest": True})
    job_id = created["job_id"]
    # nothing starts before the completion, nor before both uploads are in (409 names the missing one)
    error = assert_error(*serve.request("POST", created["complete_url"])[::2], 409)
    assert "the target and the source face photo" in error["message"]
    put(serve, created["upload"], swap_photos["target"])
    error = assert_error(*serve.request("POST", created["complete_url"])[::2], 409)
    assert "the source face photo" in error["message"] and "the target" not in error["message"]
    status, job = serve.json("GET", f"/v1/jobs/{job_id}")
    assert status == 200 and job["status"] == "queued" and job["stage"] == "awaiting upload", job
    put(serve, created["source_upload"], swap_photos["face"])
    assert serve.json("GET", f"/v1/jobs/{job_id}")[1]["stage"] == "uploaded"
    status, job = serve.json("POST", created["complete_url"])
    assert status == 202 and job["id"] == job_id and job["operation"] == "swap", job
    # a repeated completion (its answer lost) changes nothing; the uploads cannot be sent again
    assert serve.json("POST", created["complete_url"])[0] == 202
    assert_error(*serve.request("PUT", created["source_upload"]["url"], swap_photos["face"],
                                created["source_upload"]["headers"])[::2], 409)
    job = serve.wait_for_job(job_id, 120)
    assert job["status"] == "done" and job["faces"] == 1 and job["route"] == "local", job
    status, links = serve.json("GET", f"/v1/jobs/{job_id}/result")
    assert status == 200 and links["video_url"] is None, links
    status, headers, image = serve.request("GET", links["image_url"])
    assert status == 200 and headers["content-type"] == "image/jpeg"
    report = json.loads(serve.request("GET", links["report_url"])[2])
    assert report["operation"] == "swap" and report["engine"] == "landmark" and report["swapped"] == 1
    assert report["options"]["largest"] is True
    assert report["marking"] == {"synthetic": True, "digital_source_type": synthetic.COMPOSITE_SYNTHETIC,
                                 "where": "xmp"}
    assert report["source"] == "group.jpg" and report["face_source"] == "me.jpg"
    with Image.open(io.BytesIO(image)) as picture:
        assert synthetic.COMPOSITE_SYNTHETIC in str(picture.info.get("xmp", b""))
        assert picture.size == (512, 512)
    # the face was put in: the result differs from the target where the face is
    target = cv2.imdecode(np.frombuffer(swap_photos["target"], np.uint8), cv2.IMREAD_COLOR)
    swapped = cv2.imdecode(np.frombuffer(image, np.uint8), cv2.IMREAD_COLOR)
    x, y, w, h = (int(round(v)) for v in report["faces"][0]["box"])
    assert np.abs(swapped[y:y + h, x:x + w].astype(int) - target[y:y + h, x:x + w]).mean() > 5
    # the inputs are gone; the result and its report stay
    assert sorted(p.name for p in job_folder(serve, job_id).iterdir()) == ["group-report.json", "group-swapped.jpg"]


def test_a_video_swap_job_reports_progress_and_gives_the_marked_video(serve, swap_photos, astronaut_bgr,
                                                                      tmp_path):
    av = pytest.importorskip("av")
    from faceflow import synthetic
    from stack_client import panning_clip
    frames = 24
    clip = panning_clip(tmp_path / "clip.mp4", astronaut_bgr, 256, 12, frames, 3, gop=12)
    created = create_swap(serve, "greeting.mp4", "selfie.jpg")
    put(serve, created["source_upload"], swap_photos["face"])  # in either order
    put(serve, created["upload"], clip)
    status, job = serve.json("POST", created["complete_url"])
    assert status == 202, job
    job = serve.wait_for_job(created["job_id"], 300)
    assert job["status"] == "done", job
    assert job["progress"]["frames_done"] == job["progress"]["frames_total"] == frames
    status, links = serve.json("GET", f"/v1/jobs/{created['job_id']}/result")
    assert status == 200 and links["image_url"] is None and links["video_url"].endswith("/greeting-swapped.mp4")
    status, headers, video = serve.request("GET", links["video_url"])
    assert status == 200 and headers["content-type"] == "video/mp4"
    path = tmp_path / "out.mp4"
    path.write_bytes(video)
    with av.open(str(path)) as container:
        assert container.metadata.get(synthetic.DIGITAL_SOURCE_TYPE_TAG) == synthetic.COMPOSITE_SYNTHETIC
        assert sum(1 for _ in container.decode(video=0)) == frames
    report = json.loads(serve.request("GET", links["report_url"])[2])
    assert report["operation"] == "swap" and report["face_source"] == "selfie.jpg"
    assert report["marking"]["digital_source_type"] == synthetic.COMPOSITE_SYNTHETIC
    assert report["summary"]["source"] == "greeting.mp4" and report["summary"]["output"] == "greeting-swapped.mp4"
    swapped = [f["swap"]["swapped"] for frame in report["frames"] for f in frame["faces"]]
    assert len(report["frames"]) == frames and sum(swapped) >= frames - 2, swapped


def test_a_swap_whose_source_shows_no_face_fails_with_the_reason_and_writes_nothing(serve, swap_photos):
    created = create_swap(serve, "group.jpg", "wall.jpg")
    put(serve, created["upload"], swap_photos["target"])
    put(serve, created["source_upload"], swap_photos["no-face"])
    assert serve.json("POST", created["complete_url"])[0] == 202
    job = serve.wait_for_job(created["job_id"], 120)
    assert job["status"] == "failed" and "no face found in the source photo" in job["error"], job
    error = assert_error(*serve.request("GET", f"/v1/jobs/{created['job_id']}/result")[::2], 410)
    assert "no face found in the source photo" in error["message"]
    assert list(job_folder(serve, created["job_id"]).iterdir()) == []  # no result, no report, no inputs


def test_a_swap_source_that_is_not_what_the_job_said_is_refused(serve, swap_photos, photo):
    created = create_swap(serve, "group.jpg")
    source = created["source_upload"]
    assert_error(*serve.request("PUT", source["url"], swap_photos["face"], {"Content-Type": "image/png"})[::2], 400)
    assert_error(*serve.request("PUT", source["url"], b"", source["headers"])[::2], 400)
    # another operation's job has no second upload
    status, other = serve.json("POST", "/v1/jobs", {"filename": "party.jpg"})
    assert status == 201 and other.get("source_upload") is None and other.get("complete_url") is None
    assert_error(*serve.request("PUT", other["upload"]["url"] + "/source", photo, source["headers"])[::2], 404)
    # a source that is not a photo at all: the job fails with the reason
    put(serve, created["upload"], swap_photos["target"])
    put(serve, source, b"\xff\xd8 not really a JPEG")
    assert serve.json("POST", created["complete_url"])[0] == 202
    job = serve.wait_for_job(created["job_id"], 60)
    assert job["status"] == "failed" and job["error"].startswith("the swap cannot be done:"), job
    assert list(job_folder(serve, created["job_id"]).iterdir()) == []


@pytest.mark.parametrize("fields,message", [
    ({"operation": "swap"}, "a swap needs source_filename"),
    ({"source_filename": "me.jpg"}, "are a swap's"),
    ({"operation": "analyze", "swap_options": {"largest": True}}, "are a swap's"),
    ({"operation": "swap", "source_filename": "me.mp4"}, "source_filename"),
    ({"operation": "swap", "source_filename": "me.jpg", "swap_options": {"tracks": [1]}}, "picks faces of a video"),
    ({"operation": "swap", "source_filename": "me.jpg", "swap_options": {"colour": "blue"}}, "colour"),
    ({"operation": "swap", "source_filename": "me.jpg", "swap_options": {"face_index": -1}}, "face_index"),
    ({"operation": "swap", "source_filename": "me.jpg", "swap_options": {"engine": "magic"}}, "engine"),
])
def test_swap_job_requests_are_checked(serve, fields, message):
    status, _, body = serve.request("POST", "/v1/jobs", json.dumps({"filename": "group.jpg", **fields}).encode(),
                                    {"Content-Type": "application/json"})
    assert message in assert_error(status, body, 400)["message"]


def test_a_video_swap_may_pick_tracks_but_not_also_the_largest(serve):
    fields = {"filename": "talk.mp4", "operation": "swap", "source_filename": "me.jpg"}
    assert serve.json("POST", "/v1/jobs", {**fields, "swap_options": {"tracks": [1, 2]}})[0] == 201
    status, error = serve.json("POST", "/v1/jobs", {**fields, "swap_options": {"tracks": [1], "largest": True}})
    assert status == 400 and "not both" in error["message"], error


def test_an_inswapper_swap_without_its_weights_is_refused_at_creation(serve, model_dir):
    from faceflow.inswapper import RECOGNITION_FILE, SWAPPER_FILE
    if (model_dir / SWAPPER_FILE).is_file() and (model_dir / RECOGNITION_FILE).is_file():
        pytest.skip("this model folder has the operator's INSwapper weights: the engine is available")
    status, error = serve.json("POST", "/v1/jobs", {"filename": "group.jpg", "operation": "swap",
                                                    "source_filename": "me.jpg",
                                                    "swap_options": {"engine": "inswapper"}})
    assert status == 400 and SWAPPER_FILE in error["message"] and "licence" in error["message"], error
