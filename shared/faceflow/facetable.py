"""`faceflow analyze DIR --csv`: a folder of photos in, one CSV row per face out (and one per
file that failed), optionally each photo drawn with its boxes and labels. Resumable: files
already in the CSV are skipped unless forced. Workers, progress and summary come from batch."""
from __future__ import annotations

import csv
import io
import sys
import time
from pathlib import Path

import cv2
import numpy as np

from . import images
from .batch import expand_inputs, run_jobs
from .images import BadInput, atomic_write
from .media import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS

CSV_FIELDS = ["file", "face", "x", "y", "w", "h", "score", "gender", "gender_confidence",
              "age", "age_bucket", "yaw", "pitch", "roll", "sharpness", "error"]
GENDER_LETTER = {"female": "F", "male": "M"}
# How often the CSV is rewritten while a batch runs, so that an interrupted run keeps its work.
SAVE_EVERY_S = 5.0
BOX_COLOUR = (0, 255, 0)  # BGR


def face_rows(file: str, report: dict) -> list[dict]:
    """The CSV rows of one analysed photo: one per face; one with an empty `face` when the
    photo has none (so that a resumed run knows it was done)."""
    rows = []
    for index, face in enumerate(report["faces"]):
        x, y, w, h = face["box"]
        gender = face.get("gender") or {}
        age = face.get("age") or {}
        pose = face.get("pose") or {}
        quality = face.get("quality") or {}
        rows.append({"file": file, "face": index, "x": x, "y": y, "w": w, "h": h,
                     "score": face["score"], "gender": gender.get("value") or "",
                     "gender_confidence": gender.get("confidence", ""),
                     "age": age.get("value", ""), "age_bucket": age.get("bucket", ""),
                     "yaw": pose.get("yaw", ""), "pitch": pose.get("pitch", ""),
                     "roll": pose.get("roll", ""), "sharpness": quality.get("sharpness", ""),
                     "error": ""})
    return rows or [{"file": file, "face": "", "error": ""}]


def label(face: dict) -> str:
    """"F 25-32": gender letter (? when unsure or not computed) and age bracket."""
    gender = GENDER_LETTER.get((face.get("gender") or {}).get("value"), "?")
    bucket = (face.get("age") or {}).get("bucket")
    return f"{gender} {bucket}" if bucket else gender


def draw(bgr: np.ndarray, faces: list[dict]) -> np.ndarray:
    """A copy of `bgr` with each face's box and label, sized to the image."""
    out = bgr.copy()
    thickness = max(1, round(max(bgr.shape[:2]) / 500))
    scale = max(0.4, max(bgr.shape[:2]) / 1400)
    for face in faces:
        x, y, w, h = (int(round(v)) for v in face["box"])
        cv2.rectangle(out, (x, y), (x + w, y + h), BOX_COLOUR, thickness)
        text = label(face)
        (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, thickness)
        top = y - th - base - 2 if y - th - base - 2 >= 0 else y + h  # above the box, else below
        cv2.rectangle(out, (x, top), (x + tw + 2, top + th + base + 2), BOX_COLOUR, -1)
        cv2.putText(out, text, (x + 1, top + th + 1), cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0),
                    thickness, cv2.LINE_AA)
    return out


def write_drawing(data: bytes, faces: list[dict], dst: Path) -> None:
    """The photo with its faces drawn, in its own format where this installation writes it
    (else JPEG, with the extension to match); pixels only, no metadata; written atomically."""
    picture = images.decode(data)
    fmt = picture.format if images.can_write(picture.format) else "JPEG"
    if images.format_for(dst, fmt) != fmt:
        dst = dst.with_suffix(".jpg")
    drawn = images.Picture(draw(images.to_bgr8(picture.pixels), faces), fmt)
    atomic_write(dst, images.encode(drawn, fmt))


# --- workers: one engine per process, loaded once -------------------------------------------
_worker: dict = {}


def _init_worker(engine_kwargs: dict, attributes: tuple[str, ...] | None) -> None:
    from .engine import Engine
    _worker.update(engine=Engine(**engine_kwargs), attributes=attributes)


def _analyze(src: str, drawing: str | None) -> dict:
    """{"file", "rows", "status", "ms", "error"} for one photo; a failure is a row, not a stop."""
    start = time.perf_counter()
    out = {"file": src, "status": "done", "error": ""}
    try:
        data = Path(src).read_bytes()
        report = _worker["engine"].analyze_bytes(data, source=src, attributes=_worker["attributes"])
        if drawing:
            write_drawing(data, report["faces"], Path(drawing))
        out["rows"] = face_rows(src, report)
    except Exception as exc:  # a batch goes on past any one file
        message = str(exc) if isinstance(exc, (BadInput, OSError)) else f"{type(exc).__name__}: {exc}"
        out.update(status="failed", error=message.splitlines()[0] if message else type(exc).__name__)
        out["rows"] = [{"file": src, "face": "", "error": out["error"]}]
    out["ms"] = round((time.perf_counter() - start) * 1000, 1)
    return out


def photos_in(paths: list[Path]) -> list[tuple[Path, Path]]:
    """(photo, its path relative to the folder given) for every photo, folders walked in a
    stable order; a file given directly stands for itself."""
    out = []
    for root in paths:
        if root.is_dir():
            out += [(p, p.relative_to(root)) for p in sorted(root.rglob("*"))
                    if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
                    and not p.name.startswith(".")]
        else:
            out.append((root, Path(root.name)))
    return out


def read_table(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        return [row for row in csv.DictReader(f) if row.get("file")]


def write_table(rows: list[dict], path: Path) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, CSV_FIELDS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows({k: row.get(k, "") for k in CSV_FIELDS} for row in rows)
    atomic_write(path, buf.getvalue().encode())


def _sort_key(row: dict):
    return row["file"], int(row["face"]) if str(row.get("face", "")).isdigit() else -1


def run(paths: list[Path], table: Path, *, engine_kwargs: dict, attributes, workers: int = 1,
        draw_dir: Path | None = None, force: bool = False) -> int:
    """Analyse every photo under `paths` into the CSV `table`; 0, or 1 when a file failed.
    Files whose rows are already in the table (without an error, and not changed since) are
    skipped unless `force`; the table is rewritten atomically every few seconds and at the end."""
    for root in paths:
        if draw_dir and root.is_dir() and (draw_dir.resolve() == root.resolve()
                                           or root.resolve() in draw_dir.resolve().parents):
            raise BadInput("the --draw folder must not be the input folder or inside it")
    previous = [] if force else read_table(table)
    table_time = table.stat().st_mtime if previous else 0.0
    failed_before = {r["file"] for r in previous if r.get("error")}
    done_before = {r["file"] for r in previous} - failed_before
    jobs, photos = [], photos_in(paths)
    for src, rel in photos:
        if str(src) in done_before and src.stat().st_mtime <= table_time:
            continue
        jobs.append((str(src), str(draw_dir / rel) if draw_dir else None))
    redo = {src for src, _ in jobs}
    kept = [r for r in previous if r["file"] not in redo]
    skipped = len(photos) - len(jobs)
    rows = list(kept)
    last_save = [time.monotonic()]

    def save_now(result: dict) -> None:
        rows.extend(result["rows"])
        if time.monotonic() - last_save[0] >= SAVE_EVERY_S:
            write_table(sorted(rows, key=_sort_key), table)
            last_save[0] = time.monotonic()

    try:
        results = run_jobs("analyze", jobs, _analyze, _init_worker, (engine_kwargs, attributes),
                           workers, on_row=save_now)
    finally:  # an interrupted run keeps what it finished
        write_table(sorted(rows, key=_sort_key), table)
    failed = [r for r in results if r["status"] == "failed"]
    faces = sum(1 for r in rows if str(r.get("face", "")).isdigit())
    videos = sum(1 for p in expand_inputs([p for p in paths if p.is_dir()]) if p.suffix.lower() in VIDEO_EXTENSIONS)
    print(f"{len(results) - len(failed)} done, {skipped} skipped, {len(failed)} failed; "
          f"{faces} face(s) in {table}" + (f"; {videos} video(s) left out (analyse each on its own)"
                                           if videos else ""), file=sys.stderr)
    for r in failed:
        print(f"  failed: {r['file']}: {r['error']}", file=sys.stderr)
    return 1 if failed else 0
