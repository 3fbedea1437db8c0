"""Face swap jobs through the deployed stack's parts: the job manifest under swap/ and its checks,
the GPU worker's swap descriptor, and (devstack: moto_server, redis-server, the functions under
awslambdaric, the GPU worker behind the SageMaker stand-in) photo and video swaps end to end,
split into chunks or routed to the GPU endpoint, marked as synthetic, and the failures: a bad
manifest, a source without a face. Nothing is mocked; the stack tests skip with the reason when
a service is missing (fail in CI: see conftest)."""
from __future__ import annotations

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
    from faceflow.swap import SwapOptions
    from functions.common.swapjobs import swap_options
    options = swap_options(check_options({"engine": "landmark", "tracks": [3, 1]}, "video"))
    assert isinstance(options, SwapOptions) and options.tracks == {1, 3}
    with pytest.raises(BadInput, match="either the largest face or tracks"):
        swap_options(check_options({"largest": True, "tracks": [1]}, "video"))


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
