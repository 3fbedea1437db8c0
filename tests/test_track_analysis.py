"""Video analysis: attributes on a sample of each track's faces, summarised per track."""
from __future__ import annotations

import json
import statistics

import pytest

from conftest import data_path, run_cli
from faceflow import trackanalysis
from faceflow.agegender import AGE_BRACKETS


def test_summary_takes_the_median_age_and_the_majority_gender():
    samples = [{"age": {"value": v, "low": v - 3, "high": v + 4, "bucket": "x"},
                "gender": {"value": g, "confidence": 0.9}}
               for v, g in ((20, "male"), (30, "male"), (80, "female"), (31, None), (29, "male"))]
    summary = trackanalysis.summarize(samples)
    assert summary["age"] == {"value": 30, "low": 27, "high": 34, "bucket": "25-32"}  # 80 is an outlier
    assert summary["gender"] == {"value": "male", "share": 0.75, "samples": 4}  # the unsure one not counted
    assert summary["samples"] == 5
    assert trackanalysis.summarize([{"gender": {"value": None, "confidence": 0.5}}])["gender"]["value"] is None
    assert trackanalysis.summarize([]) == {"samples": 0}


def test_clip_tracks_carry_aggregated_attributes(tmp_path):
    clip = data_path("video", "pyfeat_WolfgangLanger_Pexels.mp4")  # one woman, ~20 s
    r = run_cli("analyze", clip, "--attributes", "gender,age")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    (track,) = report["tracks"]
    seen = [(fr["frame"], f) for fr in report["frames"] for f in fr["faces"] if f.get("track") == track["track"]]
    assert track["frames"] == len(seen) == report["summary"]["faces"]
    assert (track["first_frame"], track["last_frame"]) == (seen[0][0], seen[-1][0])

    sampled = [(n, f) for n, f in seen if "age" in f]
    assert len(sampled) == track["samples"] == trackanalysis.MAX_SAMPLES
    every = round(report["fps"] * trackanalysis.SAMPLE_EVERY_S)
    assert all(b[0] - a[0] >= every for a, b in zip(sampled, sampled[1:]))
    assert all(f["source"] == "detected" for _, f in sampled)

    ages = [f["age"]["value"] for _, f in sampled]
    assert track["age"]["value"] == pytest.approx(statistics.median(ages), abs=0.05)
    assert track["age"]["bucket"] in {f"{lo}-{hi}" for lo, hi in AGE_BRACKETS}
    assert max(ages) - min(ages) > 1  # single frames do jump; the track gives one answer
    assert track["gender"]["value"] == "female" and track["gender"]["share"] >= 0.8


def test_detection_only_counts_tracks_without_samples(tmp_path):
    clip = data_path("video", "pyfeat_face_noface.mov")
    report = json.loads(run_cli("analyze", clip, "--attributes", "none").stdout)
    assert report["tracks"] and all(t["samples"] == 0 and "age" not in t for t in report["tracks"])
    assert sum(t["frames"] for t in report["tracks"]) == report["summary"]["faces"]
    assert not any("age" in f for fr in report["frames"] for f in fr["faces"])
