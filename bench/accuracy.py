"""Age and gender against the by-eye labels in tests/data/attribute_labels.json.

    python bench/accuracy.py [--data ../shared/data] [--download] [--json OUT] [--stability]
                             [--dlib-parity] [--chips one|mirror|shift|four|ten]
                             [--age-chips SET] [--gender-chips SET] [--align detector|mesh]
                             [--int8 DIR [--int8-ops Conv] [--int8-every N]]

Each labelled face is found again with the default detector (YuNet; IoU >= 0.5 with the
labelled box) and read by faceflow.agegender.AgeGender, aligned from the detector's five
landmarks (default, as the analysis does) or, with --align mesh, from the 468-point mesh
(the analysis' fallback for a face without landmarks); --chips picks the chips each face is
read from by both networks, --age-chips and --gender-chips by one (default
agegender.AGE_CHIP_VARIANTS and GENDER_CHIP_VARIANTS). Prints Markdown tables: gender accuracy
where the model answers
(`gender.value` not null), how often it answers, the accuracy it would have if it always
answered; how often the age estimate falls in the labelled range; by group (small faces,
elderly, children, turned heads), and the accuracy and coverage over confidence thresholds
(how GENDER_MIN_CONFIDENCE was chosen).

t1.jpg comes from the insightface wheel: the installed package, a wheel in
~/.cache/faceflow/wheels, or (with --download) `pip download --no-deps insightface` into
that folder. Its faces are left out, with a line saying so, when none of these is there.

--int8 DIR measures what 8-bit networks would cost in accuracy (the speed side:
`python bench/analyze.py --models DIR`): it writes age-v1 and gender-v1 quantised by
onnxruntime (QDQ, weights int8 per channel, activations uint8) into DIR, beside links to the
bundle's other files, calibrated on the chips of every face in every Nth frame of the clips in
DATA/video (none of them in the labelled set), then evaluates with DIR and prints how far each
face's age and gender probability moved from the float networks'. Needs onnx (the fetch extra).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "shared"))
from faceflow import agegender  # noqa: E402
from faceflow.detectors import load_detector  # noqa: E402
from faceflow.face import iou  # noqa: E402
from faceflow.facemesh import FaceMesh  # noqa: E402

LABELS = ROOT / "tests" / "data" / "attribute_labels.json"
INSIGHTFACE_PREFIX = "insightface:"
WHEEL_DIR = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "faceflow" / "wheels"
SMALL_FACE = 40          # px of face width: the chips are 32 and 64 px, and below this little detail is left
THRESHOLDS = (0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95)


def insightface_image(name: str, download: bool = False) -> np.ndarray | None:
    """An image from insightface's wheel (insightface/data/images/NAME), BGR, or None."""
    spec = importlib.util.find_spec("insightface")
    if spec is not None and spec.submodule_search_locations:
        path = Path(list(spec.submodule_search_locations)[0]) / "data" / "images" / name
        if path.is_file():
            return cv2.imread(str(path))
    wheels = sorted(WHEEL_DIR.glob("insightface-*.whl"))
    if not wheels and download:
        WHEEL_DIR.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "insightface",
                        "-d", str(WHEEL_DIR)], check=True)
        wheels = sorted(WHEEL_DIR.glob("insightface-*.whl"))
    if not wheels:
        return None
    with zipfile.ZipFile(wheels[-1]) as whl:
        data = whl.read(f"insightface/data/images/{name}")
    return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)


def load_image(file: str, data: Path, download: bool = False) -> np.ndarray | None:
    if file.startswith(INSIGHTFACE_PREFIX):
        return insightface_image(file[len(INSIGHTFACE_PREFIX):], download)
    path = data / file
    return cv2.imread(str(path)) if path.is_file() else None


def evaluate(data: Path, model_dir=None, download: bool = False, threads: int = 0,
             age_variants: tuple = agegender.AGE_CHIP_VARIANTS,
             gender_variants: tuple = agegender.GENDER_CHIP_VARIANTS,
             align: str = "detector") -> tuple[list[dict], list[str]]:
    """One row per labelled face and the files that could not be read. A row holds the
    labels (label_gender, label_age [low, high], note), whether the face was found, its
    size, the likelier gender and its probability (even where the estimator would answer
    null) and the age the estimator reports."""
    labels = json.loads(LABELS.read_text())["faces"]
    detector = load_detector(model_dir=model_dir, threads=threads)
    estimator = agegender.AgeGender(model_dir=model_dir, threads=threads, age_variants=age_variants,
                                    gender_variants=gender_variants)
    mesh = FaceMesh(model_dir) if align == "mesh" else None
    rows, missing = [], []
    by_file: dict[str, list[dict]] = {}
    for entry in labels:
        by_file.setdefault(entry["file"], []).append(entry)
    for file, entries in by_file.items():
        image = load_image(file, data, download)
        if image is None:
            missing.append(file)
            continue
        faces = detector.detect(image)
        for entry in entries:
            row = {"file": file, "box": entry["box"], "note": entry.get("note", ""),
                   "label_gender": entry["gender"], "label_age": entry["age"], "found": False}
            rows.append(row)
            match = max(faces, key=lambda f: iou(f.box, entry["box"]), default=None)
            if match is None or iou(match.box, entry["box"]) < 0.5:
                continue
            points = (agegender.dlib5_from_mesh(mesh.run(image, [match])[0]) if mesh is not None
                      else agegender.dlib5_from_detector(match.landmarks))
            age, gender = estimator.probabilities(image, [points])
            likely = int(np.argmax(gender[0]))
            row.update(found=True, size=round(match.box[2]), model_gender=agegender.GENDER_LABELS[likely],
                       confidence=float(gender[0][likely]), age=agegender.age_from_distribution(age[0]))
    return rows, missing


def groups(row: dict) -> list[str]:
    note = row["note"]
    out = ["all"]
    if row["size"] < SMALL_FACE:
        out.append(f"faces < {SMALL_FACE} px")
    if row["label_age"][0] >= 50:
        out.append("elderly (labelled 50+)")
    if row["label_age"][1] <= 18:
        out.append("children (labelled under 18)")
    if any(word in note for word in ("profile", "three-quarter", "looking down", "tilted")):
        out.append("turned or lowered heads")
    return out


def summarise(rows: list[dict], threshold: float = agegender.GENDER_MIN_CONFIDENCE) -> dict[str, dict]:
    """Per group: faces; gender answered and correct at `threshold`; correct if it always
    answered; age estimate in the labelled range; mean years outside the range."""
    table: dict[str, dict] = {}
    for row in rows:
        if not row["found"]:
            continue
        right = row["model_gender"] == row["label_gender"]
        age, (lo, hi) = row["age"]["value"], row["label_age"]
        for group in groups(row):
            g = table.setdefault(group, {"faces": 0, "answered": 0, "correct": 0, "forced_correct": 0,
                                         "age_in_range": 0, "age_miss_years": 0.0})
            g["faces"] += 1
            g["forced_correct"] += right
            if row["confidence"] >= threshold:
                g["answered"] += 1
                g["correct"] += right
            g["age_in_range"] += lo <= age <= hi
            g["age_miss_years"] += max(lo - age, 0, age - hi)
    return table


def _pct(a: int, b: int) -> str:
    return f"{100 * a / b:.0f}% ({a}/{b})" if b else "-"


def report(rows: list[dict], missing: list[str]) -> str:
    lines = [f"Gender shown below {agegender.GENDER_MIN_CONFIDENCE} confidence: null "
             "(GENDER_MIN_CONFIDENCE).", "",
             "| faces | n | gender correct (answered) | answered | gender correct if forced "
             "| age in labelled range | mean years outside |",
             "|---|---|---|---|---|---|---|"]
    for group, g in summarise(rows).items():
        lines.append(f"| {group} | {g['faces']} | {_pct(g['correct'], g['answered'])} | "
                     f"{_pct(g['answered'], g['faces'])} | {_pct(g['forced_correct'], g['faces'])} | "
                     f"{_pct(g['age_in_range'], g['faces'])} | {g['age_miss_years'] / g['faces']:.1f} |")
    lines += ["", "| threshold | gender correct (answered) | answered |", "|---|---|---|"]
    for t in THRESHOLDS:
        g = summarise(rows, t)["all"]
        lines.append(f"| {t} | {_pct(g['correct'], g['answered'])} | {_pct(g['answered'], g['faces'])} |")
    lost = [f"{r['file']} {r['box']}" for r in rows if not r["found"]]
    if lost:
        lines += ["", "Not found by the detector: " + ", ".join(lost)]
    if missing:
        lines += ["", "Left out (file not available): " + ", ".join(missing)]
    wrong = [r for r in rows if r["found"] and (r["model_gender"] != r["label_gender"]
                                                  or not r["label_age"][0] <= r["age"]["value"] <= r["label_age"][1])]
    if wrong:
        lines += ["", "| file | box | px | label | model | note |", "|---|---|---|---|---|---|"]
        for r in wrong:
            lines.append(f"| {r['file']} | {r['box']} | {r['size']} | {r['label_gender']} "
                         f"{r['label_age'][0]}-{r['label_age'][1]} | {r['model_gender']} "
                         f"{r['confidence']:.2f}, {r['age']['value']:.0f} ({r['age']['low']}-{r['age']['high']}) "
                         f"| {r['note']} |")
    return "\n".join(lines)


CHIP_SETS = {
    "one": ((0, 0, False),),
    "mirror": ((0, 0, False), (0, 0, True)),
    "shift": ((0, 0, False), (1, 1, False)),
    "four": ((0, 0, False), (0, 0, True), (1, 1, False), (-1, -1, False)),
    "ten": tuple((dx, dy, m) for dx, dy in ((0, 0), (-1, 0), (1, 0), (0, -1), (0, 1)) for m in (False, True)),
}
STABILITY_VARIANTS = {
    "one chip": CHIP_SETS["one"],
    "plain + mirror (gender's default)": CHIP_SETS["mirror"],
    "plain + (1,1) (age's default)": CHIP_SETS["shift"],
    "four: plain, mirror, (1,1), (-1,-1)": CHIP_SETS["four"],
    "ten: 5 offsets x mirror": CHIP_SETS["ten"],
}


def stability(data: Path, model_dir=None, download: bool = False, draws: int = 5) -> str:
    """How much the age estimate moves when the landmarks move by about one chip pixel
    (uniform noise, the same draws for every variant), and the CPU time per face."""
    labels = json.loads(LABELS.read_text())["faces"]
    detector = load_detector(model_dir=model_dir, threads=1)
    rng = np.random.default_rng(0)
    faces = []
    images: dict[str, np.ndarray | None] = {}
    for entry in labels:
        if entry["file"] not in images:
            images[entry["file"]] = load_image(entry["file"], data, download)
        image = images[entry["file"]]
        if image is None:
            continue
        match = max(detector.detect(image), key=lambda f: iou(f.box, entry["box"]), default=None)
        if match is not None and iou(match.box, entry["box"]) >= 0.5:
            points = agegender.dlib5_from_detector(match.landmarks)
            noise = [np.zeros((5, 2))] + [rng.uniform(-1, 1, (5, 2)) * max(1.0, match.box[2] / agegender.AGE_CHIP)
                                          for _ in range(draws - 1)]
            faces.append((image, [points + n for n in noise]))
    lines = [f"{len(faces)} faces, {draws} landmark draws each (one chip pixel of noise)", "",
             "| chips | n | age sd (years) | CPU ms a face (age + gender, one thread) |", "|---|---|---|---|"]
    for name, variants in STABILITY_VARIANTS.items():
        estimator = agegender.AgeGender(model_dir=model_dir, threads=1, variants=variants)
        sds, cpu = [], 0.0
        for image, draws_of_points in faces:
            start = time.process_time()
            age, _ = estimator.probabilities(image, draws_of_points)
            cpu += (time.process_time() - start) / len(draws_of_points)
            sds.append(np.std([agegender.age_from_distribution(a)["value"] for a in age]))
        lines.append(f"| {name} | {len(variants)} | {np.mean(sds):.2f} | {1000 * cpu / len(faces):.1f} |")
    return "\n".join(lines)


def dlib_parity(data: Path, model_dir=None, download: bool = False) -> str:
    """faceflow's chips against dlib's own get_face_chip for the same five points (rounded
    to whole pixels, as dlib.point holds them), one chip per face, and what the networks say
    of each. Needs dlib in this environment (`pip install dlib-bin`: the bench only; faceflow
    never imports dlib)."""
    import dlib
    labels = json.loads(LABELS.read_text())["faces"]
    detector = load_detector(model_dir=model_dir, threads=1)
    estimator = agegender.AgeGender(model_dir=model_dir, threads=1, variants=((0, 0, False),))
    pixel, age_diff, male_diff = [], [], []
    for entry in labels:
        image = load_image(entry["file"], data, download)
        if image is None:
            continue
        match = max(detector.detect(image), key=lambda f: iou(f.box, entry["box"]), default=None)
        if match is None or iou(match.box, entry["box"]) < 0.5:
            continue
        points = np.round(agegender.dlib5_from_detector(match.landmarks))
        x, y, w, h = (int(v) for v in match.box)
        shape = dlib.full_object_detection(dlib.rectangle(x, y, x + w, y + h),
                                           [dlib.point(int(a), int(b)) for a, b in points])
        rgb = np.ascontiguousarray(image[..., ::-1])
        probs = {}
        for size, session in ((agegender.AGE_CHIP, estimator.age_session),
                              (agegender.GENDER_CHIP, estimator.gender_session)):
            theirs = np.asarray(dlib.get_face_chip(rgb, shape, size=size, padding=agegender.CHIP_PADDING))
            ours = agegender.face_chip(image, points, size)[..., ::-1]
            pixel.append(np.abs(theirs.astype(int) - ours.astype(int)).mean())
            name = session.get_inputs()[0].name
            probs[size] = [session.run(None, {name: estimator.blob([c])})[0][0] for c in (theirs, ours)]
        age_diff.append(agegender.age_from_distribution(probs[agegender.AGE_CHIP][0])["value"]
                        - agegender.age_from_distribution(probs[agegender.AGE_CHIP][1])["value"])
        male_diff.append(probs[agegender.GENDER_CHIP][0][1] - probs[agegender.GENDER_CHIP][1][1])
    a, m = np.abs(age_diff), np.abs(male_diff)
    return (f"dlib {dlib.__version__} get_face_chip vs faceflow.agegender.face_chip, {len(a)} faces: "
            f"mean abs pixel difference {np.mean(pixel):.2f}/255 (max {np.max(pixel):.1f}); "
            f"age from one chip differs by {np.mean(a):.2f} years on average (max {np.max(a):.1f}); "
            f"p(male) by {np.mean(m):.3f} (max {np.max(m):.3f})")


def quantise_int8(data: Path, out: Path, ops: list[str] | None = None, every: int = 10) -> None:
    """age-v1 and gender-v1 as 8-bit QDQ models in `out`, calibrated on video chips (see --int8)."""
    import av
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from faceflow import bundle
    source = bundle.default_model_dir()
    out.mkdir(parents=True, exist_ok=True)
    for item in source.iterdir():
        if not (out / item.name).exists():
            (out / item.name).symlink_to(item)
    detector = load_detector(threads=1)
    estimator = agegender.AgeGender(threads=1)
    blobs: dict[int, list[np.ndarray]] = {agegender.AGE_CHIP: [], agegender.GENDER_CHIP: []}
    for clip in sorted((data / "video").iterdir()):
        with av.open(str(clip)) as container:
            for i, frame in enumerate(container.decode(video=0)):
                if i % every:
                    continue
                bgr = frame.to_ndarray(format="bgr24")
                for face in detector.detect(bgr):
                    if face.landmarks is not None:
                        points = agegender.dlib5_from_detector(face.landmarks)
                        for size, found in blobs.items():
                            found.append(estimator.blob(estimator.chips(bgr, points, size)))

    class Chips(CalibrationDataReader):
        def __init__(self, batch: np.ndarray):
            self.batches = iter(batch[i:i + 8] for i in range(0, len(batch), 8))

        def get_next(self):
            return next(({"images": b} for b in self.batches), None)

    for name, size in (("age", agegender.AGE_CHIP), ("gender", agegender.GENDER_CHIP)):
        target = out / bundle.load_manifest(source)["models"][name]["file"]
        target.unlink()
        prepared = out / f"{target.stem}.prepared.onnx"
        quant_pre_process(str(source / target.name), str(prepared))
        quantize_static(str(prepared), str(target), Chips(np.concatenate(blobs[size])),
                        quant_format=QuantFormat.QDQ, per_channel=True, op_types_to_quantize=ops,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
        prepared.unlink()
    print(f"int8 age and gender networks in {out}, calibrated on "
          f"{len(blobs[agegender.AGE_CHIP])} faces (one frame in {every} of {data / 'video'}); "
          f"quantised ops: {', '.join(ops) if ops else 'all'}")


def moved(rows: list[dict], reference: list[dict]) -> str:
    """How far the answers in `rows` are from `reference`'s, face by face."""
    pairs = [(r, f) for r, f in zip(rows, reference) if r.get("age") is not None and f.get("age") is not None]
    ages = np.array([r["age"]["value"] - f["age"]["value"] for r, f in pairs])
    conf = np.array([abs(r["confidence"] - f["confidence"]) for r, f in pairs])
    flips = sum(r["model_gender"] != f["model_gender"] for r, f in pairs)
    return (f"against the float networks, {len(pairs)} faces: age moved {np.abs(ages).mean():.2f} years "
            f"on average (max {np.abs(ages).max():.1f}, mean {ages.mean():+.2f}); the likelier gender's "
            f"probability {conf.mean():.3f} (max {conf.max():.3f}); likelier gender changed on {flips}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--models", type=Path, default=None, help="model folder (default: faceflow's)")
    ap.add_argument("--download", action="store_true",
                    help="pip download the insightface wheel for t1.jpg if it is not at hand")
    ap.add_argument("--json", type=Path, help="also write the per-face rows here")
    ap.add_argument("--stability", action="store_true",
                    help="also measure how much the age moves with landmark noise, per chip set")
    ap.add_argument("--dlib-parity", action="store_true",
                    help="also compare the chips with dlib's own (needs `pip install dlib-bin`)")
    ap.add_argument("--chips", choices=sorted(CHIP_SETS), default=None,
                    help="both networks read each face from this chip set")
    ap.add_argument("--age-chips", choices=sorted(CHIP_SETS), default=None,
                    help="the age network's chip set (default agegender.AGE_CHIP_VARIANTS)")
    ap.add_argument("--gender-chips", choices=sorted(CHIP_SETS), default=None,
                    help="the gender network's chip set (default agegender.GENDER_CHIP_VARIANTS)")
    ap.add_argument("--align", choices=("detector", "mesh"), default="detector",
                    help="dlib's five points from the detector's landmarks (as the analysis does) "
                         "or from the 468-point mesh")
    ap.add_argument("--int8", type=Path, metavar="DIR",
                    help="write 8-bit age and gender networks into DIR and evaluate with them")
    ap.add_argument("--int8-ops", default=None,
                    help="with --int8: the op types to quantise, e.g. Conv (default: all)")
    ap.add_argument("--int8-every", type=int, default=10,
                    help="with --int8: calibrate on every Nth video frame")
    args = ap.parse_args(argv)
    age_variants = CHIP_SETS[args.age_chips or args.chips] if (args.age_chips or args.chips) \
        else agegender.AGE_CHIP_VARIANTS
    gender_variants = CHIP_SETS[args.gender_chips or args.chips] if (args.gender_chips or args.chips) \
        else agegender.GENDER_CHIP_VARIANTS
    print(f"chips a face: age {age_variants}, gender {gender_variants}; alignment from the {args.align}")
    float_rows = None
    if args.int8:
        float_rows, _ = evaluate(args.data, args.models, args.download, age_variants=age_variants,
                                 gender_variants=gender_variants, align=args.align)
        quantise_int8(args.data, args.int8, args.int8_ops.split(",") if args.int8_ops else None,
                      args.int8_every)
        args.models = args.int8
    rows, missing = evaluate(args.data, args.models, args.download, age_variants=age_variants,
                             gender_variants=gender_variants, align=args.align)
    print(report(rows, missing))
    if float_rows is not None:
        print()
        print(moved(rows, float_rows))
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "missing": missing}, indent=1))
    if args.stability:
        print()
        print(stability(args.data, args.models, args.download))
    if args.dlib_parity:
        print()
        print(dlib_parity(args.data, args.models, args.download))


if __name__ == "__main__":
    main()
