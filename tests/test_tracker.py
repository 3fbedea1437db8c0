"""The tracker on synthetic detections: hold, interpolation, scene cuts, state round trip."""
from __future__ import annotations

import json

import numpy as np

from faceflow.face import DETECTED, INTERPOLATED, TRACKED, Face
from faceflow.tracker import Tracker


def det(x, y=50.0, size=40.0):
    return [Face(box=(x, y, size, size), score=0.9)]


def test_hold_through_misses_then_interpolate():
    tr = Tracker(fps=10, max_missing_s=1.0)
    out = [tr.update(0, det(0)), tr.update(1, det(10))]
    held = [tr.update(2, []), tr.update(3, [])]
    assert [f[0].source for f in held] == [TRACKED, TRACKED]
    back = tr.update(4, det(40))
    assert back[0].source == DETECTED
    # the held boxes were rewritten in place on the straight path from frame 1 to frame 4
    assert [h[0].source for h in held] == [INTERPOLATED, INTERPOLATED]
    assert [round(h[0].box[0]) for h in held] == [20, 30]
    assert len({f[0].track for f in out + held + [back]}) == 1


def test_hold_is_bounded():
    tr = Tracker(fps=10, max_missing_s=0.5)  # 5 frames
    tr.update(0, det(0))
    covered = [len(tr.update(i, [])) for i in range(1, 10)]
    assert covered == [1] * 5 + [0] * 4


def test_scene_cut_ends_tracks():
    rng = np.random.default_rng(0)
    a = np.full((90, 160, 3), (30, 120, 200), np.uint8)
    b = np.full((90, 160, 3), (200, 40, 10), np.uint8)
    tr = Tracker(fps=10, max_missing_s=2)
    tr.update(0, det(0), a)
    assert len(tr.update(1, [], a + rng.integers(0, 3, a.shape, dtype=np.uint8))) == 1
    assert tr.update(2, [], b) == []


def test_state_round_trip_continues_identically():
    frames = [det(x) if x % 7 else [] for x in range(0, 60, 3)]
    one = Tracker(fps=10)
    full = [[(f.track, f.source, tuple(round(v, 3) for v in f.box)) for f in one.update(i, [Face(d.box, d.score) for d in ds])]
            for i, ds in enumerate(frames)]
    first = Tracker(fps=10)
    for i, ds in enumerate(frames[:9]):
        first.update(i, [Face(d.box, d.score) for d in ds])
    state = json.loads(json.dumps(first.state()))  # plain data: survives JSON (and Redis)
    second = Tracker.from_state(state)
    rest = [[(f.track, f.source, tuple(round(v, 3) for v in f.box)) for f in second.update(i, [Face(d.box, d.score) for d in ds])]
            for i, ds in enumerate(frames[9:], start=9)]
    assert rest == full[9:]


def test_two_faces_keep_their_ids():
    tr = Tracker(fps=25)
    ids = set()
    for i in range(20):
        faces = tr.update(i, [Face((10 + i, 10, 30, 30), 0.9), Face((200 - i, 10, 30, 30), 0.9)])
        ids.add(tuple(sorted(f.track for f in faces)))
    assert ids == {(1, 2)}
