"""Face swap jobs through the deployed stack's parts: the job manifest under swap/ and its checks,
the GPU worker's swap descriptor, and (devstack: moto_server, redis-server, the functions under
awslambdaric, the GPU worker behind the SageMaker stand-in) photo and video swaps end to end,
split into chunks or routed to the GPU endpoint, marked as synthetic, and the failures: a bad
manifest, a source without a face. Nothing is mocked; the stack tests skip with the reason when
a service is missing (fail in CI: see conftest)."""
from __future__ import annotations

import dataclasses
import json
import urllib.request
from pathlib import Path

import pytest

from faceflow.images import BadInput
from functions.common import gpu
from functions.common.settings import SWAP_PREFIX
from functions.common.swapjobs import check_options, is_manifest_key, parse_manifest
from functions.gpu.server import JobError, parse_job

ROOT = Path(__file__).resolve().parents[1]
EVENTS = ROOT / "events"


# --- the manifest ---------------------------------------------------------------------------------

def manifest(**fields) -> bytes:
    body = {"target": f"{SWAP_PREFIX}party/group.jpg", "source": f"{SWAP_PREFIX}party/me.png"}
    body.update(fields)
    return json.dumps({k: v for k, v in body.items() if v is not None}).encode()


def test_the_example_manifest_and_its_s3_event():
    parsed = parse_manifest((EVENTS / "swap_manifest.json").read_bytes())
    assert parsed.target_kind == "video" and parsed.source.endswith(".jpg")
    assert parsed.options == {"engine": "landmark", "largest": True} and parsed.priority == "low"
    (record,) = json.loads((EVENTS / "s3_swap_manifest.json").read_text())["Records"]
    key = record["s3"]["object"]["key"]
    assert is_manifest_key(key) and key.startswith(SWAP_PREFIX)
    assert not is_manifest_key(parsed.target) and not is_manifest_key(parsed.source)


def test_a_good_manifest_round_trips():
    parsed = parse_manifest(manifest(options={"face_index": 1, "engine": "inswapper"}, sensitivity="private"))
    assert (parsed.target, parsed.source, parsed.target_kind) == ("swap/party/group.jpg", "swap/party/me.png", "image")
    assert parse_manifest(json.dumps(parsed.to_dict()).encode()) == parsed


@pytest.mark.parametrize("body,message", [
    (b"{not json", "not valid JSON"),
    (b"[]", "must be a JSON object"),
    (b"[" * 60_000, "not valid JSON"),  # deeper than the parser recurses
    (b" " * 70_000, "too large"),
    (manifest(source=None), "source is required"),
    (manifest(target=None), "target must be the key of an object"),
    (manifest(extra=1), r"unknown fields \['extra'\]"),
    (manifest(target="uploads/x/group.jpg"), "must be a key under swap/"),
    (manifest(target="swap/../uploads/group.jpg"), "must be a key under swap/"),
    (manifest(source="swap/party/me.mp4"), "source 'swap/party/me.mp4' must be a photo"),
    (manifest(source="swap/party/me.txt"), "must be a photo"),
    (manifest(target="swap/party/notes.txt"), "must be a photo or a video"),
    (manifest(target="swap/party/group.json"), "must be a photo or a video"),
    (manifest(source="swap/party/group.jpg"), "must be different objects"),
    (manifest(options=[]), "options must be a JSON object"),
    (manifest(options={"colour": 1}), r"unknown swap options \['colour'\]"),
    (manifest(options={"engine": "deepfake"}), "engine must be one of landmark, inswapper"),
    (manifest(options={"face_index": -1}), "face_index must be 0 or more"),
    (manifest(options={"face_index": True}), "face_index must be int"),
    (manifest(options={"largest": "yes"}), "largest must be bool"),
    (manifest(options={"tracks": [1]}), "tracks picks faces of a video"),
    (manifest(target="swap/a/b.mp4", options={"tracks": []}), "tracks must be a list of 1 to"),
    (manifest(target="swap/a/b.mp4", options={"tracks": ["1"]}), "tracks must be a list of 1 to"),
    (manifest(sensitivity="secret"), "sensitivity must be one of"),
    (manifest(priority="urgent"), "priority must be one of"),
])
def test_bad_manifests_are_refused_with_the_reason(body, message):
    with pytest.raises(BadInput, match=message):
        parse_manifest(body)


def test_options_are_what_faceflow_swap_takes():
    from faceflow import swap
    from faceflow.swap import SwapOptions
    from faceflow.web import api
    from functions.common.swapjobs import swap_options
    assert api.SWAP_ENGINES == swap.ENGINES  # the API names them without importing cv2
    assert set(api.SwapJobOptions.model_fields) == {f.name for f in dataclasses.fields(SwapOptions)}
    options = swap_options(check_options({"engine": "landmark", "tracks": [3, 1]}, "video"))
    assert isinstance(options, SwapOptions) and options.tracks == {1, 3}
    with pytest.raises(BadInput, match="either the largest face or tracks"):
        swap_options(check_options({"largest": True, "tracks": [1]}, "video"))


def test_a_swap_manifest_whose_retries_are_spent_fails_its_job():
    """The failure function finds the job of a manifest the split function never finished: an
    API job's own id (swap/{job_id}/manifest.json), else the id derived from the object."""
    from functions.common import failures
    from functions.common.jobs import job_id_for_object
    event = json.loads((EVENTS / "s3_swap_manifest.json").read_text())
    context = {"functionArn": "arn:aws:lambda:us-east-1:123456789012:function:ff-split:live",
               "condition": "RetriesExhausted", "approximateInvokeCount": 3}
    timed_out = {"errorType": "Sandbox.Timedout", "errorMessage": "Task timed out after 900.00 seconds"}
    record = {"requestContext": context, "requestPayload": event, "responsePayload": timed_out}
    (failure,) = failures.from_destination_record(record)
    s3 = event["Records"][0]["s3"]
    assert failure.job_id == job_id_for_object(s3["bucket"]["name"], s3["object"]["key"], s3["object"]["versionId"])
    assert failure.reason.startswith("processing failed after 3 attempts: timed out after 900 s")
    api_job = "4f9c2a7e1b3d4c5a8e6f7a9b0c1d2e3f"
    s3["object"]["key"] = f"{SWAP_PREFIX}{api_job}/manifest.json"
    (failure,) = failures.from_destination_record(record)
    assert failure.job_id == api_job


# --- the GPU worker's descriptor ------------------------------------------------------------------

def swap_descriptor(**overrides) -> bytes:
    body = {"job_id": "j1", "operation": "swap", "input": "s3://in-b/swap/j1/clip.mp4",
            "source": "s3://in-b/swap/j1/me.jpg", "output": "s3://out-b/results/j1/clip.mp4",
            "options": {"engine": "landmark", "largest": True, "batch": 8}}
    body.update(overrides)
    return json.dumps({k: v for k, v in body.items() if v is not None}).encode()


def test_a_swap_descriptor_is_what_submit_writes_and_the_worker_takes():
    request = gpu.build_request("j1", "s3://in-b/swap/j1/clip.mp4", "s3://out-b/results/j1/clip.mp4",
                                operation="swap", options={"largest": True}, source_uri="s3://in-b/swap/j1/me.jpg")
    job = parse_job(json.dumps(request).encode())
    assert job.source == ("in-b", "swap/j1/me.jpg") and job.report == ("out-b", "results/j1/clip.mp4.json")
    assert parse_job(swap_descriptor()).options["largest"] is True


@pytest.mark.parametrize("body,message", [
    (swap_descriptor(source=None), "a swap needs source"),
    (swap_descriptor(operation="anonymize"), "only a swap takes one"),
    (swap_descriptor(source="https://example.com/me.jpg"), "source 'https://example.com/me.jpg' is not an s3"),
    (swap_descriptor(output=None), "output is required for swap"),
    (swap_descriptor(report="s3://in-b/swap/j1/me.jpg"), "must not overwrite the input or the source"),
    (swap_descriptor(options={"method": "blur"}), r"options \['method'\] are not a swap's"),
    (swap_descriptor(options={"engine": "faceapp"}), "bad options: unknown swap engine"),
    (swap_descriptor(options={"largest": True, "tracks": [1]}), "bad options: choose either"),
    (swap_descriptor(options={"tracks": "1"}), "option tracks must be a list"),
])
def test_bad_swap_descriptors_are_refused(body, message):
    with pytest.raises(JobError, match=message) as info:
        parse_job(body)
    assert info.value.status == 400


def test_only_swaps_name_a_source_and_swap_options_are_a_swaps():
    with pytest.raises(gpu.GpuError, match="a swap, and only a swap, names a source"):
        gpu.build_request("j1", "s3://in-b/uploads/j1/a.jpg", "s3://out-b/r/a.jpg", source_uri="s3://in-b/swap/me.jpg")
    with pytest.raises(JobError, match=r"options \['largest'\] are a swap's only"):
        parse_job(json.dumps({"job_id": "j1", "input": "s3://in-b/uploads/j1/a.jpg", "output": "s3://out-b/r/a.jpg",
                              "options": {"largest": True}}).encode())


# --- chunks: the mark survives the merge ----------------------------------------------------------

def test_a_chunked_swap_keeps_its_synthetic_mark_through_the_merge(tmp_path, engine, astronaut_bgr):
    """Chunks swapped apart (as the chunk workers do) and joined without re-encoding: the whole
    carries the chunks' container tags; anonymised chunks join into a file without them."""
    import av
    import cv2

    from faceflow import chunks, synthetic
    from stack_client import panning_clip
    clip = tmp_path / "clip.mp4"
    panning_clip(clip, astronaut_bgr, 256, 12, 24, 3, gop=6)
    split = chunks.split_video(clip, tmp_path / "in", target_seconds=0.5)
    assert len(split.chunks) >= 2
    face = cv2.imencode(".jpg", cv2.flip(astronaut_bgr, 1))[1].tobytes()
    prepared = engine.swap_operation(face)
    for name, operation in (("swapped", lambda: engine.swap_operation(prepared, fps=split.info["fps"])),
                            ("masked", lambda: None)):
        outs = []
        for chunk in split.chunks:
            outs.append(tmp_path / name / f"{chunk.index}.mp4")
            chunks.process_chunk(engine, chunk, outs[-1], info=split.info, operation=operation())
        merged = tmp_path / f"{name}.mp4"
        chunks.merge_chunks(outs, merged, info=split.info)
        with av.open(str(outs[0])) as first, av.open(str(merged)) as whole:
            frames = sum(1 for _ in whole.decode(video=0))
            tags = dict(whole.metadata)
            chunk_tags = dict(first.metadata)
        assert frames == 24
        if name == "swapped":
            assert chunk_tags.get(synthetic.DIGITAL_SOURCE_TYPE_TAG) == synthetic.COMPOSITE_SYNTHETIC
            assert tags.get(synthetic.DIGITAL_SOURCE_TYPE_TAG) == synthetic.COMPOSITE_SYNTHETIC
            assert "synthetic" in tags.get(synthetic.COMMENT_TAG, "")
        else:
            assert synthetic.DIGITAL_SOURCE_TYPE_TAG not in tags and synthetic.COMMENT_TAG not in tags


# --- through the local stack ----------------------------------------------------------------------

FPS, FRAMES, SIDE = 12, 24, 256   # 2 s at one keyframe a second: 2 chunks of 1 s
SYNC_LIMIT = 1024 * 1024          # POST /v1/swap's body limit here (below what the API stand-in takes)
# Low-priority swaps go to the GPU endpoint (functions/gpu/server.py on CPU behind devstack's
# SageMaker stand-in); no rule here keeps private media off it: faceflow.routing does.
ROUTING = {"version": 1, "rules": [
    {"name": "low-priority-swap-on-gpu", "when": {"operation": ["swap"], "priority": ["low"]}, "target": "gpu"}],
    "default": {"target": "lambda"}}


@pytest.fixture(scope="module")
def stack(tmp_path_factory, model_dir):
    from conftest import require_services
    require_services()
    from devstack import Stack
    rules = tmp_path_factory.mktemp("routing") / "routing.json"
    rules.write_text(json.dumps(ROUTING))
    env = {"FACEFLOW_MODEL_DIR": str(model_dir), "FACEFLOW_CHUNK_SECONDS": "1", "FACEFLOW_ROUTING_FILE": str(rules),
           "FACEFLOW_MAX_SYNC_BYTES": str(SYNC_LIMIT), "FACEFLOW_MULTIPART_THRESHOLD_BYTES": "1"}  # any size: parts
    with Stack(functions=("api", "stills", "split", "chunk-worker", "gpu-result"), function_env=env,
               workdir=tmp_path_factory.mktemp("swap-stack")) as running:
        yield running


@pytest.fixture(scope="module")
def photos(astronaut_bgr) -> dict[str, bytes]:
    """A public-domain face (skimage's astronaut) as the target, mirrored as the source, and a
    photo without a face."""
    import cv2
    import numpy as np
    encode = lambda bgr: cv2.imencode(".jpg", bgr)[1].tobytes()  # noqa: E731
    return {"target": encode(astronaut_bgr), "face": encode(cv2.flip(astronaut_bgr, 1)),
            "no-face": encode(np.full((240, 320, 3), 128, np.uint8))}


@pytest.fixture(scope="module")
def clip(tmp_path_factory, astronaut_bgr) -> bytes:
    from stack_client import panning_clip
    return panning_clip(tmp_path_factory.mktemp("clip") / "clip.mp4", astronaut_bgr, SIDE, FPS, FRAMES, 3, gop=FPS)


def skip_if_inswapper_installed(model_dir: Path) -> None:
    from faceflow.inswapper import RECOGNITION_FILE, SWAPPER_FILE
    if (model_dir / SWAPPER_FILE).is_file() and (model_dir / RECOGNITION_FILE).is_file():
        pytest.skip("this model folder has the operator's INSwapper weights: the engine is available")


def put(stack, key: str, body: bytes, sensitivity: str | None = None) -> None:
    from faceflow import media
    tags = {"Tagging": f"faceflow-sensitivity={sensitivity}"} if sensitivity else {}
    stack.s3.put_object(Bucket=stack.input_bucket, Key=key, Body=body, ContentType=media.media_type_for(key), **tags)


def start_swap(stack, folder: str, target_file: tuple[str, bytes] | None, face_file: tuple[str, bytes] | None,
               **fields) -> str:
    """Upload the target and the source under swap/{folder}/, then the manifest naming them;
    the job id the split function's delivery of the manifest gave."""
    from urllib.parse import unquote_plus
    body = {}
    for name, item in (("target", target_file), ("source", face_file)):
        if item is not None:
            body[name] = f"{SWAP_PREFIX}{folder}/{item[0]}"
            put(stack, body[name], item[1])
    key = f"{SWAP_PREFIX}{folder}/job.json"
    tag = fields.pop("tag", None)
    put(stack, key, json.dumps({**body, **fields}).encode(), tag)

    def found(deliveries):
        return [d for d in deliveries if d.outcome == "ok" and d.event and
                any(unquote_plus(r["s3"]["object"]["key"]) == key for r in d.event["Records"])]
    (delivery,) = found(stack.pollers["split:s3"].wait_for(lambda ds: bool(found(ds)), 240))
    (result,) = delivery.result.payload["results"]
    return result["job_id"]


def result_links(stack, job_id: str) -> dict:
    status, _, body = stack.request("GET", f"/v1/jobs/{job_id}/result")
    assert status == 200, body
    return json.loads(body)


def fetch(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=30) as response:
        return response.read()


def nothing_written(stack, job_id: str) -> None:
    for prefix in (f"results/{job_id}/", f"work/{job_id}/"):
        listed = stack.s3.list_objects_v2(Bucket=stack.output_bucket, Prefix=prefix)
        assert "Contents" not in listed, f"a failed swap left {prefix} behind"


def test_photo_swap_through_a_manifest_is_marked_as_synthetic(stack, photos):
    import io

    from PIL import Image

    from faceflow import synthetic
    from stack_client import wait_for_job
    job_id = start_swap(stack, "party", ("group.jpg", photos["target"]), ("me.jpg", photos["face"]),
                        options={"engine": "landmark"})
    job = wait_for_job(stack, job_id)
    assert job["status"] == "done" and job["operation"] == "swap" and job["faces"] == 1, job
    links = result_links(stack, job_id)
    image, report = fetch(links["image_url"]), json.loads(fetch(links["report_url"]))
    assert report["operation"] == "swap" and report["engine"] == "landmark" and report["swapped"] == 1
    assert report["marking"] == {"synthetic": True, "digital_source_type": synthetic.COMPOSITE_SYNTHETIC,
                                 "where": "xmp"}
    assert report["source"] == "group.jpg" and report["face_source"] == "me.jpg"
    with Image.open(io.BytesIO(image)) as picture:
        assert synthetic.COMPOSITE_SYNTHETIC in str(picture.info.get("xmp", b""))
        assert picture.size == (512, 512)


LARGEST = {"options": {"largest": True}}


@pytest.mark.parametrize("folder,fields,route,stage", [
    ("chunks", LARGEST, "default", "merged"),
    ("gpu", {**LARGEST, "priority": "low"}, "low-priority-swap-on-gpu", "gpu"),
    # the rule sends it to the GPU; faceflow.routing keeps private media on Lambda
    ("private", {**LARGEST, "priority": "low", "sensitivity": "private"}, "low-priority-swap-on-gpu", "merged"),
    # the same, the manifest object tagged faceflow-sensitivity=private
    ("tagged", {**LARGEST, "priority": "low", "tag": "private"}, "low-priority-swap-on-gpu", "merged"),
    # faces picked by track id (an analysis of the whole video numbers them): one pass, not chunks
    ("tracks", {"options": {"tracks": [1]}}, "default", "done"),
])
def test_video_swap_in_chunks_or_on_the_gpu_keeps_frames_and_its_mark(stack, photos, clip, tmp_path,
                                                                       folder, fields, route, stage):
    import av

    from faceflow import synthetic
    from stack_client import wait_for_job
    job_id = start_swap(stack, folder, ("greeting.mp4", clip), ("selfie.jpg", photos["face"]), **fields)
    job = wait_for_job(stack, job_id, timeout=300)
    assert job["status"] == "done" and job["route"] == route and job["stage"] == stage, job
    invoked = [i["status"] for i in stack.sagemaker.invocations if i["inferenceId"] == job_id]
    assert invoked == ([200] if stage == "gpu" else [])
    if stage == "merged":
        assert job["progress"]["chunks_done"] == job["progress"]["chunks_total"] == FRAMES // FPS
    links = result_links(stack, job_id)
    path = tmp_path / "out.mp4"
    path.write_bytes(fetch(links["video_url"]))
    report = json.loads(fetch(links["report_url"]))
    with av.open(str(path)) as container:
        assert container.metadata.get(synthetic.DIGITAL_SOURCE_TYPE_TAG) == synthetic.COMPOSITE_SYNTHETIC
        assert sum(1 for _ in container.decode(video=0)) == FRAMES
    assert report["marking"]["digital_source_type"] == synthetic.COMPOSITE_SYNTHETIC
    swapped = [f["swap"]["swapped"] for frame in report["frames"] for f in frame["faces"]]
    assert len(report["frames"]) == FRAMES and sum(swapped) >= FRAMES - 2, swapped


@pytest.mark.parametrize("folder,target,face,fields,reason", [
    ("no-face", ("greeting.mp4", "clip"), ("wall.jpg", "no-face"), {}, "no face found in the source photo"),
    ("photo-no-face", ("group.jpg", "target"), ("wall.jpg", "no-face"), {}, "no face found in the source photo"),
    ("no-source", ("group.jpg", "target"), None, {}, "source is required"),
    ("video-source", ("group.jpg", "target"), ("me.mp4", "clip"), {}, "must be a photo"),
    ("not-a-photo", ("group.jpg", "target"), ("me.jpg", "bytes"), {}, "the source must be a photo"),
    ("lost-target", None, ("me.jpg", "face"), {"target": "swap/lost-target/gone.jpg"}, "not in the input bucket"),
    ("not-a-video", ("greeting.mp4", "bytes"), ("me.jpg", "face"), {}, "not a readable video"),
    # an engine whose weights the operator did not put in the model folder: never retried
    ("no-weights", ("greeting.mp4", "clip"), ("me.jpg", "face"), {"options": {"engine": "inswapper"}},
     "the inswapper engine needs"),
])
def test_a_bad_swap_fails_with_the_reason_and_writes_nothing(stack, photos, clip, model_dir, folder, target, face,
                                                             fields, reason):
    from stack_client import wait_for_job
    if folder == "no-weights":
        skip_if_inswapper_installed(model_dir)
    media_of = {**photos, "clip": clip, "bytes": b"not a photo at all"}
    job_id = start_swap(stack, folder, target and (target[0], media_of[target[1]]),
                        face and (face[0], media_of[face[1]]), **fields)
    job = wait_for_job(stack, job_id)
    assert job["status"] == "failed" and reason in job["error"], job
    status, _, body = stack.request("GET", f"/v1/jobs/{job_id}/result")
    assert status == 410 and reason in json.loads(body)["message"]
    nothing_written(stack, job_id)


# --- through the HTTP API -------------------------------------------------------------------------

ERROR_KEYS = {"message", "status"}


def form(**files: bytes) -> tuple[bytes, dict[str, str]]:
    """A multipart/form-data body with `files` (name -> bytes) and its Content-Type."""
    boundary = "faceflow-swap-test-boundary"
    body = b"".join(f"--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"; filename=\"{name}.jpg\"\r\n"
                    f"Content-Type: image/jpeg\r\n\r\n".encode() + data + b"\r\n" for name, data in files.items())
    return body + f"--{boundary}--\r\n".encode(), {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def test_sync_swap_of_a_small_photo_is_marked_as_synthetic(stack, photos):
    import io

    from PIL import Image

    from faceflow import synthetic
    body, headers = form(target=photos["target"], source=photos["face"])
    status, answer_headers, image = stack.request("POST", "/v1/swap?largest=true", body=body, headers=headers)
    assert status == 200, image[:300]
    assert answer_headers["content-type"] == "image/jpeg" and answer_headers["x-faceflow-faces"] == "1"
    with Image.open(io.BytesIO(image)) as picture:
        assert synthetic.COMPOSITE_SYNTHETIC in str(picture.info.get("xmp", b""))


@pytest.mark.parametrize("query,files,content_type,status,message", [
    ("", {"target": "target"}, None, 400, "needs a non-empty file named source"),
    ("", {"source": "face"}, None, 400, "needs a non-empty file named target"),
    ("", {"target": "target", "source": "empty"}, None, 400, "needs a non-empty file named source"),
    ("", {"target": "target", "source": "no-face"}, None, 400, "no face found in the source photo"),
    ("", {"target": "bytes", "source": "face"}, None, 400, "not an image"),
    ("?face_index=3", {"target": "target", "source": "face"}, None, 400, "out of range"),
    ("?engine=deepfake", {"target": "target", "source": "face"}, None, 400, "invalid request"),
    ("?face_index=-1", {"target": "target", "source": "face"}, None, 400, "invalid request"),
    ("?engine=inswapper", {"target": "target", "source": "face"}, None, 400, "the inswapper engine needs"),
    ("", {"target": "target", "source": "face"}, "image/jpeg", 415, "multipart/form-data"),
    ("", {"target": "huge", "source": "face"}, None, 413, "too large"),
])
def test_sync_swap_refuses_bad_input_with_the_error_shape(stack, photos, model_dir, query, files, content_type,
                                                          status, message):
    if "inswapper" in query:
        skip_if_inswapper_installed(model_dir)
    media_of = {**photos, "empty": b"", "bytes": b"not a photo at all", "huge": b"\xff" * SYNC_LIMIT}
    body, headers = form(**{name: media_of[what] for name, what in files.items()})
    if content_type:
        headers = {"Content-Type": content_type}
    got, _, answer = stack.request("POST", f"/v1/swap{query}", body=body, headers=headers)
    error = json.loads(answer)
    assert got == status and set(error) == ERROR_KEYS and error["status"] == status, error
    assert message in error["message"], error


def test_swap_job_through_the_api_with_a_second_upload(stack, photos):
    from faceflow import synthetic
    from stack_client import upload_to, wait_for_job
    status, _, body = stack.request("POST", "/v1/jobs", {"filename": "group.jpg", "operation": "swap",
                                                         "source_filename": "me.jpg",
                                                         "swap_options": {"largest": True}})
    assert status == 201, body
    created = json.loads(body)
    job_id = created["job_id"]
    assert created["complete_url"] == f"/v1/jobs/{job_id}/complete"
    upload_to(created, photos["target"])
    # completing before the source is there starts nothing
    status, _, body = stack.request("POST", created["complete_url"])
    assert status == 409 and "source face photo" in json.loads(body)["message"], body
    upload_to({"upload": created["source_upload"]}, photos["face"])
    status, _, body = stack.request("POST", created["complete_url"])
    assert status == 202, body
    job = wait_for_job(stack, job_id)
    assert job["status"] == "done" and job["operation"] == "swap", job
    links = result_links(stack, job_id)
    report = json.loads(fetch(links["report_url"]))
    assert report["swapped"] == 1 and report["marking"]["digital_source_type"] == synthetic.COMPOSITE_SYNTHETIC
    assert synthetic.COMPOSITE_SYNTHETIC.encode() in fetch(links["image_url"])
    assert report["options"]["largest"] is True and report["face_source"] == "me.jpg"


def test_video_swap_job_through_the_api_with_a_multipart_upload(stack, photos, clip, tmp_path):
    """A target large enough for parts: its completion joins them only once the source is there."""
    import av

    from faceflow import synthetic
    from stack_client import upload_to, wait_for_job
    status, _, body = stack.request("POST", "/v1/jobs", {"filename": "greeting.mp4", "operation": "swap",
                                                         "size": len(clip), "source_filename": "selfie.png"})
    assert status == 201, body
    created = json.loads(body)
    (part,) = created["upload"]["parts"]
    assert created["upload"]["method"] == "multipart" and created["source_upload"]["headers"] == {
        "Content-Type": "image/png"}
    # an explicit type: moto's server stores urllib's default (form-urlencoded) bodies empty
    put = urllib.request.Request(part["url"], data=clip, method="PUT",
                                 headers={"Content-Type": "application/octet-stream"})
    with urllib.request.urlopen(put, timeout=60) as response:
        assert response.status == 200
    status, _, body = stack.request("POST", created["complete_url"])
    assert status == 409 and "source face photo" in json.loads(body)["message"], body
    assert json.loads(stack.request("GET", created["upload"]["status_url"])[2])["missing"] == []  # not joined
    import cv2
    import numpy as np
    face_png = cv2.imencode(".png", cv2.imdecode(np.frombuffer(photos["face"], np.uint8), cv2.IMREAD_COLOR))[1]
    upload_to({"upload": created["source_upload"]}, face_png.tobytes())
    status, _, body = stack.request("POST", created["complete_url"])
    assert status == 202, body
    job = wait_for_job(stack, created["job_id"], timeout=300)
    assert job["status"] == "done" and job["operation"] == "swap" and job["stage"] == "merged", job
    path = tmp_path / "greeting.mp4"
    path.write_bytes(fetch(result_links(stack, created["job_id"])["video_url"]))
    with av.open(str(path)) as container:
        assert container.metadata.get(synthetic.DIGITAL_SOURCE_TYPE_TAG) == synthetic.COMPOSITE_SYNTHETIC


@pytest.mark.parametrize("fields,message", [
    ({"filename": "group.jpg", "operation": "swap"}, "a swap needs source_filename"),
    ({"filename": "group.jpg", "source_filename": "me.jpg"}, "a swap's"),
    ({"filename": "group.jpg", "operation": "analyze", "swap_options": {"largest": True}}, "a swap's"),
    ({"filename": "group.jpg", "operation": "swap", "source_filename": "me.mp4"}, "source_filename"),
    ({"filename": "group.jpg", "operation": "swap", "source_filename": "me.jpg",
      "swap_options": {"tracks": [1]}}, "tracks picks faces of a video"),
    ({"filename": "clip.mp4", "operation": "swap", "source_filename": "me.jpg",
      "swap_options": {"tracks": [1], "largest": True}}, "either the largest face or tracks"),
    ({"filename": "group.jpg", "operation": "swap", "source_filename": "me.jpg",
      "swap_options": {"colour": "red"}}, "swap_options.colour"),
    ({"filename": "group.jpg", "operation": "swap", "source_filename": "me.jpg",
      "swap_options": {"engine": "deepfake"}}, "swap_options.engine"),
    ({"filename": "group.jpg", "operation": "swap", "source_filename": "me.jpg",
      "source_content_type": "video/mp4"}, "source_content_type"),
])
def test_swap_job_requests_are_checked(stack, fields, message):
    status, _, body = stack.request("POST", "/v1/jobs", fields)
    error = json.loads(body)
    assert status == 400 and set(error) == ERROR_KEYS and message in error["message"], error


# --- faceflow serve: the same photo route; no swap job run as something else --------------------

def test_faceflow_serve_swaps_a_photo_and_never_runs_swap_fields_as_another_operation(tmp_path, model_dir,
                                                                                        photos):
    """`faceflow serve` shares POST /v1/swap; its swap jobs (tests/test_serve.py) are only
    those with "operation": "swap": a source without it is refused, not run as an anonymisation."""
    pytest.importorskip("aiohttp", reason="the serve extra is not installed: pip install -e '.[serve]'")
    from faceflow import synthetic
    from serve_process import ServeProcess
    with ServeProcess(tmp_path, env={"FACEFLOW_MODEL_DIR": str(model_dir)}) as server:
        body, headers = form(target=photos["target"], source=photos["face"])
        status, answer_headers, image = server.request("POST", "/v1/swap", body, headers)
        assert status == 200 and answer_headers["x-faceflow-faces"] == "1", image[:300]
        assert synthetic.COMPOSITE_SYNTHETIC.encode() in image
        for fields in ({"source_filename": "me.jpg"}, {"swap_options": {"largest": True}}):
            status, _, answer = server.request("POST", "/v1/jobs", json.dumps({"filename": "group.jpg", **fields}),
                                               {"Content-Type": "application/json"})
            error = json.loads(answer)
            assert status == 400 and "are a swap's" in error["message"], error


def test_a_swap_upload_that_is_not_a_manifest_starts_nothing(stack, photos, clip):
    """Only manifests trigger under swap/; delivered anyway (a trigger set wider by hand), a
    target video is ignored, not anonymised or swapped."""
    key = f"{SWAP_PREFIX}loose/greeting.mp4"
    put(stack, key, clip)
    event = json.loads((EVENTS / "s3_swap_manifest.json").read_text())
    event["Records"][0]["s3"]["bucket"]["name"] = stack.input_bucket
    event["Records"][0]["s3"]["object"].update(key=key, size=len(clip))
    result = stack.functions["split"].invoke(event)
    assert result.ok and result.payload["results"] == [{"status": "ignored"}], result
    photo = f"{SWAP_PREFIX}loose/me.jpg"   # the same for the stills function and a photo
    put(stack, photo, photos["face"])
    event["Records"][0]["s3"]["object"].update(key=photo, size=len(photos["face"]))
    result = stack.functions["stills"].invoke(event)
    assert result.ok and result.payload["results"] == [{"status": "ignored"}], result
