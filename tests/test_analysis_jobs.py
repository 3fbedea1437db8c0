"""Face analysis through the local stack (devstack: moto_server, redis-server, the api, stills
and split functions under awslambdaric): POST /v1/analyze with its attributes and formats,
API jobs with "operation": "analyze" (a photo, a video) and uploads under the analysis prefix,
which write the JSON report and no media. Nothing is mocked; skips with the reason when a
service is missing (fails in CI: see conftest)."""
from __future__ import annotations

import json
import urllib.parse
import urllib.request

import pytest

from conftest import require_services

require_services()

import cv2  # noqa: E402

from devstack import Stack  # noqa: E402
from stack_client import panning_clip, upload_to, wait_for_job  # noqa: E402
from functions.common.settings import ANALYZE_PREFIX  # noqa: E402

ERROR_KEYS = {"message", "status"}
FPS, FRAMES, SIDE = 12, 24, 384


# Low-priority videos go to the GPU endpoint (functions/gpu/server.py on CPU behind devstack's
# SageMaker stand-in); the rules see the operation.
ROUTING = {"version": 1, "rules": [
    {"name": "low-priority-analysis-on-gpu", "when": {"operation": ["analyze"], "priority": ["low"]},
     "target": "gpu"}], "default": {"target": "lambda"}}


@pytest.fixture(scope="module")
def stack(tmp_path_factory, model_dir):
    rules = tmp_path_factory.mktemp("routing") / "routing.json"
    rules.write_text(json.dumps(ROUTING))
    env = {"FACEFLOW_MODEL_DIR": str(model_dir), "FACEFLOW_ROUTING_FILE": str(rules)}
    with Stack(functions=("api", "stills", "split", "gpu-result"), function_env=env,
               workdir=tmp_path_factory.mktemp("analysis-stack")) as running:
        yield running


@pytest.fixture(scope="module")
def photo(astronaut_bgr) -> bytes:
    return cv2.imencode(".jpg", astronaut_bgr)[1].tobytes()


@pytest.fixture(scope="module")
def clip(tmp_path_factory, astronaut_bgr) -> bytes:
    """A public-domain face (skimage's astronaut) panning across 2 s of H.264."""
    return panning_clip(tmp_path_factory.mktemp("clip") / "clip.mp4", astronaut_bgr, SIDE, FPS, FRAMES, 2)


def analyze(stack, data: bytes, query: str = "") -> tuple[int, dict]:
    status, _, body = stack.request("POST", f"/v1/analyze{query}", body=data, headers={"Content-Type": "image/jpeg"})
    return status, json.loads(body)


def report_only(stack, job_id: str) -> dict:
    """The job's result: a report link and no media link, no media object in the bucket."""
    status, _, body = stack.request("GET", f"/v1/jobs/{job_id}/result")
    assert status == 200, body
    links = json.loads(body)
    assert links["image_url"] is None and links["video_url"] is None
    with urllib.request.urlopen(links["report_url"], timeout=30) as response:
        report = json.loads(response.read())
    written = stack.s3.list_objects_v2(Bucket=stack.output_bucket, Prefix=f"results/{job_id}/")
    assert [o["Key"].endswith(".json") for o in written["Contents"]] == [True], written["Contents"]
    return report


def test_analyze_route_attributes_and_formats(stack, photo):
    status, found = analyze(stack, photo)
    assert status == 200, found
    (face,) = found["faces"]
    assert face["gender"]["value"] == "female" and face["age"]["bucket"]
    assert {"pose", "quality", "eyes_open"} <= set(face) and "mesh" not in face

    status, found = analyze(stack, photo, "?attributes=age")
    (face,) = found["faces"]
    assert status == 200 and "age" in face and not {"gender", "pose", "quality"} & set(face)
    status, found = analyze(stack, photo, "?attributes=none")
    assert status == 200 and set(found["faces"][0]) == {"box", "score", "landmarks"}

    status, answer = analyze(stack, photo, "?format=rekognition")
    assert status == 200, answer
    (detail,) = answer["FaceDetails"]
    assert detail["Gender"]["Value"] == "Female" and 50 <= detail["Gender"]["Confidence"] <= 100
    assert detail["AgeRange"]["Low"] <= detail["AgeRange"]["High"]
    assert all(0 <= detail["BoundingBox"][k] <= 1 for k in ("Width", "Height", "Left", "Top"))
    assert {"Yaw", "Pitch", "Roll"} == set(detail["Pose"]) and detail["Landmarks"]

    for query in ("?attributes=age,wisdom", "?format=xml", "?attributes=" + "a," * 30):
        status, error = analyze(stack, photo, query)
        assert status == 400 and set(error) == ERROR_KEYS and error["status"] == 400, (query, error)
    status, error = analyze(stack, b"not a photo")
    assert status == 400 and set(error) == ERROR_KEYS


def test_openapi_documents_the_analysis(stack):
    status, _, body = stack.request("GET", "/v1/openapi.json")
    document = json.loads(body)
    post = document["paths"]["/v1/analyze"]["post"]
    params = {p["name"]: p for p in post["parameters"]}
    assert {"json", "rekognition"} <= set(json.dumps(params["format"]["schema"]).replace('"', " ").split())
    assert "gender" in params["attributes"]["schema"]["pattern"] and "mesh" in params["attributes"]["description"]
    ok = json.dumps(post["responses"]["200"])
    assert "FacesFound" in ok and "DetectFaces" in ok
    assert {"FacesFound", "DetectFaces"} <= set(document["components"]["schemas"])
    job = document["components"]["schemas"]["JobRequest"]["properties"]["operation"]
    assert "analyze" in json.dumps(job)


def test_photo_job_with_operation_analyze_writes_the_report_only(stack, photo):
    status, _, body = stack.request("POST", "/v1/jobs", {"filename": "team.jpg", "operation": "analyze"})
    assert status == 201, body
    created = json.loads(body)
    assert f"/{ANALYZE_PREFIX}{created['job_id']}/team.jpg" in urllib.parse.unquote(created["upload"]["url"])
    upload_to(created, photo)
    job = wait_for_job(stack, created["job_id"])
    assert job["status"] == "done" and job["operation"] == "analyze" and job["faces"] == 1, job
    report = report_only(stack, created["job_id"])
    assert report["source"] == "team.jpg" and report["faces"][0]["gender"]["value"] == "female"


def dropped(stack, key: str, body: bytes) -> str:
    """Put `key` into the input bucket; the job id its delivery to the stills function gave."""
    stack.s3.put_object(Bucket=stack.input_bucket, Key=key, Body=body, ContentType="image/jpeg")
    (delivery,) = stack.wait_for_deliveries(1, key=key, timeout=120)
    assert delivery.result.ok, delivery.result.error
    (result,) = delivery.result.payload["results"]
    return result["job_id"]


def test_upload_under_the_analysis_prefix_writes_the_report_only(stack, photo):
    job_id = dropped(stack, f"{ANALYZE_PREFIX}tenant-a/visitor 1.jpg", photo)
    job = wait_for_job(stack, job_id)
    assert job["status"] == "done" and job["operation"] == "analyze", job
    report = report_only(stack, job_id)
    assert report["faces"][0]["age"]["bucket"] and "pose" in report["faces"][0]

    # a bad file under the prefix: a failed job with the reason, nothing written
    job_id = dropped(stack, f"{ANALYZE_PREFIX}tenant-a/broken.jpg", b"not a photo")
    job = wait_for_job(stack, job_id)
    assert job["status"] == "failed" and "not an image" in job["error"], job
    assert "Contents" not in stack.s3.list_objects_v2(Bucket=stack.output_bucket, Prefix=f"results/{job_id}/")


@pytest.mark.parametrize("priority,route,stage", [(None, "default", "done"),
                                                  ("low", "low-priority-analysis-on-gpu", "gpu")])
def test_video_job_with_operation_analyze_reports_tracks(stack, clip, priority, route, stage):
    fields = {"filename": "lobby.mp4", "operation": "analyze", **({"priority": priority} if priority else {})}
    status, _, body = stack.request("POST", "/v1/jobs", fields)
    assert status == 201, body
    created = json.loads(body)
    upload_to(created, clip)
    job = wait_for_job(stack, created["job_id"], timeout=240)
    assert job["status"] == "done" and job["route"] == route and job["stage"] == stage, job
    report = report_only(stack, created["job_id"])
    assert len(report["frames"]) == FRAMES and report["summary"]["output"] is None
    (track,) = report["tracks"]
    assert track["frames"] == FRAMES and track["samples"] >= 2
    assert track["gender"]["value"] == "female" and track["age"]["bucket"]
