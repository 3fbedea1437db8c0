"""The `faceflow` command: anonymize, analyze, swap, models, serve, monitor, stream."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

from . import bundle
from .images import BadInput

EXIT_FAILED, EXIT_BAD_INPUT, EXIT_MODELS = 1, 2, 3


def _mask_options(args):
    from .anonymize import MaskOptions
    try:
        return MaskOptions(method=args.method, shape=args.shape, mask_scale=args.mask_scale,
                           cells=args.cells)
    except ValueError as exc:
        raise BadInput(str(exc)) from None


def _engine(args, threads: int = 0):
    from .engine import Engine
    return Engine(detector=args.detector, model_dir=args.models, providers=args.providers,
                  threads=threads, max_side=args.max_side, threshold=args.threshold)


def _video_options(args):
    from .video import VideoOptions
    return VideoOptions(keep_audio=not args.no_audio, max_missing_s=args.hold, batch=args.batch)


def _verify(args, src: Path) -> bool:
    from .batch import VIDEO_EXTENSIONS
    if args.no_verify:
        return False
    return args.verify_video if src.suffix.lower() in VIDEO_EXTENSIONS else True


def cmd_anonymize(args) -> int:
    from . import batch
    src = Path(args.input)
    if src.is_dir():
        if args.from_report:
            raise BadInput("--from-report renders one photo or video, not a folder")
        return batch.run_batch(args, src, Path(args.output))
    dst = Path(args.output)
    if dst.is_dir():
        dst = dst / src.name
    if dst.resolve() == src.resolve():
        raise BadInput("output would overwrite the input")
    if args.from_report:
        return _anonymize_from_report(args, src, dst)
    engine = _engine(args)
    kwargs = {"verify": _verify(args, src)}
    if src.suffix.lower() in batch.VIDEO_EXTENSIONS:
        kwargs.update(report=args.report, video_options=_video_options(args),
                      progress=batch.Progress(src.name) if sys.stderr.isatty() else None)
    if src.suffix.lower() in batch.VIDEO_EXTENSIONS and args.workers > 1:
        # One video, several processes: cut at keyframes, chunks in parallel, joined losslessly.
        from .chunks import process_video_in_chunks
        report = process_video_in_chunks(engine, src, dst, workers=args.workers,
                                         target_seconds=args.chunk_seconds, report=args.report,
                                         mask_options=_mask_options(args),
                                         video_options=kwargs["video_options"], verify=kwargs["verify"])
    else:
        report = engine.anonymize_file(src, dst, _mask_options(args), **kwargs)
    if args.report and src.suffix.lower() not in batch.VIDEO_EXTENSIONS:
        from .images import atomic_write
        atomic_write(args.report, json.dumps(report, indent=1).encode())
    faces = report.get("faces") if isinstance(report.get("faces"), int) else len(report.get("faces", []))
    print(f"{src} -> {dst}: {faces} face(s) masked in {report['ms']:.0f} ms", file=sys.stderr)
    return 0


def _anonymize_from_report(args, src: Path, dst: Path) -> int:
    """Render exactly the faces of an edited report (faceflow.review): no detection, except
    to follow the boxes drawn by hand on a video."""
    from . import batch, review
    from .images import atomic_write
    report = review.load(Path(args.from_report))
    if src.suffix.lower() in batch.VIDEO_EXTENSIONS:
        if args.workers > 1:
            raise BadInput("--from-report renders a video in one process: leave out --workers")
        rendered = review.render_video(_engine(args) if review.follows(report) else None, src, dst, report,
                                       _mask_options(args), _video_options(args), report_out=args.report,
                                       progress=batch.Progress(src.name) if sys.stderr.isatty() else None)
    else:
        rendered = review.render_photo_file(src, dst, report, _mask_options(args))
        if args.report:
            atomic_write(args.report, json.dumps(rendered, indent=1).encode())
    print(f"{src} -> {dst}: {rendered['masked']} face(s) masked as {args.from_report} gives them "
          f"in {rendered['ms']:.0f} ms", file=sys.stderr)
    return 0


def _attributes(args) -> tuple[str, ...] | None:
    """What to compute per face: --attributes, else the defaults when their models are
    installed (detection only, with a note, when not); --mesh adds the points. None is
    detection only. Rekognition's format also takes the mesh when it runs anyway, for its
    landmarks."""
    from .analysis import DEFAULT_ATTRIBUTES, MESH_ATTRIBUTES, models_for, parse_attributes
    try:
        chosen = parse_attributes(args.attributes) if args.attributes is not None else None
    except ValueError as exc:
        raise BadInput(str(exc)) from None
    if chosen is None:
        try:
            for name in models_for(DEFAULT_ATTRIBUTES):
                bundle.model_path(name, args.models)
            chosen = DEFAULT_ATTRIBUTES
        except bundle.ModelError as exc:
            print(f"faceflow: analysis models missing, faces only ({exc})", file=sys.stderr)
            chosen = ()
    if args.mesh or (args.format == "rekognition" and MESH_ATTRIBUTES & set(chosen)):
        chosen = parse_attributes((*chosen, "mesh"))
    return chosen or None


def cmd_analyze(args) -> int:
    from .batch import VIDEO_EXTENSIONS, expand_inputs
    if args.draw and not args.csv:
        raise BadInput("--draw goes with --csv (a folder of photos)")
    attributes = _attributes(args)
    if args.csv:
        from . import facetable
        if args.format != "json":
            raise BadInput("--csv writes its own table; leave out --format")
        engine_kwargs = dict(detector=args.detector, model_dir=args.models, providers=args.providers,
                             threads=1 if args.workers > 1 else 0, max_side=args.max_side,
                             threshold=args.threshold)
        return facetable.run([Path(p) for p in args.paths], Path(args.csv), engine_kwargs=engine_kwargs,
                             attributes=attributes, workers=args.workers,
                             draw_dir=Path(args.draw) if args.draw else None, force=args.force)
    engine = _engine(args)
    status = 0
    for path in expand_inputs([Path(p) for p in args.paths]):
        try:
            if args.format == "rekognition":
                if path.suffix.lower() in VIDEO_EXTENSIONS:
                    raise BadInput("--format rekognition takes photos (DetectFaces' shape)")
                from .rekognition import detect_faces_response
                record = detect_faces_response(engine.analyze_file(path, attributes))
            else:
                record = engine.analyze_file(path, attributes)
        except BadInput as exc:
            record = {"source": str(path), "error": str(exc)}
            print(f"faceflow: {path}: {exc}", file=sys.stderr)
            status = EXIT_BAD_INPUT
        sys.stdout.write(json.dumps(record) + "\n")
        sys.stdout.flush()
    return status


def _swap_options(args):
    from .swap import SwapOptions
    chosen = {"engine": args.engine} if args.engine else {}
    return SwapOptions(face_index=args.face_index, largest=args.largest,
                       tracks=set(args.track) if args.track else None, **chosen)


def cmd_swap(args) -> int:
    """Swap the --face photo's face onto a photo, a video or a folder of them. The source is
    read and its face found before any output is written."""
    from . import batch
    from .images import atomic_write
    src, dst = Path(args.target), Path(args.output)
    options = _swap_options(args)
    source_path = Path(args.face)
    try:
        source_bytes = source_path.read_bytes()
    except OSError as exc:
        raise BadInput(f"cannot read the source face photo {source_path}: {exc.strerror}") from None
    if src.is_dir():
        if dst.resolve() == src.resolve() or src.resolve() in dst.resolve().parents:
            raise BadInput("the output folder must not be the input folder or inside it")
        jobs, rows = batch.plan(src, dst, Path(args.report) if args.report else None, args.force)
    else:
        if dst.is_dir():
            dst = dst / src.name
        if dst.resolve() == src.resolve():
            raise BadInput("output would overwrite the input")
        jobs, rows = [(str(src), str(dst), args.report)], []
    engine = _engine(args)
    prepared = engine.swap_operation(source_bytes, options)  # a source without a face fails here
    video_options = _video_options(args)
    progress = batch.Progress("swap", len(jobs)) if src.is_dir() else None
    for target, output, report in jobs:
        start = time.perf_counter()
        row = {"file": target, "output": output, "faces": "", "error": ""}
        is_video = Path(target).suffix.lower() in batch.VIDEO_EXTENSIONS
        try:
            result = engine.swap_file(target, output, prepared, video_options=video_options,
                                      report=report if is_video else None)
            if report and not is_video:
                atomic_write(report, json.dumps(result, indent=1).encode())
            swapped = (sum(t["frames_swapped"] > 0 for t in result["swapped_tracks"]) if is_video
                       else result["swapped"])
            row.update(status="done", faces=swapped)
            print(f"{target} -> {output}: {swapped} {'track(s)' if is_video else 'face(s)'} swapped "
                  f"({result['engine']}, marked {result['marking']['digital_source_type'].rsplit('/', 1)[1]})",
                  file=sys.stderr)
        except BadInput as exc:
            if not src.is_dir():
                raise
            row.update(status="failed", error=str(exc), output="")
        row["ms"] = round((time.perf_counter() - start) * 1000, 1)
        rows.append(row)
        if progress:
            progress(len(rows))
    if not src.is_dir():
        return 0
    rows.sort(key=lambda r: r["file"])
    summary_path = Path(args.summary) if args.summary else dst / "faceflow-summary.csv"
    batch.write_summary(rows, summary_path)
    failed = [r for r in rows if r["status"] == "failed"]
    for r in failed:
        print(f"  failed: {r['file']}: {r['error']}", file=sys.stderr)
    return 1 if failed else 0


def cmd_models(args) -> int:
    if args.action == "fetch":
        bundle.fetch(args.dir, args.only or None, log=lambda m: print(m, file=sys.stderr))
        return 0
    if args.action == "verify":
        problems = bundle.verify(args.dir)
        for p in problems:
            print(p, file=sys.stderr)
        print("ok" if not problems else f"{len(problems)} problem(s)", file=sys.stderr)
        return EXIT_MODELS if problems else 0
    manifest = bundle.load_manifest(Path(args.dir) if args.dir else None)
    for name, entry in manifest["models"].items():
        print(f"{name:12} {entry['licence']:11} {entry['package']:30} {entry['member']}")
    return 0


def cmd_stream(args) -> int:
    import asyncio

    from .streamclient import play, sigv4_headers
    headers = {"Authorization": f"Bearer {args.token}"} if args.token else {}
    if args.sigv4:
        headers.update(sigv4_headers(args.to))
    try:
        stats = play(args.input, args.to, output=args.output, fps=args.fps, return_frames=args.return_frames,
                     limit=args.frames, window=args.window, binary=args.binary, quality=args.quality,
                     headers=headers)
    except (OSError, ConnectionError, asyncio.TimeoutError) as exc:
        print(f"faceflow: cannot stream to {args.to}: {exc or type(exc).__name__}", file=sys.stderr)
        return EXIT_FAILED
    print(json.dumps(stats.to_dict()) if args.json else stats.summary())
    return 0


def cmd_serve(args) -> int:
    try:
        from .web import serve
    except ImportError as exc:
        raise BadInput(f"faceflow serve needs the serve extra (pip install 'faceflow[serve]'): {exc}") from None
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"faceflow: serving on {args.host}: anyone who reaches it can use it (no authentication); "
              "see the README on putting it behind a proxy", file=sys.stderr)
    limits = serve.Limits(workers=args.workers, waiting=args.queue, timeout_s=args.timeout)
    engine_options = {k: v for k, v in dict(detector=args.detector, model_dir=args.models, providers=args.providers,
                                            max_side=args.max_side, threshold=args.threshold).items()
                      if v is not None}
    url = args.public_url or f"http://{'[' + args.host + ']' if ':' in args.host else args.host}:{args.port}/"
    serve.run(args.host, args.port, Path(args.workdir) if args.workdir else None, limits, args.public_url,
              engine_options, ready=lambda _: print(f"faceflow serve: open {url}", file=sys.stderr, flush=True))
    return 0


def cmd_monitor(args) -> int:
    try:
        from .web import monitor
    except ImportError as exc:
        raise BadInput(f"faceflow monitor needs the serve extra (pip install 'faceflow[serve]'): {exc}") from None
    return monitor.main(args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="faceflow", description="Find and anonymise faces in photos and videos.")
    sub = p.add_subparsers(dest="command", required=True)

    def engine_options(sp):
        sp.add_argument("--detector", default="yunet", help="yunet (default), retinaface, centerface, or an .onnx path")
        sp.add_argument("--threshold", type=float, default=None, help="detection score threshold (detector default)")
        sp.add_argument("--max-side", type=int, default=None, help="longest side the detector sees (default 640)")
        sp.add_argument("--models", default=None, help="model folder (default $FACEFLOW_MODEL_DIR or ~/.cache/faceflow/models)")
        sp.add_argument("--providers", default=None, help="onnxruntime providers: cpu, gpu, or a comma list")

    def media_output_options(sp):
        """What anonymize and swap share: the batch summary and resume, a video's audio and the
        detector's batch (their --hold differs in meaning, so each keeps its own)."""
        sp.add_argument("--summary", default=None, help="batch summary, .csv or .json (default OUTPUT/faceflow-summary.csv)")
        sp.add_argument("--force", action="store_true", help="redo files whose output is already there")
        sp.add_argument("--no-audio", action="store_true", help="drop audio from videos (kept by default)")
        sp.add_argument("--batch", type=int, default=1, help="video frames per detector call")

    a = sub.add_parser("anonymize", aliases=["anonymise"], help="mask every face in a photo, video or folder")
    a.add_argument("input")
    a.add_argument("-o", "--output", required=True, help="output file, or folder for a folder input")
    a.add_argument("--method", default="blur", choices=["blur", "pixelate", "solid"])
    a.add_argument("--shape", default="ellipse", choices=["ellipse", "box"])
    a.add_argument("--mask-scale", type=float, default=1.6, help="mask size relative to the face box")
    a.add_argument("--cells", type=int, default=2, help="detail left across a face (blur/pixelate; lower is stronger)")
    a.add_argument("--report", default=None, help="JSON report (file; a folder for a folder input)")
    a.add_argument("--from-report", default=None, metavar="EDITED.json",
                   help="mask exactly the faces of this (edited) report instead of detecting them")
    a.add_argument("--workers", type=int, default=1, help="parallel processes (a folder: files; a video: chunks)")
    a.add_argument("--chunk-seconds", type=float, default=6.0, help="chunk length for a video with --workers > 1")
    a.add_argument("--no-verify", action="store_true", help="skip the check that masked faces are undetectable (photos)")
    a.add_argument("--verify-video", action="store_true", help="run that check on every video frame too (about half the speed)")
    a.add_argument("--hold", type=float, default=1.5, help="seconds a lost face stays covered in video")
    media_output_options(a)
    engine_options(a)
    a.set_defaults(func=cmd_anonymize)

    z = sub.add_parser("analyze", aliases=["analyse"], help="print faces as JSON Lines")
    z.add_argument("paths", nargs="+")
    z.add_argument("--attributes", default=None,
                   help="what to compute per face, comma-separated: gender, age, pose, quality, eyes, mesh, "
                        "or none (default: all but mesh when the models are installed; in a video, a sample of each track's faces)")
    z.add_argument("--mesh", action="store_true", help="add the 468 face mesh points to each face")
    z.add_argument("--format", default="json", choices=["json", "rekognition"],
                   help="json: faceflow's records; rekognition: DetectFaces' response, one per photo")
    z.add_argument("--csv", default=None,
                   help="photos of the folder(s) into this CSV, a row per face (file, face, box, score, "
                        "gender, age, pose, sharpness) and per failed file; files already in it are skipped")
    z.add_argument("--workers", type=int, default=1, help="parallel processes (with --csv)")
    z.add_argument("--draw", default=None, help="with --csv: write each photo here with boxes and labels")
    z.add_argument("--force", action="store_true", help="with --csv: redo files already in the CSV")
    engine_options(z)
    z.set_defaults(func=cmd_analyze)

    w = sub.add_parser("swap", help="put a source face onto the faces of a photo, video or folder "
                                    "(the output is marked as synthetic)")
    w.add_argument("target", help="photo, video or folder")
    w.add_argument("--face", required=True, help="the source photo (one face; with several the largest, or --face-index)")
    w.add_argument("-o", "--output", required=True, help="output file, or folder for a folder input")
    w.add_argument("--face-index", type=int, default=None, help="which face of the source photo, counted left to right from 0")
    which = w.add_mutually_exclusive_group()
    which.add_argument("--largest", action="store_true", help="swap only the largest target face")
    which.add_argument("--track", type=int, action="append", help="swap only this track (video; repeatable; ids from an analyze report)")
    w.add_argument("--engine", default=None,
                   help="landmark (default, shipped models) or inswapper (your own inswapper_128.onnx and w600k_r50.onnx in --models)")
    w.add_argument("--report", default=None, help="JSON report of each swapped face and track (a folder for a folder input)")
    w.add_argument("--hold", type=float, default=1.5, help="seconds the tracker follows a lost face in video")
    media_output_options(w)
    engine_options(w)
    w.set_defaults(func=cmd_swap)

    s = sub.add_parser("serve", help="the page and the HTTP API on this machine (no AWS)")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=int, default=8080)
    s.add_argument("--workers", type=int, default=max(1, min(4, os.cpu_count() or 1)),
                   help="requests processed at once (default: the cores, at most 4)")
    s.add_argument("--queue", type=int, default=16, help="requests waiting for a worker before a 503 (default 16)")
    s.add_argument("--timeout", type=float, default=60.0, help="seconds a request may take before a 504")
    s.add_argument("--workdir", default=None, help="folder for jobs' files (default: a temporary one)")
    s.add_argument("--public-url", default=None,
                   help="the URL clients reach this server at (behind a proxy); default: the Host they asked for")
    engine_options(s)
    s.set_defaults(func=cmd_serve)

    mo = sub.add_parser("monitor", help="load a faceflow server with real photos; latency, CPU and memory")
    mo.add_argument("url", help="the server, e.g. http://127.0.0.1:8080")
    mo.add_argument("--requests", type=int, default=100)
    mo.add_argument("--concurrency", type=int, default=4)
    mo.add_argument("--warmup", action="store_true", help="one request per connection first, not counted")
    mo.add_argument("--images", default=None, help="folder of photos (default ../shared/data/images when present)")
    mo.add_argument("--route", default="/v1/anonymize", help="the route photos are POSTed to (default /v1/anonymize)")
    mo.add_argument("--out", default="monitor", help="folder for monitor.csv and monitor.png (default ./monitor)")
    mo.add_argument("--pid", type=int, default=None,
                    help="sample this local process with psutil instead of the server's /metrics")
    mo.add_argument("--interval", type=float, default=0.5, help="seconds between CPU and memory samples")
    mo.add_argument("--timeout", type=float, default=120.0, help="seconds a request may take")
    mo.set_defaults(func=cmd_monitor)

    st = sub.add_parser("stream", help="play a video as a live stream to a server; print latency and drops")
    st.add_argument("input", help="video file, played at its frame rate")
    st.add_argument("--to", required=True, help="ws://HOST:PORT/v1/stream (faceflow serve), wss://... (the "
                                                "deployed WebSocket API) or grpc://HOST:PORT (the GPU container)")
    st.add_argument("-o", "--output", default=None, help="write the anonymised frames that come back as a video")
    st.add_argument("--fps", type=float, default=None, help="frames per second to send (default: the video's)")
    st.add_argument("--return-frames", action="store_true", help="ask for the anonymised frames (implied by -o)")
    st.add_argument("--frames", type=int, default=None, help="play only the first N frames")
    st.add_argument("--window", type=int, default=4, help="frames in flight at most; later ones are dropped")
    st.add_argument("--quality", type=int, default=80, help="JPEG quality of the frames sent and returned")
    st.add_argument("--binary", action="store_true", help="binary WebSocket messages (faceflow serve only)")
    st.add_argument("--token", default=os.environ.get("FACEFLOW_TOKEN"),
                    help="a JWT sent as Authorization: Bearer (the deployed API with AuthMode JWT; "
                         "default $FACEFLOW_TOKEN)")
    st.add_argument("--sigv4", action="store_true",
                    help="sign the connect with your AWS credentials (the deployed API with AuthMode IAM)")
    st.add_argument("--json", action="store_true", help="print the statistics as JSON")
    st.set_defaults(func=cmd_stream)

    m = sub.add_parser("models", help="fetch, verify or list the model bundle")
    m.add_argument("action", choices=["fetch", "verify", "list"])
    m.add_argument("--dir", default=None, help="model folder (default as --models above)")
    m.add_argument("--only", action="append", help="fetch only this model (repeatable)")
    m.set_defaults(func=cmd_models)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except BadInput as exc:
        print(f"faceflow: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except bundle.ModelError as exc:
        print(f"faceflow: model error: {exc}", file=sys.stderr)
        return EXIT_MODELS
    except KeyboardInterrupt:
        print("faceflow: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # one line for the user; the trace on request
        if os.environ.get("FACEFLOW_DEBUG"):
            traceback.print_exc()
        print(f"faceflow: failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
              file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
