"""The default face swap, from the shipped models only: the source face's 468-point mesh
triangulated once (Delaunay), each triangle warped onto the target's mesh (one piecewise-affine
remap), colour matched to the target's skin and light and blended in with a feathered mask
(Poisson blending measured against it: see PHOTO_BLEND).

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
# The brows' upper edges, and the chin and forehead top that give the face's vertical axis.
BROWS = (70, 63, 105, 66, 107, 336, 296, 334, 293, 300)
CHIN, FOREHEAD_TOP = 152, 10
# Of the forehead above the brows, the share kept in the mask: its top holds hair (a fringe)
# in many photos, which would be pasted as a stripe across the target's forehead.
FOREHEAD_KEPT = 0.45
# An eye counts as closed below this lid ratio (facemesh measures ~0.05-0.12 closed, 0.25+ open).
EYE_CLOSED_RATIO = 0.15
# The mask's edge: pulled in by this share of the face size (so hair and background at the
# mesh's rim stay the target's), then feathered over about the same width.
MASK_INSET = 0.04
FEATHER = 0.05
BLENDS = ("feather", "poisson")
# Chosen by bench/swap.py: both leave no visible edge (seam gradient median 1.03x the
# original's feathered, 0.99x Poisson), but Poisson blending (cv2.seamlessClone) pulls the
# target's colours in from the mask's edge and with them its look: the share of frontal faces
# that dlib's model finds nearer the source fell from 81 % to 58 %. Poisson stays for
# comparison; on video it would also flicker as its boundary changes from frame to frame.
PHOTO_BLEND, VIDEO_BLEND = "feather", "feather"
# How far the inner face (eyes, nose, mouth, brows) moves towards the source's proportions,
# 0 to 1, falling to nothing at the face's outline (which stays the target's, so the mask's
# edge meets the target's own contour): the placement of the features is much of what makes a
# face someone's.
SHAPE_MORPH = 0.6
# Maps and masks are computed with the face about this many pixels across (see paste).
WORK_SIZE = 160


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

    def __init__(self, model_dir=None, blend: str | None = None, mesh: FaceMesh | None = None):
        """`blend`: one of BLENDS for everything; None: PHOTO_BLEND on photos, VIDEO_BLEND on
        video."""
        if blend is not None and blend not in BLENDS:
            raise ValueError(f"blend must be one of {', '.join(BLENDS)}")
        self.mesh = mesh or FaceMesh(model_dir)
        self.blend = blend

    def meshes(self, bgr: np.ndarray, faces: list[Face]) -> list[np.ndarray]:
        """(468, 2) points per face, in image pixels."""
        return [m[:, :2] for m in self.mesh.run(bgr, faces)]

    def meshes_with_presence(self, bgr: np.ndarray, faces: list[Face]) -> tuple[list[np.ndarray], list]:
        """`meshes` and the mesh model's face-presence logit per face (FaceMesh.run_with_presence)."""
        meshes, presence = self.mesh.run_with_presence(bgr, faces)
        return [m[:, :2] for m in meshes], presence

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
              opacity: float = 1.0, still: bool = True) -> bool:
        """Paste `source` onto the face whose mesh is `points` (468, 2), in place; False when
        the face lies outside the image or is too small to paste. `still`: a photo (a video
        frame otherwise), which picks the blend.

        The warp's maps, the mask and the colour statistics are computed on a grid with the
        face about WORK_SIZE px across and scaled up (the piecewise-affine maps are
        continuous and the mask is feathered, so bilinear scaling changes them by a fraction
        of a pixel); only the remap, the colour transfer and the blend touch every pixel."""
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
        step = max(1, int(size // WORK_SIZE))
        grid = Grid(roi.shape[:2], step)
        map_x, map_y, valid = warp_maps(source, toward_source(local, source, size), grid)
        mask = face_mask(grid.to_grid(local), grid.shape, size / step, source.eyes_closed,
                         _eyes_closed(points), valid)
        if not mask.any():
            return False
        small_roi = cv2.resize(roi, grid.shape[::-1], interpolation=cv2.INTER_AREA) if step > 1 else roi
        small_warped = cv2.remap(source.image, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
        luts = colour_luts(small_warped, small_roi, mask)
        blend = self.blend or (PHOTO_BLEND if still else VIDEO_BLEND)
        if blend == "poisson":  # at full resolution
            full_x, full_y = grid.up(map_x), grid.up(map_y)
            warped = apply_luts(cv2.remap(source.image, full_x, full_y, cv2.INTER_LINEAR,
                                          borderMode=cv2.BORDER_REPLICATE), luts)
            full_mask = (grid.up(mask.astype(np.float32)) > 127).astype(np.uint8) * 255
            blended = _poisson(warped, roi, full_mask).astype(np.float32)
            alpha = (full_mask > 0).astype(np.float32)[..., None] * opacity
            roi[...] = np.clip(blended * alpha + roi * (1 - alpha) + 0.5, 0, 255).astype(np.uint8)
            return True
        alpha = grid.up(feathered(mask, size / step)) * opacity
        ys, xs = np.nonzero(mask)   # only where the paste shows (the grid's mask holds it)
        top, left = max(0, (ys.min() - 1) * step), max(0, (xs.min() - 1) * step)
        bottom, right = (ys.max() + 2) * step, (xs.max() + 2) * step
        area = np.s_[top:bottom, left:right]
        full_x, full_y = grid.up(map_x)[area], grid.up(map_y)[area]
        warped = apply_luts(cv2.remap(source.image, full_x, full_y, cv2.INTER_LINEAR,
                                      borderMode=cv2.BORDER_REPLICATE), luts)
        a = alpha[area]
        roi[area] = cv2.blendLinear(warped, roi[area], a, 1.0 - a)
        return True


def toward_source(points: np.ndarray, source: LandmarkSource, size: float,
                  amount: float = SHAPE_MORPH) -> np.ndarray:
    """The target's mesh with its inner points moved `amount` of the way to where the source's
    would lie (the source mesh fitted onto the target's outline by a similarity transform),
    less with nearness to the outline: none on it, all from a quarter of the face size in."""
    if amount <= 0:
        return points
    oval = list(FACE_OVAL)
    fit, _ = cv2.estimateAffinePartial2D(source.points[oval], points[oval], method=cv2.LMEDS)
    if fit is None:
        return points
    aligned = source.points @ fit[:, :2].T + fit[:, 2]
    to_outline = np.sqrt(((points[:, None, :] - points[None, oval, :]) ** 2).sum(-1)).min(1)
    weight = amount * np.clip(to_outline / (0.25 * size), 0.0, 1.0)
    return (points + weight[:, None] * (aligned - points)).astype(np.float32)


@dataclass(frozen=True)
class Grid:
    """A reduced grid over a ROI: grid pixel j stands for ROI pixel (j + 0.5) * step - 0.5,
    the alignment cv2.resize uses, so maps computed on it scale up in place."""
    full: tuple[int, int]
    step: int

    @property
    def shape(self) -> tuple[int, int]:
        return (-(-self.full[0] // self.step), -(-self.full[1] // self.step))

    def to_grid(self, points: np.ndarray) -> np.ndarray:
        return (points + 0.5) / self.step - 0.5

    def coords(self) -> tuple[np.ndarray, np.ndarray]:
        """ROI coordinates (x, y) of the grid's pixel centres."""
        gh, gw = self.shape
        return ((np.arange(gw, dtype=np.float32) + 0.5) * self.step - 0.5,
                (np.arange(gh, dtype=np.float32) + 0.5) * self.step - 0.5)

    def up(self, values: np.ndarray) -> np.ndarray:
        if self.step == 1:
            return values
        return cv2.resize(values, self.full[::-1], interpolation=cv2.INTER_LINEAR)


def warp_maps(source: LandmarkSource, points: np.ndarray, grid: Grid) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each grid pixel, where in the source crop to read it: the affine map of the target
    triangle it lies in (target mesh `points` in ROI pixels). Returns map_x, map_y and a
    uint8 mask of where the maps are valid: a triangle the target shows from behind (turned
    away: the far side of a head in profile) or flat is left out, and so is any pixel that
    maps outside the source crop (a source face cut by its photo's edge)."""
    gh, gw = grid.shape
    tri_dst = points[source.triangles]          # (n, 3, 2)
    tri_src = source.points[source.triangles]
    design = np.concatenate([tri_dst, np.ones((len(tri_dst), 3, 1), np.float32)], axis=2)
    src_design = np.concatenate([tri_src, np.ones((len(tri_src), 3, 1), np.float32)], axis=2)
    det, src_det = np.linalg.det(design), np.linalg.det(src_design)
    usable = (np.abs(det) > 1e-2) & (np.sign(det) == np.sign(src_det))
    maps = np.zeros((len(tri_dst), 3, 2), np.float32)
    maps[usable] = np.linalg.solve(design[usable].astype(np.float64), tri_src[usable]).astype(np.float32)
    ids = np.full((gh, gw), -1, np.int32)
    corners = np.round(grid.to_grid(tri_dst) * 16).astype(np.int32)
    for i in np.flatnonzero(usable):
        cv2.fillConvexPoly(ids, corners[i], int(i), cv2.LINE_8, 4)
    inside = ids >= 0
    xs, ys = grid.coords()
    m = maps[np.where(inside, ids, 0)]          # (gh, gw, 3, 2)
    map_x = m[..., 0, 0] * xs[None, :] + m[..., 1, 0] * ys[:, None] + m[..., 2, 0]
    map_y = m[..., 0, 1] * xs[None, :] + m[..., 1, 1] * ys[:, None] + m[..., 2, 1]
    sh, sw = source.image.shape[:2]
    valid = inside & (map_x >= 0) & (map_y >= 0) & (map_x <= sw - 1) & (map_y <= sh - 1)
    # outside the mesh: the nearest edge's values would do, the mask hides them anyway
    map_x[~inside], map_y[~inside] = -1, -1
    return map_x.astype(np.float32), map_y.astype(np.float32), valid.astype(np.uint8) * 255


def warp(source: LandmarkSource, points: np.ndarray, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """The source crop warped onto `points` (target mesh in ROI pixels) at full resolution,
    and where it is valid (see warp_maps)."""
    map_x, map_y, valid = warp_maps(source, points, Grid(shape, 1))
    return cv2.remap(source.image, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE), valid


def face_mask(points: np.ndarray, shape: tuple[int, int], size: float,
              source_eyes_closed: tuple[bool, bool], target_eyes_closed: tuple[bool, bool],
              valid: np.ndarray | None = None) -> np.ndarray:
    """uint8 mask (255 inside) of the face oval where the warp is `valid`, pulled in by
    MASK_INSET, less the target's mouth interior and any eye open in one face and closed in
    the other (a closed lid stretched over an open eye, or an open eye squeezed shut, smears)."""
    mask = np.zeros(shape, np.uint8)
    cv2.fillPoly(mask, [np.round(outline(points) * 16).astype(np.int32)], 255, cv2.LINE_AA, 4)
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


def outline(points: np.ndarray) -> np.ndarray:
    """The face oval with its forehead above the brows lowered to FOREHEAD_KEPT of its
    height, along the face's own vertical axis (chin to forehead top)."""
    oval = points[list(FACE_OVAL)].astype(np.float32)
    axis = points[FOREHEAD_TOP] - points[CHIN]
    length = float(np.hypot(*axis))
    if length < 1e-3:
        return oval
    up = axis / length
    height = (oval - points[CHIN]) @ up
    brow = float(((points[list(BROWS)] - points[CHIN]) @ up).mean())
    above = np.maximum(0.0, height - brow)
    return oval - np.outer(above * (1 - FOREHEAD_KEPT), up)


def feathered(mask: np.ndarray, size: float) -> np.ndarray:
    """The mask as float alpha in [0, 1], its edges blurred over FEATHER x the face size;
    the blur is pulled inside the mask so nothing outside it changes."""
    sigma = max(1.0, size * FEATHER / 2)
    inner = cv2.erode(mask, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * int(sigma) + 1,) * 2))
    alpha = cv2.GaussianBlur(inner.astype(np.float32) / 255, (0, 0), sigma)
    alpha[mask == 0] = 0
    return alpha


def colour_luts(warped: np.ndarray, target: np.ndarray, mask: np.ndarray) -> np.ndarray | None:
    """Lookup tables (3 x 256, per Lab channel) that move the warped face's mean and spread
    in Lab to the target's under the mask (Reinhard's colour transfer): the target's skin
    tone and light on the source's features. None when the mask is too small to measure."""
    inside = mask > 127
    if inside.sum() < 16:
        return None
    s = cv2.cvtColor(warped, cv2.COLOR_BGR2LAB)[inside].astype(np.float32)
    d = cv2.cvtColor(target, cv2.COLOR_BGR2LAB)[inside].astype(np.float32)
    s_mean, s_std = s.mean(0), s.std(0) + 1e-3
    d_mean, d_std = d.mean(0), d.std(0) + 1e-3
    gain = np.clip(d_std / s_std, 0.5, 2.0)
    levels = np.arange(256, dtype=np.float32)[:, None]
    return np.clip((levels - s_mean) * gain + d_mean + 0.5, 0, 255).astype(np.uint8).T.copy()


def apply_luts(bgr: np.ndarray, luts: np.ndarray | None) -> np.ndarray:
    if luts is None:
        return bgr
    lab = cv2.cvtColor(bgr, cv2.COLOR_BGR2LAB)
    lab = cv2.merge([cv2.LUT(channel, lut) for channel, lut in zip(cv2.split(lab), luts)])
    return cv2.cvtColor(lab, cv2.COLOR_LAB2BGR)


def match_colour(warped: np.ndarray, target: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The warped face in the target's colour and light (see colour_luts)."""
    return apply_luts(warped, colour_luts(warped, target, mask))


def _poisson(warped: np.ndarray, roi: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """OpenCV's seamless clone (Poisson blending) of the warped face into the ROI."""
    inner = mask.copy()
    inner[[0, -1], :] = 0   # seamlessClone wants the mask off the border
    inner[:, [0, -1]] = 0
    ys, xs = np.nonzero(inner)
    if len(xs) == 0:
        return roi
    centre = (int((xs.min() + xs.max() + 1) // 2), int((ys.min() + ys.max() + 1) // 2))
    return cv2.seamlessClone(warped, roi, inner, centre, cv2.NORMAL_CLONE)
