"""Face analysis in video: an operation for the pipeline that analyses a sample of each
track's detected faces, and the per-track summary (median age, majority gender and its
share, frames seen): one answer per person rather than an age that jumps frame to frame.

    analysis = TrackAnalysis(engine.analyzer(("gender", "age")), fps=25)
    process_video(engine, "clip.mp4", None, analysis, on_frame=...)   # sampled faces carry attributes
    analysis.tracks()                                                  # one summary per track

It reads the frame the detector was given (at most the detector's input size, e.g. 640 px),
not the full-size frame: an analysis-only run decodes nothing larger, and the age and gender
chips are 64 and 32 px.
"""
from __future__ import annotations

import statistics
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from .agegender import age_bucket
from .face import DETECTED, Face

# A track's face is analysed at most this often and this many times: attributes barely change
# within a second, and the analysis costs more than detection.
SAMPLE_EVERY_S = 0.5
MAX_SAMPLES = 15
# Keys of a face record that are not attributes (positions on the reduced frame, or the
# tracker's own); "mesh" is scaled back to full-size pixels.
_NOT_ATTRIBUTES = {"box", "score", "landmarks", "track", "source"}


@dataclass
class _Track:
    frames: int = 0
    first: int | None = None
    last: int | None = None
    last_sample: int | None = None
    samples: list[dict] = field(default_factory=list)


class TrackAnalysis:
    """A pipeline operation with `observe(frame, layout)`: it reads frames and writes none.
    `analyzer`: a faceflow.analysis.Analyzer, or None to count tracks only."""

    def __init__(self, analyzer, fps: float, sample_every_s: float = SAMPLE_EVERY_S,
                 max_samples: int = MAX_SAMPLES):
        self.analyzer = analyzer
        self.every = max(1, round(fps * sample_every_s))
        self.max_samples = max_samples
        self._tracks: dict[int, _Track] = {}

    def observe(self, frame, layout) -> None:
        """Count every tracked face; analyse the detected ones due for a sample (on the
        detector's reduced frame, `layout.detect_scale` times smaller), setting their
        attributes."""
        due: list[Face] = []
        for face in frame.faces:
            if face.track is None:
                continue
            track = self._tracks.setdefault(face.track, _Track())
            track.frames += 1
            track.first = frame.index if track.first is None else track.first
            track.last = frame.index
            if (self.analyzer is not None and face.source == DETECTED and face.landmarks is not None
                    and len(track.samples) < self.max_samples
                    and (track.last_sample is None or frame.index - track.last_sample >= self.every)):
                due.append(face)
        if not due:
            return
        scale = layout.detect_scale
        small = [Face(tuple(v / scale for v in f.box), f.score, f.landmarks / scale) for f in due]
        for face, record in zip(due, self.analyzer.analyze(frame.small, small)):
            found = {k: v for k, v in record.items() if k not in _NOT_ATTRIBUTES}
            if found.get("mesh") is not None:
                found["mesh"] = [[round(c * scale, 1) for c in point] for point in found["mesh"]]
            face.attributes.update(found)
            track = self._tracks[face.track]
            track.last_sample = frame.index
            track.samples.append(found)

    def tracks(self) -> list[dict[str, Any]]:
        """One summary per track, in track order (see `summarize`)."""
        return [{"track": tid, "frames": t.frames, "first_frame": t.first, "last_frame": t.last,
                 **summarize(t.samples)} for tid, t in sorted(self._tracks.items())]


def summarize(samples: list[dict]) -> dict[str, Any]:
    """Age and gender over a track's analysed faces: the median age (and of its low/high), the
    majority gender with its share of the samples that had one (None when none had)."""
    out: dict[str, Any] = {"samples": len(samples)}
    ages = [s["age"] for s in samples if s.get("age") and s["age"].get("value") is not None]
    if ages:
        value = round(statistics.median(a["value"] for a in ages), 1)
        out["age"] = {"value": value,
                      "low": round(statistics.median(a["low"] for a in ages), 1),
                      "high": round(statistics.median(a["high"] for a in ages), 1),
                      "bucket": age_bucket(value)}
    genders = [s["gender"]["value"] for s in samples if s.get("gender") and s["gender"].get("value")]
    if any("gender" in s for s in samples):
        if genders:
            value, count = Counter(genders).most_common(1)[0]
            out["gender"] = {"value": value, "share": round(count / len(genders), 3),
                             "samples": len(genders)}
        else:
            out["gender"] = {"value": None, "share": 0.0, "samples": 0}
    return out

