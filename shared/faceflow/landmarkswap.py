"""The default face swap, from the shipped models only: the source face's 468-point mesh
triangulated once (Delaunay), each triangle warped onto the target's mesh (one piecewise-affine
remap), colour matched to the target's skin and light and blended in with a feathered mask.

What it does not paste: the target's mouth interior (teeth and tongue move with the target's
speech; the source's own cannot be mapped onto an opening it does not have), an eye open in
one face and closed in the other (a lid stretched over an open eye, or an open eye squeezed
shut, smears), the side of the face a turned head hides, and what lies beyond the source
photo's edge.

Known limits: it moves the source's face texture onto the target's geometry, so the face's
shape stays the target's; large pose differences between the two faces and occlusions
degrade it (an occluded face is faded out on video, see faceflow.swap).
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from . import synthetic
from .face import Face
from .facemesh import LEFT_EYE_LIDS, RIGHT_EYE_LIDS, FaceMesh, aspect_ratio

# Mesh contours (MediaPipe's face_mesh_connections), in order around each region.
FACE_OVAL = (10, 338, 297, 332, 284, 251, 389, 356, 454, 323, 361, 288, 397, 365, 379, 378, 400,
             377, 152, 148, 176, 149, 150, 136, 172, 58, 132, 93, 234, 127, 162, 21, 54, 103, 67, 109)
INNER_MOUTH = (78, 191, 80, 81, 82, 13, 312, 311, 310, 415, 308, 324, 318, 402, 317, 14, 87, 178,
               88, 95)
LEFT_EYE = (33, 246, 161, 160, 159, 158, 157, 173, 133, 155, 154, 153, 145, 144, 163, 7)
RIGHT_EYE = (362, 398, 384, 385, 386, 387, 388, 466, 263, 249, 390, 373, 374, 380, 381, 382)
# An eye counts as closed below this lid ratio (facemesh measures ~0.05-0.12 closed, 0.25+ open).
EYE_CLOSED_RATIO = 0.15
# The mask's edge: pulled in by this share of the face size (so hair and background at the
# mesh's rim stay the target's), then feathered over about the same width.
MASK_INSET = 0.04
FEATHER = 0.05
BLENDS = ("feather", "poisson")


@dataclass
class LandmarkSource:
    """The source face, ready to paste: a crop around it, its mesh in crop pixels and the
    triangles (indices into the mesh)."""
    image: np.ndarray
    points: np.ndarray
    triangles: np.ndarray
    eyes_closed: tuple[bool, bool]


def delaunay(points: np.ndarray) -> np.ndarray:
    """Delaunay triangles over 2D points, as (n, 3) indices."""
    x0, y0 = points.min(0) - 1
    x1, y1 = points.max(0) + 1
    subdiv = cv2.Subdiv2D((int(np.floor(x0)), int(np.floor(y0)), int(np.ceil(x1 - x0)) + 2,
                           int(np.ceil(y1 - y0)) + 2))
    index = {}
    for i, (x, y) in enumerate(points):
        vertex = subdiv.insert((float(x), float(y)))
        index.setdefault(vertex, i)  # a point on top of another shares its vertex
    out = []
    vertices = {}
    for tri in subdiv.getTriangleList():
        ids = []
        for x, y in tri.reshape(3, 2):
            key = (float(x), float(y))
            if key not in vertices:
                vertices[key] = subdiv.findNearest(key)[0]
            ids.append(index.get(vertices[key], -1))
        if min(ids) >= 0:
            out.append(ids)
    return np.asarray(out, np.int32)


def _eyes_closed(mesh: np.ndarray) -> tuple[bool, bool]:
    """Whether each eye (image-left, image-right) is closed, from a mesh's lids."""
    return (aspect_ratio(mesh, *LEFT_EYE_LIDS) < EYE_CLOSED_RATIO,
            aspect_ratio(mesh, *RIGHT_EYE_LIDS) < EYE_CLOSED_RATIO)


class LandmarkSwapper:
    """Pastes a source face onto target meshes (see the module's docstring)."""
    name = "landmark"
    digital_source_type = synthetic.COMPOSITE_SYNTHETIC
    needs_mesh = True

    def __init__(self, model_dir=None, blend: str = "feather", mesh: FaceMesh | None = None):
        if blend not in BLENDS:
            raise ValueError(f"blend must be one of {', '.join(BLENDS)}")
        self.mesh = mesh or FaceMesh(model_dir)
        self.blend = blend

    def meshes(self, bgr: np.ndarray, faces: list[Face]) -> list[np.ndarray]:
        """(468, 2) points per face, in image pixels."""
        return [m[:, :2] for m in self.mesh.run(bgr, faces)]

    def prepare(self, bgr: np.ndarray, face: Face) -> LandmarkSource:
        mesh = self.mesh.run(bgr, [face])[0]
        points = mesh[:, :2]
        x0, y0 = np.floor(points.min(0)).astype(int) - 4
        x1, y1 = np.ceil(points.max(0)).astype(int) + 4
        x0, y0 = max(0, x0), max(0, y0)
        x1, y1 = min(bgr.shape[1], x1), min(bgr.shape[0], y1)
        crop = np.ascontiguousarray(bgr[y0:y1, x0:x1])
        local = (points - (x0, y0)).astype(np.float32)
        return LandmarkSource(crop, local, delaunay(local), _eyes_closed(mesh))

    def paste(self, bgr: np.ndarray, source: LandmarkSource, points: np.ndarray,
              opacity: float = 1.0) -> bool:
        """Paste `source` onto the face whose mesh is `points` (468, 2), in place; False when
        the face lies outside the image or is too small to paste."""
        h, w = bgr.shape[:2]
        size = float(max(np.ptp(points[:, 0]), np.ptp(points[:, 1])))
        pad = int(size * FEATHER * 2) + 4
        x0, y0 = np.floor(points.min(0)).astype(int) - pad
        x1, y1 = np.ceil(points.max(0)).astype(int) + pad
        x0, y0, x1, y1 = max(0, x0), max(0, y0), min(w, x1), min(h, y1)
        if size < 8 or x1 - x0 < 8 or y1 - y0 < 8 or opacity <= 0:
            return False
        local = (points - (x0, y0)).astype(np.float32)
        roi = bgr[y0:y1, x0:x1]
        warped, valid = warp(source, local, roi.shape[:2])
        mask = face_mask(local, roi.shape[:2], size, source.eyes_closed, _eyes_closed(points), valid)
        warped = match_colour(warped, roi, mask)
        if self.blend == "poisson":
            blended = _poisson(warped, roi, mask)
            alpha = (mask > 0).astype(np.float32)[..., None] * opacity
            roi[...] = np.clip(blended * alpha + roi * (1 - alpha), 0, 255).astype(np.uint8)
        else:
            alpha = feathered(mask, size)[..., None] * opacity
            roi[...] = np.clip(warped * alpha + roi * (1 - alpha) + 0.5, 0, 255).astype(np.uint8)
        return True


def warp(source: LandmarkSource, points: np.ndarray, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """The source crop warped triangle by triangle onto `points` (target mesh in ROI pixels):
    every ROI pixel gets its triangle's affine map to the source, then one remap. Returns the
    warped pixels and a uint8 mask of where they are valid: a triangle the target shows from
    behind (turned away: the far side of a head in profile) or flat is left out, and so is
    any pixel that maps outside the source crop (a source face cut by its photo's edge)."""
    h, w = shape
    tri_dst = points[source.triangles]          # (n, 3, 2)
    tri_src = source.points[source.triangles]
    design = np.concatenate([tri_dst, np.ones((len(tri_dst), 3, 1), np.float32)], axis=2)
    src_design = np.concatenate([tri_src, np.ones((len(tri_src), 3, 1), np.float32)], axis=2)
    det, src_det = np.linalg.det(design), np.linalg.det(src_design)
    usable = (np.abs(det) > 1e-2) & (np.sign(det) == np.sign(src_det))
    maps = np.zeros((len(tri_dst), 3, 2), np.float32)
    maps[usable] = np.linalg.solve(design[usable].astype(np.float64), tri_src[usable]).astype(np.float32)
    ids = np.full((h, w), -1, np.int32)
    for i in np.flatnonzero(usable):
        cv2.fillConvexPoly(ids, np.round(tri_dst[i] * 16).astype(np.int32), int(i), cv2.LINE_8, 4)
    ys, xs = np.nonzero(ids >= 0)
    m = maps[ids[ys, xs]]
    map_x = np.full((h, w), -1, np.float32)
    map_y = np.full((h, w), -1, np.float32)
    map_x[ys, xs] = m[:, 0, 0] * xs + m[:, 1, 0] * ys + m[:, 2, 0]
    map_y[ys, xs] = m[:, 0, 1] * xs + m[:, 1, 1] * ys + m[:, 2, 1]
    sh, sw = source.image.shape[:2]
    valid = ((map_x >= 0) & (map_y >= 0) & (map_x <= sw - 1) & (map_y <= sh - 1)).astype(np.uint8) * 255
    warped = cv2.remap(source.image, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    return warped, valid


def face_mask(points: np.ndarray, shape: tuple[int, int], size: float,
              source_eyes_closed: tuple[bool, bool], target_eyes_closed: tuple[bool, bool],
              valid: np.ndarray | None = None) -> np.ndarray:
    """uint8 mask (255 inside) of the face oval where the warp is `valid`, pulled in by
    MASK_INSET, less the target's mouth interior and any eye open in one face and closed in
    the other (a closed lid stretched over an open eye, or an open eye squeezed shut, smears)."""
    mask = np.zeros(shape, np.uint8)
    cv2.fillPoly(mask, [np.round(points[list(FACE_OVAL)] * 16).astype(np.int32)], 255, cv2.LINE_AA, 4)
    if valid is not None:
        mask = cv2.min(mask, valid)
    inset = max(1, int(round(size * MASK_INSET)))
    mask = cv2.erode(mask, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * inset + 1, 2 * inset + 1)))
    holes = [INNER_MOUTH]
    for eye, src_closed, dst_closed in zip((LEFT_EYE, RIGHT_EYE), source_eyes_closed, target_eyes_closed):
        if src_closed != dst_closed:
            holes.append(eye)
    cv2.fillPoly(mask, [np.round(points[list(hole)] * 16).astype(np.int32) for hole in holes], 0,
                 cv2.LINE_AA, 4)
    return mask


def feathered(mask: np.ndarray, size: float) -> np.ndarray:
    """The mask as float alpha in [0, 1], its edges blurred over FEATHER x the face size;
    the blur is pulled inside the mask so nothing outside it changes."""
    sigma = max(1.0, size * FEATHER / 2)
    inner = cv2.erode(mask, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * int(sigma) + 1,) * 2))
    alpha = cv2.GaussianBlur(inner.astype(np.float32) / 255, (0, 0), sigma)
    alpha[mask == 0] = 0
    return alpha


def match_colour(warped: np.ndarray, target: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The warped face in the target's colour and light: per-channel mean and spread in Lab
    moved to the target's under the mask (Reinhard's transfer), as float32 BGR."""
    inside = mask > 127
    if inside.sum() < 16:
        return warped.astype(np.float32)
    src_lab = cv2.cvtColor(warped, cv2.COLOR_BGR2LAB).astype(np.float32)
    dst_lab = cv2.cvtColor(target, cv2.COLOR_BGR2LAB).astype(np.float32)
    s, d = src_lab[inside], dst_lab[inside]
    s_mean, s_std = s.mean(0), s.std(0) + 1e-3
    d_mean, d_std = d.mean(0), d.std(0) + 1e-3
    gain = np.clip(d_std / s_std, 0.5, 2.0)
    lab = (src_lab - s_mean) * gain + d_mean
    lab = np.clip(lab, 0, 255).astype(np.uint8)
    return cv2.cvtColor(lab, cv2.COLOR_LAB2BGR).astype(np.float32)


def _poisson(warped: np.ndarray, roi: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """OpenCV's seamless clone (Poisson blending) of the warped face into the ROI."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return roi.astype(np.float32)
    # seamlessClone wants the mask off the image border and a centre of its bounding box
    inner = mask.copy()
    inner[[0, -1], :] = 0
    inner[:, [0, -1]] = 0
    ys, xs = np.nonzero(inner)
    centre = (int((xs.min() + xs.max() + 1) // 2), int((ys.min() + ys.max() + 1) // 2))
    src = np.clip(warped, 0, 255).astype(np.uint8)
    return cv2.seamlessClone(src, roi, inner, centre, cv2.NORMAL_CLONE).astype(np.float32)
