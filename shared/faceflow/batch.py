"""Folders in, folders out: parallel workers, a progress bar, a summary, resumable runs."""
from __future__ import annotations

import csv
import io
import json
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

from .media import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS
from .images import BadInput, atomic_write

SUMMARY_FIELDS = ["file", "status", "faces", "ms", "output", "error"]
MEDIA_EXTENSIONS = set(IMAGE_EXTENSIONS) | VIDEO_EXTENSIONS


def expand_inputs(paths: list[Path]) -> list[Path]:
    """Files as given; folders walked for images and videos, in a stable order."""
    out = []
    for path in paths:
        if path.is_dir():
            out += sorted(p for p in path.rglob("*")
                          if p.is_file() and p.suffix.lower() in MEDIA_EXTENSIONS
                          and not p.name.startswith("."))
        else:
            out.append(path)
    return out


class Progress:
    """A one-line progress bar on stderr (silent when stderr is not a terminal)."""

    def __init__(self, label: str, total: int | None = None, stream=sys.stderr):
        self.label, self.total, self.stream = label, total, stream
        self.start = time.perf_counter()
        self.enabled = stream.isatty()

    def __call__(self, done: int, total: int | None = None) -> None:
        total = total or self.total
        if not self.enabled:
            return
        rate = done / max(1e-6, time.perf_counter() - self.start)
        if total:
            filled = int(30 * done / total)
            bar = "#" * filled + "-" * (30 - filled)
            self.stream.write(f"\r{self.label} [{bar}] {done}/{total} {rate:.1f}/s")
        else:
            self.stream.write(f"\r{self.label} {done} {rate:.1f}/s")
        if total and done >= total:
            self.stream.write("\n")
        self.stream.flush()


def run_jobs(label: str, jobs: list[tuple], process, initializer, initargs: tuple, workers: int,
             on_row=None) -> list[dict]:
    """`process(*job)` for every job, in `workers` processes (each set up once by
    `initializer(*initargs)`) or in this one; a progress bar; one row per job, in the order they
    finish. `on_row(row)` sees each row as it comes (to save progress)."""
    rows: list[dict] = []
    progress = Progress(label, len(jobs))

    def finished(row: dict) -> None:
        rows.append(row)
        if on_row is not None:
            on_row(row)
        progress(len(rows))

    if workers > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(workers, initializer=initializer, initargs=initargs) as pool:
            for fut in as_completed([pool.submit(process, *job) for job in jobs]):
                finished(fut.result())
    elif jobs:
        initializer(*initargs)
        for job in jobs:
            finished(process(*job))
    return rows


# --- workers: one engine per process, loaded once -------------------------------------------
_worker: dict = {}


def _init_worker(engine_kwargs: dict, mask_kwargs: dict, video_kwargs: dict, verify: bool,
                 verify_video: bool) -> None:
    from .anonymize import MaskOptions
    from .engine import Engine
    from .video import VideoOptions
    _worker.update(engine=Engine(**engine_kwargs), mask=MaskOptions(**mask_kwargs),
                   video=VideoOptions(**video_kwargs), verify=verify,
                   verify_video=verify_video)


def _process(src: str, dst: str, report: str | None) -> dict:
    start = time.perf_counter()
    row = {"file": src, "output": dst, "faces": "", "error": ""}
    try:
        engine = _worker["engine"]
        if Path(src).suffix.lower() in VIDEO_EXTENSIONS:
            summary = engine.anonymize_file(src, dst, _worker["mask"], verify=_worker["verify_video"],
                                            report=report, video_options=_worker["video"])
            row["faces"] = summary["faces"]
        else:
            result = engine.anonymize_file(src, dst, _worker["mask"], verify=_worker["verify"])
            row["faces"] = len(result["faces"])
            if report:
                atomic_write(report, json.dumps(result, indent=1).encode())
        row["status"] = "done"
    except BadInput as exc:
        row.update(status="failed", error=str(exc), output="")
    except Exception as exc:  # a batch goes on past any one file
        row.update(status="failed", error=f"{type(exc).__name__}: {exc}".splitlines()[0], output="")
    row["ms"] = round((time.perf_counter() - start) * 1000, 1)
    return row


def plan(src_dir: Path, dst_dir: Path, report_dir: Path | None, force: bool):
    """(jobs to run, rows for files skipped because their output is already up to date)."""
    jobs, skipped = [], []
    for src in expand_inputs([src_dir]):
        rel = src.relative_to(src_dir)
        dst = dst_dir / rel
        report = str(report_dir / rel.with_suffix(rel.suffix + ".json")) if report_dir else None
        if not force and dst.is_file() and dst.stat().st_mtime >= src.stat().st_mtime:
            skipped.append({"file": str(src), "status": "skipped", "faces": "", "ms": 0,
                            "output": str(dst), "error": "output exists (use --force)"})
        else:
            jobs.append((str(src), str(dst), report))
    return jobs, skipped


def run_batch(args, src_dir: Path, dst_dir: Path) -> int:
    if dst_dir.resolve() == src_dir.resolve() or src_dir.resolve() in dst_dir.resolve().parents:
        raise BadInput("the output folder must not be the input folder or inside it")
    report_dir = Path(args.report) if args.report else None
    jobs, rows = plan(src_dir, dst_dir, report_dir, args.force)
    engine_kwargs = dict(detector=args.detector, model_dir=args.models, providers=args.providers,
                         threads=1 if args.workers > 1 else 0, max_side=args.max_side,
                         threshold=args.threshold)
    mask_kwargs = dict(method=args.method, shape=args.shape, mask_scale=args.mask_scale, cells=args.cells)
    video_kwargs = dict(keep_audio=not args.no_audio, max_missing_s=args.hold, batch=args.batch)
    init = (engine_kwargs, mask_kwargs, video_kwargs, not args.no_verify,
            args.verify_video and not args.no_verify)
    rows += run_jobs("anonymize", jobs, _process, _init_worker, init, args.workers)
    rows.sort(key=lambda r: r["file"])
    summary_path = Path(args.summary) if args.summary else dst_dir / "faceflow-summary.csv"
    write_summary(rows, summary_path)
    failed = [r for r in rows if r["status"] == "failed"]
    done = sum(r["status"] == "done" for r in rows)
    skipped = sum(r["status"] == "skipped" for r in rows)
    print(f"{done} done, {skipped} skipped, {len(failed)} failed; summary: {summary_path}", file=sys.stderr)
    for r in failed:
        print(f"  failed: {r['file']}: {r['error']}", file=sys.stderr)
    return 1 if failed else 0


def write_summary(rows: list[dict], path: Path) -> None:
    if path.suffix.lower() == ".json":
        data = json.dumps(rows, indent=1).encode()
    else:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, SUMMARY_FIELDS)
        writer.writeheader()
        writer.writerows({k: r.get(k, "") for k in SUMMARY_FIELDS} for r in rows)
        data = buf.getvalue().encode()
    atomic_write(path, data)
