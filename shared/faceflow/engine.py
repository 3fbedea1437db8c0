"""The engine: one loaded detector plus the operations that use its faces.

    engine = Engine()                                  # models from the bundle, CPU
    faces = engine.detect(bgr_image)                   # list[Face]
    result = engine.anonymize_bytes(jpeg_bytes)        # bytes out + report, no files
    report = engine.anonymize_file("in.jpg", "out.jpg")
    result = engine.swap_bytes(target_jpeg, source_jpeg, SwapOptions())   # face swap, marked

Operations are objects with `apply(pixels, faces) -> pixels` so new ones (face swap) plug in
beside masking without touching the decode/detect/encode flow.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from . import images, insightface_pack, media
from .anonymize import MaskOptions
from .detectors import DEFAULT_DETECTOR, Detector, load_detector
from .face import Face
from .operations import VERIFY_THRESHOLD, Mask, Operation  # noqa: F401 (re-exported)

if TYPE_CHECKING:
    from .analysis import Analyzer
    from .swap import Swap, SwapOptions

VIDEO_EXTENSIONS = media.VIDEO_EXTENSIONS


@dataclass
class Result:
    data: bytes
    format: str
    report: dict[str, Any]


class Engine:
    def __init__(self, detector: str | Detector = DEFAULT_DETECTOR, model_dir=None,
                 providers=None, threads: int = 0, max_side: int | None = None,
                 threshold: float | None = None):
        if isinstance(detector, Detector):
            self.detector = detector
        elif detector in (DEFAULT_DETECTOR, insightface_pack.InsightfaceDetector.name) and \
                insightface_pack.is_pack(model_dir):
            # An operator's own insightface pack as the model folder: its SCRFD, through insightface.
            self.detector = insightface_pack.load_detector(model_dir, providers, threads, max_side)
        else:
            self.detector = load_detector(detector, model_dir=model_dir, providers=providers,
                                          threads=threads, max_side=max_side)
        self.threshold = self.detector.default_threshold if threshold is None else threshold
        # Analysis models load on first use, one Analyzer per set of attributes asked for.
        self._analysis_options = {"model_dir": model_dir, "providers": providers, "threads": threads}
        self._analyzers: dict[tuple[str, ...], Analyzer] = {}
        self._swappers: dict[str, Any] = {}  # swap engines by name, loaded on first use

    # --- faces ---------------------------------------------------------------------------
    def detect(self, bgr: np.ndarray, threshold: float | None = None) -> list[Face]:
        return self.detector.detect(bgr, self.threshold if threshold is None else threshold)

    def detect_batch(self, frames: list[np.ndarray], threshold: float | None = None) -> list[list[Face]]:
        return self.detector.detect_batch(frames, self.threshold if threshold is None else threshold)

    # --- stills --------------------------------------------------------------------------
    def analyzer(self, attributes) -> "Analyzer":
        """The Analyzer for these attributes (see faceflow.analysis), built on first use."""
        from .analysis import Analyzer, parse_attributes
        key = parse_attributes(attributes)
        if key not in self._analyzers:
            self._analyzers[key] = Analyzer(key, **self._analysis_options)
        return self._analyzers[key]

    def analyze_picture(self, picture: images.Picture, source: str = "",
                        attributes=None) -> dict[str, Any]:
        """Faces of a still; with `attributes` (names from faceflow.analysis.ATTRIBUTES), each
        face also carries them. None: detection only."""
        bgr = images.to_bgr8(picture.pixels)
        faces = self.detect(bgr)
        records = ([f.to_dict() for f in faces] if attributes is None
                   else self.analyzer(attributes).analyze(bgr, faces))
        if picture.scale > 1:  # a reduced decode: positions in the image's own pixels
            factor = picture.width / picture.pixels.shape[1]
            records = [_scaled(record, factor) for record in records]
        return {"source": source, "width": picture.width, "height": picture.height,
                "format": picture.format, "faces": records}

    def analyze_bytes(self, data: bytes, source: str = "", attributes=None,
                      memory_bytes: int | None = None) -> dict[str, Any]:
        """Faces of a still. The detector sees at most its input size, so a large photo is
        decoded reduced (JPEG by 1/2, 1/4 or 1/8 in the decoder itself) to no less than twice
        that; `memory_bytes`: see images.pixel_budget."""
        reduce = images.reduction_for(images.header(data), 2 * self.detector.max_side)
        return self.analyze_picture(images.decode(data, reduce, memory_bytes, encoded=False), source, attributes)

    def process_picture(self, picture: images.Picture, operation: Operation) -> list[list[Face]]:
        """Apply `operation` to every frame (one, or each GIF frame) in place; faces per frame."""
        frames = picture.frames if picture.frames else [picture.pixels]
        found = []
        for pixels in frames:
            faces = self.detect(images.to_bgr8(pixels))
            operation.apply(pixels, faces)
            found.append(faces)
        return found

    def anonymize_bytes(self, data: bytes, options: MaskOptions | None = None,
                        out_format: str | None = None, source: str = "",
                        verify: bool = True, memory_bytes: int | None = None) -> Result:
        """Mask every face of a still and encode it as `out_format` (default: its own format;
        JPEG when this installation cannot encode that one). An image whose decoding and
        processing would not fit in `memory_bytes` (see images.pixel_budget) is refused with
        images.TooLarge before it is decoded."""
        start = time.perf_counter()
        fmt = (out_format or images.header(data).format).upper()
        if not images.can_write(fmt):
            fmt = "JPEG"
        picture = images.decode(data, memory_bytes=memory_bytes, out_format=fmt)
        found = self.process_picture(picture, Mask(options or MaskOptions(),
                                                   self.detector if verify else None))
        out = images.encode(picture, fmt)
        report = {"source": source, "width": picture.width, "height": picture.height,
                  "format": fmt, "faces": [f.to_dict() for f in found[0]],
                  "ms": round((time.perf_counter() - start) * 1000, 1)}
        if len(found) > 1:
            report["frames"] = [{"frame": i, "faces": [f.to_dict() for f in faces]}
                                for i, faces in enumerate(found)]
        return Result(out, fmt, report)

    def anonymize_file(self, src: Path | str, dst: Path | str,
                       options: MaskOptions | None = None, verify: bool | None = None,
                       video_options=None, report: Path | str | None = None,
                       progress=None) -> dict[str, Any]:
        """Anonymise a photo or a video file. `verify` (re-detect inside every mask and
        strengthen it until nothing is found) defaults to on for photos and off for video,
        where the tracker and the size-relative mask already carry it and a second detector
        pass per frame would halve the frame rate."""
        src, dst = Path(src), Path(dst)
        if src.suffix.lower() in VIDEO_EXTENSIONS:
            from .video import anonymize_video
            return anonymize_video(self, src, dst, options or MaskOptions(), report=report,
                                   options=video_options, verify=bool(verify), progress=progress)
        verify = True if verify is None else verify
        data = _read_bytes(src)
        picture_format = images.sniff(data)[0]
        result = self.anonymize_bytes(data, options, images.format_for(dst, picture_format),
                                      source=str(src), verify=verify)
        images.atomic_write(dst, result.data)
        result.report["output"] = str(dst)
        return result.report

    # --- face swap ---------------------------------------------------------------------------
    def swapper(self, name: str):
        """The swap engine `name` (faceflow.swap.ENGINES), its models loaded on first use."""
        from .swap import SwapOptions, make_swapper
        if name not in self._swappers:
            self._swappers[name] = make_swapper(SwapOptions(engine=name), **self._analysis_options)
        return self._swappers[name]

    def swap_operation(self, source: "bytes | Swap", options: "SwapOptions | None" = None,
                       fps: float = 25.0, memory_bytes: int | None = None) -> "Swap":
        """The Operation that pastes the source photo's face (`face_index`, else its largest)
        onto the faces `options` selects; `fps`: the video's, for the smoothing. `source` may
        be an operation made before (its prepared face reused, its video state fresh). A
        large source photo is decoded reduced (its longer side kept >= SOURCE_MIN_SIDE) and
        within `memory_bytes` (see images.pixel_budget)."""
        from .swap import SOURCE_MIN_SIDE, Swap, SwapOptions, pick_source_face
        if isinstance(source, Swap):
            return source.fresh(fps)
        options = options or SwapOptions()
        reduce = images.reduction_for(images.header(source), SOURCE_MIN_SIDE)
        picture = images.decode(source, reduce, memory_bytes, encoded=False)
        bgr = images.to_bgr8(picture.pixels)
        face = pick_source_face(self.detect(bgr), options.face_index)
        swapper = self.swapper(options.engine)
        return Swap(swapper, swapper.prepare(bgr, face), options, fps=fps)

    def swap_bytes(self, target: bytes, source: "bytes | Swap", options: "SwapOptions | None" = None,
                   out_format: str | None = None, target_name: str = "",
                   memory_bytes: int | None = None) -> Result:
        """Swap the source photo's face onto the target photo's faces; the output (the
        target's format, or `out_format`) carries the synthetic mark (faceflow.synthetic).
        `source`: the source photo, or an operation from swap_operation."""
        start = time.perf_counter()
        fmt = (out_format or images.header(target).format).upper()
        if not images.can_write(fmt):
            fmt = "JPEG"
        operation = self.swap_operation(source, options, memory_bytes=memory_bytes)
        picture = images.decode(target, memory_bytes=memory_bytes, out_format=fmt)
        found = self.process_picture(picture, operation)
        out = images.encode(picture, fmt, synthetic_mark=operation.digital_source_type)
        faces = [f.to_dict() for f in found[0]]
        report = {"source": target_name, "width": picture.width, "height": picture.height,
                  "format": fmt, "operation": "swap", "engine": operation.engine,
                  "options": operation.options.to_dict(), "faces": faces,
                  "swapped": sum(f["swap"]["swapped"] for f in faces),
                  "marking": operation.marking("image", fmt),
                  "ms": round((time.perf_counter() - start) * 1000, 1)}
        if len(found) > 1:
            report["frames"] = [{"frame": i, "faces": [f.to_dict() for f in faces]}
                                for i, faces in enumerate(found)]
        return Result(out, fmt, report)

    def swap_file(self, src: Path | str, dst: Path | str, source: "Path | str | bytes | Swap",
                  options: "SwapOptions | None" = None, video_options=None,
                  report: Path | str | None = None, progress=None) -> dict[str, Any]:
        """Swap onto a photo or a video file (formats, audio, frame count and timing as
        anonymize_file). `source`: the source photo (path or bytes) or an operation from
        swap_operation. The source is checked before anything is written."""
        from .swap import Swap
        src, dst = Path(src), Path(dst)
        if not isinstance(source, (bytes, Swap)):
            source = _read_bytes(Path(source))
        if src.suffix.lower() in VIDEO_EXTENSIONS:
            from .video import probe, swap_video
            operation = self.swap_operation(source, options, fps=probe(src).fps)
            return swap_video(self, src, dst, operation, report=report, options=video_options,
                              progress=progress)
        data = _read_bytes(src)
        result = self.swap_bytes(data, source, options,
                                 images.format_for(dst, images.sniff(data)[0]), target_name=str(src))
        images.atomic_write(dst, result.data)
        result.report["output"] = str(dst)
        return result.report

    def analyze_file(self, src: Path | str, attributes=None) -> dict[str, Any]:
        """A photo's faces with `attributes`; a video's faces per frame, with `attributes` on a
        sample of each track's faces and per track their summary (faceflow.trackanalysis)."""
        src = Path(src)
        if src.suffix.lower() in VIDEO_EXTENSIONS:
            from .video import analyze_video
            return analyze_video(self, src, attributes=attributes)
        return self.analyze_bytes(_read_bytes(src), source=str(src), attributes=attributes)


# The keys of a face record that are positions in pixels (each a number or nested lists of them).
_PIXEL_KEYS = ("box", "landmarks", "mesh")


def _scaled(record: dict[str, Any], factor: float) -> dict[str, Any]:
    """A face record found in an image reduced by `factor`, in the full image's pixels."""
    def scale(value):
        return [scale(v) for v in value] if isinstance(value, list) else round(value * factor, 1)
    return {**record, **{key: scale(record[key]) for key in _PIXEL_KEYS if record.get(key) is not None}}


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except IsADirectoryError:
        raise images.BadInput(f"{path} is a directory") from None
    except OSError as exc:
        raise images.BadInput(f"cannot read {path}: {exc.strerror}") from None
