"""Toy city: a small, procedurally generated street-scene dataset in Cityscapes layout.

The generator draws simple 3D street scenes (a straight street seen from a car's roof camera) with
a pinhole projection and the painter's algorithm, using only numpy and OpenCV drawing calls. Image and
label are rasterised by the same polygon calls, so the labels are pixel exact.

It is built to make the 19 Cityscapes classes differ in difficulty the way real street scenes do:

* large flat regions (road, sky, building facades, vegetation, sidewalk) are easy;
* thin or small objects (poles, traffic lights and signs, persons, riders, bicycles, motorcycles) are
  hard, because they cover few pixels and their borders are blurred by the camera model;
* several classes share colours and textures so that only context separates them: wall vs building
  (same palette, a wall is low, in front and has no windows), terrain vs vegetation (similar greens,
  terrain lies flat on the ground), rider vs person (a rider sits on a bicycle or motorcycle),
  truck vs bus vs train (coloured boxes that differ in size, windows and position: trains run on
  rails or far away), sidewalk vs road (similar greys, separated by the curb and position);
* every image gets its own lighting (brightness, contrast, colour cast, gamma), cast shadows,
  sensor noise and sometimes defocus or motion blur.

Ignore pixels (255) come from an ego-vehicle bonnet at the bottom of most images, rail beds,
guard rails and street furniture that Cityscapes labels as void (bins, advertising columns, benches).

The files follow the Cityscapes layout, so mmseg's ``CityscapesDataset`` reads them unchanged::

    <root>/leftImg8bit/{train,val}/<city>/<city>_<seq:06d>_000019_leftImg8bit.png
    <root>/gtFine/{train,val}/<city>/<city>_<seq:06d>_000019_gtFine_labelTrainIds.png
    <root>/toy_city_meta.json

Every image is rendered from its own random generator seeded by ``(seed, split, index)``, so an image
does not depend on the generation order or on how many other images are generated, and the same seed
gives byte-identical files.
"""
from __future__ import annotations

import functools
import json
import math
import os
import os.path as osp
import shutil
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np

__all__ = [
    'TOY_CITY_CLASSES', 'TOY_CITY_PALETTE', 'IGNORE_INDEX', 'IMG_SUFFIX', 'SEG_MAP_SUFFIX', 'IMG_DIR',
    'ANN_DIR', 'SPLIT_CITIES', 'META_FILE', 'GENERATOR_VERSION', 'MIN_IMAGE_SIZE', 'generate_toy_city',
    'render_toy_city_sample', 'toy_city_sample_rng', 'toy_city_file_stem', 'colorize_label',
    'read_toy_city_meta'
]

TOY_CITY_CLASSES: Tuple[str, ...] = (
    'road', 'sidewalk', 'building', 'wall', 'fence', 'pole', 'traffic light', 'traffic sign',
    'vegetation', 'terrain', 'sky', 'person', 'rider', 'car', 'truck', 'bus', 'train', 'motorcycle',
    'bicycle')
"""The 19 Cityscapes evaluation classes, indexed by train id."""

TOY_CITY_PALETTE: Tuple[Tuple[int, int, int], ...] = (
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153), (153, 153, 153),
    (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152), (70, 130, 180), (220, 20, 60),
    (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100), (0, 80, 100), (0, 0, 230), (119, 11, 32))
"""The Cityscapes colour (RGB) of every train id, the same as mmseg's ``CityscapesDataset``."""

IGNORE_INDEX = 255
IMG_SUFFIX = '_leftImg8bit.png'
SEG_MAP_SUFFIX = '_gtFine_labelTrainIds.png'
IMG_DIR = 'leftImg8bit'
ANN_DIR = 'gtFine'
META_FILE = 'toy_city_meta.json'
SPLIT_CITIES: Dict[str, Tuple[str, ...]] = {'train': ('aachen', 'bochum'), 'val': ('frankfurt', )}
"""City folder names per split; consecutive images of a split are spread evenly over its cities."""

GENERATOR_VERSION = 1
"""Bump when the rendering changes, so that tools regenerate data written by an older generator."""

MIN_IMAGE_SIZE = 64
"""Smallest accepted height and width: below this the thin classes vanish entirely."""

# Cityscapes stores the annotated frame of every sequence as frame 19.
_FRAME_ID = 19
# Distinct seed-sequence words for the splits, so train image i and val image i differ.
_SPLIT_CODES = {'train': 0, 'val': 1}
# A fixed salt keeps these streams apart from other generators seeded with the same small integers.
_SEED_SALT = 0x70C17

(ROAD, SIDEWALK, BUILDING, WALL, FENCE, POLE, LIGHT, SIGN, VEGETATION, TERRAIN, SKY, PERSON, RIDER,
 CAR, TRUCK, BUS, TRAIN, MOTORCYCLE, BICYCLE) = range(19)

# OpenCV fixed-point drawing: coordinates carry 3 fractional bits, so thin or distant objects keep
# their sub-pixel position instead of snapping to whole pixels.
_SHIFT = 3
_SCALE = float(1 << _SHIFT)
# Vertices are clipped to this many pixels; far larger values only come from points right in front
# of the camera, and int32 fixed-point coordinates must not overflow.
_COORD_LIMIT = 1.0e5
# Nearest depth (metres) a projected vertex may have.
_Z_NEAR = 0.5

# Painter's-algorithm bands, drawn in this order (far to near within a band). On a straight street an
# object can only cover objects in its own or an earlier band, because the bands are ordered by lateral
# distance from the camera axis: facades, then yards in front of them (front gardens, verges, catenary
# masts), then the boundary line (walls, fences, hedges), then the sidewalk, then the road.
_BAND_FACADE, _BAND_YARD, _BAND_BOUNDARY, _BAND_SIDEWALK, _BAND_ROAD = range(5)

Colour = Tuple[float, float, float]

# Palettes (RGB). Walls deliberately reuse the facade colours: only context separates the two.
_FACADE_COLOURS = ((196, 184, 160), (222, 212, 186), (150, 148, 142), (104, 102, 104), (158, 86, 64),
                   (178, 112, 86), (226, 224, 216), (204, 174, 118), (122, 132, 146), (124, 96, 78),
                   (186, 160, 140), (170, 176, 168))
_ROOF_COLOURS = ((120, 60, 50), (90, 70, 60), (70, 72, 78), (140, 80, 60), (60, 60, 64))
_CAR_COLOURS = ((230, 230, 228), (28, 28, 30), (172, 174, 178), (104, 106, 110), (32, 42, 82),
                (160, 28, 28), (42, 84, 160), (44, 84, 54), (192, 176, 142), (222, 190, 44),
                (200, 200, 196), (60, 60, 62))
_BIG_VEHICLE_COLOURS = ((236, 236, 232), (226, 196, 40), (190, 40, 36), (40, 90, 160), (60, 130, 70),
                        (200, 200, 200), (230, 120, 30), (120, 120, 124))
_TOP_CLOTHES = ((30, 30, 35), (200, 30, 40), (40, 60, 140), (230, 230, 225), (90, 90, 95),
                (60, 110, 60), (200, 150, 40), (120, 60, 120), (170, 120, 90), (40, 140, 170),
                (240, 120, 30), (150, 150, 150), (70, 50, 40))
_BOTTOM_CLOTHES = ((30, 35, 60), (25, 25, 28), (70, 70, 75), (150, 130, 100), (50, 60, 90),
                   (110, 80, 60))
_SKIN = ((235, 200, 170), (215, 172, 135), (172, 122, 88), (112, 76, 52))
_HAIR = ((25, 20, 15), (70, 45, 25), (160, 120, 60), (200, 200, 200), (110, 70, 35))
_FENCE_COLOURS = ((60, 90, 60), (120, 122, 126), (110, 80, 55), (225, 225, 220), (35, 35, 38))
_METAL = ((120, 122, 126), (70, 74, 72), (40, 56, 46), (150, 150, 146), (35, 35, 38))
_GLASS = ((38, 46, 58), (55, 62, 72), (30, 34, 40), (70, 82, 96))
_DARK = (22.0, 22.0, 24.0)


def _validate_int(name: str, value: Any, minimum: int) -> None:
    """Raises ValueError unless ``value`` is an int (not a bool) of at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f'{name} must be an integer, got {value!r} ({type(value).__name__})')
    if value < minimum:
        raise ValueError(f'{name} must be >= {minimum}, got {value}')


def _validate_image_size(height: Any, width: Any) -> None:
    """Raises ValueError for image sizes the renderer cannot draw a meaningful scene at."""
    _validate_int('height', height, 1)
    _validate_int('width', width, 1)
    if height < MIN_IMAGE_SIZE or width < MIN_IMAGE_SIZE:
        raise ValueError(f'height and width must both be >= {MIN_IMAGE_SIZE} (thin classes such as '
                         f'poles vanish below that), got height={height}, width={width}')


def _validate_split(split: Any) -> None:
    """Raises ValueError unless ``split`` names a known split."""
    if split not in _SPLIT_CODES:
        raise ValueError(f'split must be one of {sorted(_SPLIT_CODES)}, got {split!r}')


def toy_city_sample_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """Returns the random generator that renders one image.

    The stream depends only on ``(seed, split, index)``, never on which other images are rendered or in
    which order, so a subset or a parallel generation reproduces the same images.

    Args:
        seed: Dataset seed (non-negative).
        split: ``'train'`` or ``'val'``.
        index: Image index within the split (non-negative).

    Returns:
        A fresh ``numpy.random.Generator``.
    """
    _validate_int('seed', seed, 0)
    _validate_split(split)
    _validate_int('index', index, 0)
    return np.random.default_rng(
        np.random.SeedSequence([_SEED_SALT, int(seed), _SPLIT_CODES[split], int(index)]))


def toy_city_file_stem(split: str, index: int, num_images: int) -> Tuple[str, str]:
    """Returns the city folder and Cityscapes-style file stem of one image.

    Args:
        split: ``'train'`` or ``'val'``.
        index: Image index within the split.
        num_images: Number of images in the split; images are spread evenly over the split's cities.

    Returns:
        ``(city, stem)``, e.g. ``('aachen', 'aachen_000003_000019')``; the image file is
        ``stem + IMG_SUFFIX`` and the label file ``stem + SEG_MAP_SUFFIX``.
    """
    _validate_split(split)
    _validate_int('num_images', num_images, 1)
    _validate_int('index', index, 0)
    if index >= num_images:
        raise ValueError(f'index must be < num_images ({num_images}), got {index}')
    cities = SPLIT_CITIES[split]
    city = cities[index * len(cities) // num_images]
    return city, f'{city}_{index:06d}_{_FRAME_ID:06d}'


def colorize_label(label: np.ndarray, ignore_colour: Sequence[int] = (0, 0, 0)) -> np.ndarray:
    """Colour-codes a train-id label map with the Cityscapes palette.

    Args:
        label: ``(H, W)`` integer array of train ids (0..18) and ``IGNORE_INDEX``.
        ignore_colour: RGB colour for ignore and any other out-of-range value.

    Returns:
        ``(H, W, 3)`` uint8 RGB image.
    """
    lut = np.tile(np.asarray(ignore_colour, np.uint8), (256, 1))
    lut[:len(TOY_CITY_PALETTE)] = np.asarray(TOY_CITY_PALETTE, np.uint8)
    return lut[np.asarray(label).astype(np.uint8)]


def _to_fixed(poly: np.ndarray) -> np.ndarray:
    """Converts float pixel vertices to OpenCV's fixed-point ``(N, 1, 2)`` int32 layout."""
    # Plain ufuncs instead of np.clip: this runs for every polygon and np.clip's dispatch dominates.
    p = np.minimum(np.maximum(np.asarray(poly, np.float64).reshape(-1, 2), -_COORD_LIMIT), _COORD_LIMIT)
    return np.rint(p * _SCALE).astype(np.int32).reshape(-1, 1, 2)


def _to_fixed_many(polys: Sequence[np.ndarray]) -> List[np.ndarray]:
    """Converts many polygons at once when they share a vertex count (one numpy pass instead of N)."""
    if len(polys) > 1 and len({len(p) for p in polys}) == 1:
        arr = np.minimum(np.maximum(np.asarray(polys, np.float64), -_COORD_LIMIT), _COORD_LIMIT)
        fixed = np.rint(arr * _SCALE).astype(np.int32)
        return [q.reshape(-1, 1, 2) for q in fixed]
    return [_to_fixed(p) for p in polys if len(p) >= 2]


def _circle(cx: float, cy: float, r: float, n: Optional[int] = None) -> np.ndarray:
    """Returns a polygon approximating a circle (pixel coordinates)."""
    if n is None:
        n = int(np.clip(r * 1.5 + 8, 8, 48))
    t = np.linspace(0.0, 2.0 * np.pi, n, endpoint=False)
    return np.stack([cx + r * np.cos(t), cy + r * np.sin(t)], axis=1)


def _seg_px(a: np.ndarray, b: np.ndarray, wa: float, wb: Optional[float] = None) -> np.ndarray:
    """Returns the quad of a thick segment from ``a`` to ``b`` with end widths ``wa`` and ``wb``."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    wb = wa if wb is None else wb
    d = b - a
    n = float(np.hypot(d[0], d[1]))
    if n < 1e-9:
        d, n = np.array([0.0, 1.0]), 1.0
    perp = np.array([-d[1], d[0]]) / n
    return np.stack([a + perp * wa / 2, b + perp * wb / 2, b - perp * wb / 2, a - perp * wa / 2])


class _Scene:
    """Renders one street scene into an RGB float image and a train-id label map.

    World coordinates are metres: X to the right, Y up from the road surface, Z forward (depth). The
    camera sits at ``(0, cam_height, 0)`` looking along +Z with the horizon at image row ``hy``.

    Args:
        rng: The image's random generator; every random choice is drawn from it in a fixed order.
        height: Image height in pixels.
        width: Image width in pixels.
    """

    def __init__(self, rng: np.random.Generator, height: int, width: int) -> None:
        self.rng = rng
        self.h, self.w = int(height), int(width)
        self.img = np.zeros((self.h, self.w, 3), np.float32)
        self.lbl = np.full((self.h, self.w), IGNORE_INDEX, np.uint8)
        self._tex: Dict[str, np.ndarray] = {}
        self._bank: Dict[Tuple[str, float], np.ndarray] = {}
        self._seq = 0
        # Pixel scale relative to the default 512-px width: texture feature sizes and blur follow it.
        self.px = self.w / 512.0
        # Focal length like Cityscapes (about 1.1 x width), a slightly yawed camera and a variable
        # pitch (horizon row) and mounting height.
        self.f = 1.1 * self.w * self._u(0.92, 1.08)
        self.cx = self.w * (0.5 + self._u(-0.04, 0.04))
        self.hy = self.h * self._u(0.36, 0.47)
        self.ch = self._u(1.15, 1.45)
        self._setup_atmosphere()
        self._setup_materials()

    # ------------------------------------------------------------------------------------------
    # random helpers
    def _u(self, a: float, b: float) -> float:
        return float(self.rng.uniform(a, b))

    def _p(self, p: float) -> bool:
        return bool(self.rng.random() < p)

    def _pick(self, seq: Sequence[Any]) -> Any:
        return seq[int(self.rng.integers(len(seq)))]

    def _choice(self, options: Sequence[Any], probs: Sequence[float]) -> Any:
        probs = np.asarray(probs, np.float64)
        return options[int(self.rng.choice(len(options), p=probs / probs.sum()))]

    def _jit(self, colour: Sequence[float], amount: float) -> np.ndarray:
        c = np.asarray(colour, np.float64) + self.rng.uniform(-amount, amount, 3)
        return np.clip(c, 0, 255)

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    # ------------------------------------------------------------------------------------------
    # geometry
    def proj(self, pts: np.ndarray) -> np.ndarray:
        """Projects world points ``(..., 3)`` to pixel coordinates ``(..., 2)``."""
        p = np.asarray(pts, np.float64)
        inv = self.f / np.maximum(p[..., 2], _Z_NEAR)
        out = np.empty(p.shape[:-1] + (2, ), np.float64)
        out[..., 0] = self.cx + p[..., 0] * inv
        out[..., 1] = self.hy + (self.ch - p[..., 1]) * inv
        return out

    def haze(self, colour: Sequence[float], z: float) -> np.ndarray:
        """Blends a colour towards the horizon colour with distance (aerial perspective)."""
        a = 1.0 - math.exp(-max(z, 0.0) / self.haze_d)
        return np.asarray(colour, np.float64) * (1 - a) + self.haze_col * a

    @staticmethod
    def quad_x(x: float, y0: float, y1: float, z0: float, z1: float) -> np.ndarray:
        """A rectangle in the plane ``X = x`` (a side face)."""
        return np.array([[x, y0, z0], [x, y1, z0], [x, y1, z1], [x, y0, z1]], np.float64)

    @staticmethod
    def quad_y(y: float, x0: float, x1: float, z0: float, z1: float) -> np.ndarray:
        """A rectangle in the plane ``Y = y`` (ground, roof)."""
        return np.array([[x0, y, z0], [x1, y, z0], [x1, y, z1], [x0, y, z1]], np.float64)

    @staticmethod
    def quad_z(z: float, x0: float, x1: float, y0: float, y1: float) -> np.ndarray:
        """A rectangle in the plane ``Z = z`` (a face looking at the camera)."""
        return np.array([[x0, y0, z], [x1, y0, z], [x1, y1, z], [x0, y1, z]], np.float64)

    # ------------------------------------------------------------------------------------------
    # raster primitives: image and label always come from the same polygon calls
    def _mask(self, groups: List[List[np.ndarray]]) -> Optional[Tuple[int, int, np.ndarray]]:
        """Rasterises fixed-point polygon groups into a boolean mask cropped to their bounding box."""
        allp = np.concatenate([p.reshape(-1, 2) for g in groups for p in g])
        x0 = max(int(allp[:, 0].min()) // int(_SCALE) - 1, 0)
        y0 = max(int(allp[:, 1].min()) // int(_SCALE) - 1, 0)
        x1 = min(int(allp[:, 0].max()) // int(_SCALE) + 2, self.w)
        y1 = min(int(allp[:, 1].max()) // int(_SCALE) + 2, self.h)
        if x1 <= x0 or y1 <= y0:
            return None
        m = np.zeros((y1 - y0, x1 - x0), np.uint8)
        off = np.array([x0 * int(_SCALE), y0 * int(_SCALE)], np.int32)
        for g in groups:
            cv2.fillPoly(m, [p - off for p in g], 1, cv2.LINE_8, _SHIFT)
        return y0, x0, m.astype(bool)

    def fill(self, polys: Sequence[np.ndarray], label: Optional[int], colour: Optional[Sequence[float]] = None,
             tex: Optional[str] = None, evenodd: bool = False) -> None:
        """Fills pixel-space polygons with a colour or a material texture and sets their label.

        Args:
            polys: Polygons as ``(N, 2)`` float pixel coordinates.
            label: Train id to write, or None to leave the label map alone (surface details).
            colour: RGB fill colour (used when ``tex`` is None).
            tex: Name of a full-frame material texture to copy instead of a flat colour.
            evenodd: Fill all polygons in one call, so overlaps cancel (rings, many disjoint windows);
                otherwise each polygon is filled on its own and overlaps are simply unions.
        """
        if len(polys) == 0:
            return
        pts = _to_fixed_many(polys)
        if not pts:
            return
        groups = [pts] if evenodd else [[p] for p in pts]
        if tex is None:
            c = tuple(float(v) for v in colour)
            for g in groups:
                cv2.fillPoly(self.img, g, c, cv2.LINE_8, _SHIFT)
                if label is not None:
                    cv2.fillPoly(self.lbl, g, int(label), cv2.LINE_8, _SHIFT)
            return
        res = self._mask(groups)
        if res is None:
            return
        y0, x0, m = res
        y1, x1 = y0 + m.shape[0], x0 + m.shape[1]
        np.copyto(self.img[y0:y1, x0:x1], self.texture(tex)[y0:y1, x0:x1], where=m[..., None])
        if label is not None:
            np.copyto(self.lbl[y0:y1, x0:x1], np.uint8(label), where=m)

    def fill_w(self, polys: Sequence[np.ndarray], label: Optional[int], colour: Optional[Sequence[float]] = None,
               tex: Optional[str] = None, evenodd: bool = False) -> None:
        """Like :meth:`fill` for world-space polygons ``(N, 3)``."""
        self.fill([self.proj(p) for p in polys], label, colour, tex, evenodd)

    def darken(self, polys: Sequence[np.ndarray], factor: float, world: bool = True) -> None:
        """Multiplies the image under the polygons by ``factor`` (shadows); labels are unchanged."""
        pts = [_to_fixed(self.proj(p) if world else p) for p in polys]
        res = self._mask([[p] for p in pts])
        if res is None:
            return
        y0, x0, m = res
        view = self.img[y0:y0 + m.shape[0], x0:x0 + m.shape[1]]
        np.multiply(view, np.float32(factor), out=view, where=m[..., None])

    def seg_w(self, p0: Sequence[float], p1: Sequence[float], width_m: float, label: Optional[int],
              colour: Sequence[float], min_px: float = 1.0) -> None:
        """Draws a thin world-space bar (pole, rail, tube); never thinner than ``min_px`` pixels.

        The minimum width keeps distant thin structures visible as 1-px lines, as they are in real
        photos, instead of breaking up into dots.

        Args:
            p0: World start point ``(X, Y, Z)``.
            p1: World end point.
            width_m: Bar width in metres (the pixel width follows each end's depth).
            label: Train id to write, or None for an image-only detail.
            colour: RGB colour.
            min_px: Minimum pixel width.
        """
        a, b = self.proj(np.array([p0, p1], np.float64))
        wa = max(self.f * width_m / max(p0[2], _Z_NEAR), min_px)
        wb = max(self.f * width_m / max(p1[2], _Z_NEAR), min_px)
        self.fill([_seg_px(a, b, wa, wb)], label, colour)

    def segs_w(self, p0: np.ndarray, p1: np.ndarray, width_m: float, label: Optional[int], colour: Sequence[float],
               min_px: float = 1.0) -> None:
        """Vectorised :meth:`seg_w` for many bars ``p0[i] -> p1[i]`` (pickets, mesh wires, posts)."""
        p0 = np.asarray(p0, np.float64).reshape(-1, 3)
        p1 = np.asarray(p1, np.float64).reshape(-1, 3)
        if len(p0) == 0:
            return
        a, b = self.proj(p0), self.proj(p1)
        wa = np.maximum(self.f * width_m / np.maximum(p0[:, 2], _Z_NEAR), min_px)[:, None]
        wb = np.maximum(self.f * width_m / np.maximum(p1[:, 2], _Z_NEAR), min_px)[:, None]
        d = b - a
        n = np.hypot(d[:, 0], d[:, 1])[:, None]
        d = np.where(n > 1e-9, d / np.maximum(n, 1e-9), np.array([[0.0, 1.0]]))
        perp = np.stack([-d[:, 1], d[:, 0]], 1)
        quads = np.stack([a + perp * wa / 2, b + perp * wb / 2, b - perp * wb / 2, a - perp * wa / 2], 1)
        # Cull bars entirely outside the frame: a long fence has hundreds of them.
        inside = ((quads[..., 0].max(1) >= -1) & (quads[..., 0].min(1) <= self.w + 1)
                  & (quads[..., 1].max(1) >= -1) & (quads[..., 1].min(1) <= self.h + 1))
        self.fill(list(quads[inside]), label, colour)

    def line_w(self, p0: Sequence[float], p1: Sequence[float], colour: Sequence[float]) -> None:
        """Draws a 1-px world-space line into the image only (paint marks, joints, seams)."""
        a, b = self.proj(np.array([p0, p1], np.float64))
        a = _to_fixed(a).reshape(2)
        b = _to_fixed(b).reshape(2)
        cv2.line(self.img, (int(a[0]), int(a[1])), (int(b[0]), int(b[1])), tuple(float(v) for v in colour), 1,
                 cv2.LINE_8, _SHIFT)

    def frontal(self, anchor: Sequence[float], pts_m: np.ndarray) -> np.ndarray:
        """Maps metre offsets ``(x right, y up)`` in the camera-facing plane through ``anchor`` to pixels."""
        s = self.f / max(anchor[2], _Z_NEAR)
        ax = self.cx + anchor[0] * s
        ay = self.hy + (self.ch - anchor[1]) * s
        p = np.asarray(pts_m, np.float64).reshape(-1, 2)
        out = np.empty_like(p)
        out[:, 0] = ax + s * p[:, 0]
        out[:, 1] = ay - s * p[:, 1]
        return out

    def box(self, x0: float, x1: float, y0: float, y1: float, z0: float, z1: float, label: Optional[int],
            colour: Sequence[float], tex: Optional[str] = None, side_shade: float = 0.82,
            top_shade: float = 1.08) -> Dict[str, np.ndarray]:
        """Draws the visible faces of an axis-aligned box, far faces first.

        Args:
            x0: Left X of the box (metres).
            x1: Right X.
            y0: Bottom height.
            y1: Top height.
            z0: Near depth (the face at ``z0`` looks at the camera).
            z1: Far depth.
            label: Train id to write, or None.
            colour: Base RGB colour; side, top and bottom faces are shaded from it.
            tex: Optional material texture instead of the flat colour.
            side_shade: Brightness factor of the side face.
            top_shade: Brightness factor of the top face.

        Returns:
            The drawn faces by name (``'side'``, ``'top'``, ``'bottom'``, ``'front'``) so callers can add
            details (windows, lights) onto them.
        """
        faces: Dict[str, np.ndarray] = {}
        c = np.asarray(colour, np.float64)
        # The side facing the camera axis is visible; a box straddling X = 0 shows none.
        if x1 < 0:
            faces['side'] = self.quad_x(x1, y0, y1, z0, z1)
        elif x0 > 0:
            faces['side'] = self.quad_x(x0, y0, y1, z0, z1)
        if y1 < self.ch:
            faces['top'] = self.quad_y(y1, x0, x1, z0, z1)
        elif y0 > self.ch:
            faces['bottom'] = self.quad_y(y0, x0, x1, z0, z1)
        faces['front'] = self.quad_z(z0, x0, x1, y0, y1)
        shades = {'side': side_shade, 'top': top_shade, 'bottom': 0.6, 'front': 1.0}
        for name, poly in faces.items():
            self.fill_w([poly], label, np.clip(c * shades[name], 0, 255), tex)
        return faces

    # ------------------------------------------------------------------------------------------
    # materials
    # Noise fields are the main cost of a frame, so each kind is generated once per image, a little larger
    # than the frame, and materials take differently offset windows of it ("variants").
    _BANK_PAD = 61

    def _window(self, field: np.ndarray, variant: int) -> np.ndarray:
        oy = (variant * 29) % self._BANK_PAD
        ox = (variant * 43) % self._BANK_PAD
        return field[oy:oy + self.h, ox:ox + self.w]

    def _smooth_noise(self, cell: float, variant: int = 0) -> np.ndarray:
        """Unit-variance smooth noise with features of about ``cell`` pixels (at 512 px width)."""
        key = ('smooth', cell)
        if key not in self._bank:
            c = max(cell * self.px, 1.0)
            fh, fw = self.h + self._BANK_PAD, self.w + self._BANK_PAD
            gh, gw = int(fh / c) + 3, int(fw / c) + 3
            g = self.rng.standard_normal((gh, gw), dtype=np.float32)
            out = cv2.resize(g, (int(math.ceil(gw * c)), int(math.ceil(gh * c))), interpolation=cv2.INTER_CUBIC)
            out = out[:fh, :fw]
            self._bank[key] = (out - out.mean()) / (out.std() + 1e-6)
        return self._window(self._bank[key], variant)

    def _fine_noise(self, sigma: float = 0.0, variant: int = 0) -> np.ndarray:
        """Unit-variance per-pixel noise, optionally blurred to leaf/gravel grain size."""
        key = ('fine', round(sigma, 3))
        if key not in self._bank:
            if ('fine', 0.0) not in self._bank:
                self._bank[('fine', 0.0)] = self.rng.standard_normal(
                    (self.h + self._BANK_PAD, self.w + self._BANK_PAD), dtype=np.float32)
            n = self._bank[('fine', 0.0)]
            if sigma > 0:
                n = cv2.GaussianBlur(n, (0, 0), sigma)
                n /= n.std() + 1e-6
            self._bank[key] = n
        return self._window(self._bank[key], variant)

    def _setup_atmosphere(self) -> None:
        """Chooses the weather: sky colours, clouds, haze and whether the sun casts shadows."""
        kind = self._choice(['clear', 'overcast', 'hazy', 'dusk'], [0.45, 0.3, 0.15, 0.1])
        top, hor, cloud = {
            'clear': ((70, 120, 190), (172, 200, 228), (236, 238, 242)),
            'overcast': ((172, 178, 188), (214, 218, 222), (150, 156, 166)),
            'hazy': ((150, 174, 204), (214, 214, 208), (230, 230, 232)),
            'dusk': ((62, 82, 140), (236, 172, 116), (200, 150, 140)),
        }[kind]
        self.sky_kind = kind
        self.sky_top = self._jit(top, 14)
        self.haze_col = self._jit(hor, 10)
        self.cloud_col = self._jit(cloud, 8)
        self.cloudiness = {'clear': 0.6, 'overcast': 0.9, 'hazy': 0.4, 'dusk': 0.5}[kind] * self._u(0.3, 1.0)
        self.haze_d = self._u(150, 450) if kind in ('overcast', 'hazy') else self._u(300, 1000)
        self.sunny = kind == 'clear' and self._p(0.75)
        self.shadow_side = -1 if self._p(0.5) else 1
        if self.sunny:
            self.side_light = {self.shadow_side: self._u(0.55, 0.78), -self.shadow_side: self._u(0.98, 1.12)}
        else:
            self.side_light = {-1: self._u(0.85, 1.0), 1: self._u(0.85, 1.0)}

    def _setup_materials(self) -> None:
        """Chooses this image's ground and vegetation colours (overlapping ranges on purpose)."""
        g = self._u(72, 125)
        self.road_col = self._jit((g, g, g + 3), 4)
        if self._p(0.75):
            # Grey pavement, sometimes nearly the road's grey: then only the curb separates them.
            gs = g + self._u(6, 55)
            self.sidewalk_col = self._jit((gs, gs - 2, gs - 4), 5)
        else:
            self.sidewalk_col = self._jit((156, 112, 100), 16)
        self.curb_col = np.clip(self.sidewalk_col * self._u(1.05, 1.3), 0, 255)
        self.veg_col = self._jit((58, 88, 36), 14)
        self.veg_col2 = self._jit((150, 112, 40), 12) if self._p(0.1) else self._jit((96, 118, 48), 14)
        if self._p(0.4):
            # Terrain in the vegetation's own greens: only flatness and context tell them apart.
            self.terrain_col = np.clip(self.veg_col * self._u(1.05, 1.4), 0, 255)
        elif self._p(0.7):
            self.terrain_col = self._jit((100, 124, 62), 16)
        else:
            self.terrain_col = self._jit((134, 122, 84), 16)
        self.terrain_col2 = self._jit((128, 112, 78), 14)

    def texture(self, name: str) -> np.ndarray:
        """Returns (and caches) a full-frame ``(H, W, 3)`` float texture of a material."""
        if name in self._tex:
            return self._tex[name]
        f32 = np.float32
        if name == 'vegetation':
            # Strong leaf-scale grain, clumps and dark holes between leaves.
            leaf = self._fine_noise(0.55 * self.px + 0.25)
            mid = self._smooth_noise(4)
            low = self._smooth_noise(28)
            holes = self._smooth_noise(4, variant=1)
            lum = 1 + 0.32 * leaf + 0.2 * mid
            lum *= 1 - 0.5 / (1 + np.exp(-(holes * 3 - 3.5)))
            t = (1 / (1 + np.exp(-1.6 * low)))[..., None]
            tex = (self.veg_col.astype(f32) * (1 - t) + self.veg_col2.astype(f32) * t) * lum[..., None]
        elif name == 'terrain':
            # Flat grass/dirt: similar greens, finer and weaker grain than vegetation.
            grain = self._fine_noise(0.55 * self.px + 0.25, variant=1)
            mid = self._smooth_noise(4, variant=2)
            low = self._smooth_noise(28, variant=1)
            lum = 1 + 0.12 * grain + 0.1 * mid + 0.06 * low
            t = np.clip(self._smooth_noise(12, variant=1) * 0.5 - 0.3, 0, 1)[..., None]
            tex = (self.terrain_col.astype(f32) * (1 - t) + self.terrain_col2.astype(f32) * t) * lum[..., None]
        elif name == 'road':
            # No per-pixel term: the camera's sensor noise supplies the fine grain.
            lum = 1 + 0.06 * self._smooth_noise(2) + 0.07 * self._smooth_noise(28, variant=3)
            tex = self.road_col.astype(f32) * lum[..., None]
        elif name == 'sidewalk':
            lum = 1 + 0.06 * self._smooth_noise(2, variant=1) + 0.06 * self._smooth_noise(28, variant=4)
            tex = self.sidewalk_col.astype(f32) * lum[..., None]
        elif name == 'gravel':
            lum = 1 + 0.22 * self._fine_noise(0.55 * self.px + 0.25, variant=2) + 0.08 * self._smooth_noise(28, variant=5)
            tex = np.array([112, 102, 92], f32) * lum[..., None]
        else:
            raise KeyError(f'unknown material {name!r}')
        tex = tex.astype(np.float32)
        self._tex[name] = tex
        return tex

    # ------------------------------------------------------------------------------------------
    # scene plan
    def render(self) -> Tuple[np.ndarray, np.ndarray]:
        """Plans and draws the whole scene.

        Returns:
            ``(image, label)``: ``(H, W, 3)`` uint8 RGB and ``(H, W)`` uint8 train ids / 255.
        """
        self._plan_street()
        sides = [self._plan_side(-1), self._plan_side(1)]
        self._draw_sky()
        self._draw_ground(sides)
        self._draw_cast_shadows(sides)
        self._draw_background(sides)
        # Painter's algorithm: by lateral band first (see _BAND_*), far to near within a band.
        queue: List[Tuple[int, float, int, Callable[[], None]]] = []
        for side in sides:
            queue.extend(side['objects'])
        queue.extend(self._plan_road_objects(sides))
        queue.sort(key=lambda o: (o[0], -o[1], o[2]))
        for _, _, _, draw in queue:
            draw()
        if self._p(0.7):
            self._draw_ego_vehicle()
        return self._finish(), self.lbl

    def _add(self, objects: list, band: int, z: float, fn: Callable[..., None], *args: Any,
             **kwargs: Any) -> None:
        """Queues ``fn(*args, **kwargs)`` for drawing in ``band`` at depth ``z`` (ties keep plan order)."""
        objects.append((band, float(z), self._next_seq(), functools.partial(fn, *args, **kwargs)))

    def _plan_street(self) -> None:
        """Chooses the road cross-section: lanes, parking lanes, bike lane, curb, street end."""
        self.lane_w = self._u(2.9, 3.5)
        self.n_left = int(self._choice([0, 1, 2], [0.12, 0.55, 0.33]))
        self.park = {-1: self._p(0.4), 1: self._p(0.45)}
        self.bike_lane = (not self.park[1]) and self._p(0.3)
        right = self.lane_w / 2 + (2.2 if self.park[1] else 0) + (1.5 if self.bike_lane else 0) + self._u(0.1, 0.4)
        left = self.lane_w / 2 + self.n_left * self.lane_w + (2.2 if self.park[-1] else 0) + self._u(0.1, 0.4)
        self.road_edge = {-1: left, 1: right}
        self.curb_h = self._u(0.08, 0.16)
        self.z_end = self._u(70, 220) if self._p(0.5) else None
        self.cross_w = self._u(8, 14)
        # Sidewalks and side buildings stop at the cross street.
        self.z_street = (self.z_end - self.cross_w - 3) if self.z_end else 400.0
        self.zebra = self._u(10, 35) if self._p(0.2) else None
        self.tram = self.n_left >= 1 and self._p(0.06)
        self.tram_x = -self.lane_w

    def _plan_side(self, s: int) -> Dict[str, Any]:
        """Plans one side of the street (s = -1 left, +1 right): ground strips and standing objects."""
        side: Dict[str, Any] = {'s': s, 'objects': [], 'buildings': [], 'rail': None, 'D_f': None}
        objs = side['objects']
        d_r = self.road_edge[s]
        style = self._choice(['urban', 'suburban', 'open'], [0.57, 0.29, 0.14])
        if style == 'open':
            sw = 0.0 if self._p(0.5) else self._u(1.2, 2.5)
        else:
            sw = self._u(1.8, 5.0)
        d_o = d_r + sw
        side.update(style=style, D_r=d_r, D_o=d_o, sw=sw, front='terrain')
        z_lim = self.z_street
        light = self.side_light[s]

        if style == 'urban':
            setback = 0.0 if self._p(0.6) else self._u(1.5, 5.0)
            d_f = d_o + setback
            if setback and self._p(0.3):
                side['front'] = 'sidewalk'
            z = self._u(-6, 1)
            while z < z_lim:
                if z > 5 and self._p(0.12):
                    gl = self._u(3, 12)
                    kind = self._choice(['wall', 'fence', 'hedge', 'none'], [0.35, 0.35, 0.1, 0.2])
                    self._plan_boundary(objs, s, d_o, z, min(z + gl, z_lim), kind)
                    if self._p(0.75):
                        self._add(objs, _BAND_FACADE, z + gl / 2, self._draw_tree, s * (d_f + self._u(2, 8)), z + gl / 2,
                                  self._u(2, 4), self._u(2.5, 4.5))
                    z += gl
                    continue
                length = self._u(8, 28)
                b = dict(z0=max(z, 0.6), z1=min(z + length, z_lim), H=self._u(9, 26),
                         D=d_f + (self._u(0.3, 2.5) if self._p(0.25) else 0.0),
                         colour=np.asarray(self._pick(_FACADE_COLOURS), np.float64), roof=self._p(0.3),
                         light=light)
                if b['z1'] - b['z0'] > 1.0:
                    side['buildings'].append(b)
                    self._add(objs, _BAND_FACADE, b['z0'], self._draw_side_building, s, b)
                    if setback:
                        kind = self._choice(['hedge', 'fence', 'wall', 'none'], [0.3, 0.3, 0.25, 0.15])
                        self._plan_boundary(objs, s, d_o, b['z0'], b['z1'], kind, b['colour'])
                        if side['front'] == 'terrain' and setback > 2.5 and self._p(0.5):
                            # A tree in the front garden.
                            zt = self._u(b['z0'], b['z1'])
                            self._add(objs, _BAND_YARD, zt, self._draw_tree, s * (d_o + setback / 2), zt, self._u(1.5, 3),
                                      min(setback / 2 + 1, self._u(1.5, 3)))
                z += length
        elif style == 'suburban':
            d_f = d_o + self._u(4, 12)
            z = self._u(-4, 4)
            while z < z_lim:
                if self._p(0.45):
                    z += self._u(4, 15)
                    continue
                length = self._u(8, 15)
                b = dict(z0=max(z, 0.6), z1=min(z + length, z_lim), H=self._u(5, 10),
                         D=d_f + self._u(0, 2), colour=np.asarray(self._pick(_FACADE_COLOURS), np.float64),
                         roof=self._p(0.7), light=light)
                if b['z1'] - b['z0'] > 1.0:
                    side['buildings'].append(b)
                    self._add(objs, _BAND_FACADE, b['z0'], self._draw_side_building, s, b)
                z += length
            z = self._u(0, 5)
            while z < min(z_lim, 150):
                length = self._u(10, 30)
                kind = self._choice(['hedge', 'fence', 'wall', 'none'], [0.35, 0.35, 0.15, 0.15])
                self._plan_boundary(objs, s, d_o, z, min(z + length, z_lim), kind)
                z += length
            if self._p(0.7):
                z = self._u(2, 12)
                while z < min(z_lim, 120):
                    self._add(objs, _BAND_YARD, z, self._draw_tree, s * self._u(d_o + 1.2, d_f - 1.0), z,
                              self._u(2, 3.5), self._u(1.5, 3.5))
                    z += self._u(7, 18)
        else:
            d_f = None
            d_t = self._u(10, 60)
            if self._p(0.6):
                z0 = self._u(0, 30)
                z1 = z_lim if self.z_end else self._u(100, 300)
                self._add(objs, _BAND_FACADE, z0, self._draw_treeline, s, d_t, z0, z1, self._u(4, 14))
            else:
                d_t = 1e9
            if self._p(0.5) and min(d_t - 5, 35) > d_o + 6:
                d_rail = self._u(d_o + 6, min(d_t - 5, 35))
                side['rail'] = d_rail
                if self._p(0.8):
                    z0 = self._u(15, 70)
                    self._add(objs, _BAND_FACADE, z0, self._draw_train_far, s, d_rail, z0, self._u(40, 120))
                if self._p(0.5):
                    z = self._u(5, 20)
                    while z < 200:
                        self._add(objs, _BAND_YARD, z, self._draw_pole, s * (d_rail - 2.6), z, 'mast')
                        z += self._u(40, 60)
            if self._p(0.3):
                self._plan_boundary(objs, s, d_o + 0.5, self._u(0, 10), self._u(40, 150), 'fence')
            elif self._p(0.25):
                self._add(objs, _BAND_BOUNDARY, 0.6, self._draw_guard_rail, s, d_r + 0.6, 0.6, self._u(40, 200))
            if self._p(0.5):
                # Yard band: in front of the railway and tree line, which are drawn before them.
                d_max = min(d_o + 25, d_t - 3, 1e9 if side['rail'] is None else side['rail'] - 4.5)
                for _ in range(int(self.rng.integers(1, 5)) if d_max > d_o + 2 else 0):
                    z = self._u(5, 80)
                    self._add(objs, _BAND_YARD, z, self._draw_tree, s * self._u(d_o + 2, d_max), z,
                              self._u(2, 4), self._u(2, 4.5))
        side['D_f'] = d_f
        self._plan_sidewalk_objects(side)
        return side

    def _plan_boundary(self, objs: list, s: int, d: float, z0: float, z1: float, kind: str,
                       colour: Optional[np.ndarray] = None) -> None:
        """Adds a wall, fence or hedge along ``X = s*d`` between depths ``z0`` and ``z1``."""
        z0 = max(z0, 0.6)
        if z1 - z0 < 1.0 or kind == 'none':
            return
        if kind == 'wall':
            if colour is None or self._p(0.3):
                colour = np.asarray(self._pick(_FACADE_COLOURS), np.float64)
            self._add(objs, _BAND_BOUNDARY, z0, self._draw_wall, s, d, z0, z1, self._u(0.6, 2.6), colour)
        elif kind == 'fence':
            style = self._choice(['pickets', 'mesh', 'panel', 'bars'], [0.35, 0.25, 0.2, 0.2])
            self._add(objs, _BAND_BOUNDARY, z0, self._draw_fence, s, d, z0, z1, self._u(0.9, 2.0), style,
                      np.asarray(self._pick(_FENCE_COLOURS), np.float64))
        elif kind == 'hedge':
            self._add(objs, _BAND_BOUNDARY, z0, self._draw_hedge, s, d, z0, z1, self._u(0.7, 1.8))

    def _plan_sidewalk_objects(self, side: Dict[str, Any]) -> None:
        """Adds trees, poles, persons, parked two-wheelers and street furniture on the sidewalk."""
        s, d_r, d_o, sw, style = side['s'], side['D_r'], side['D_o'], side['sw'], side['style']
        objs = side['objects']
        z_lim = self.z_street
        # Tree alley along the curb.
        if sw >= 2.2 and self._p(0.45 if style == 'urban' else 0.2):
            z = self._u(3, 10)
            step = self._u(7, 13)
            while z < min(z_lim, 120):
                self._add(objs, _BAND_SIDEWALK, z, self._draw_tree, s * (d_r + self._u(0.7, 1.1)), z, self._u(2.2, 3.5),
                          self._u(1.8, 3.5))
                z += step * self._u(0.85, 1.15)
        # Poles: street lights, sign posts, traffic lights. They stand near the curb, also on open sides.
        z = self._u(2, 15)
        while z < min(z_lim, 160):
            kind = self._choice(['light', 'sign', 'tlight'], [0.35, 0.45, 0.2])
            self._add(objs, _BAND_SIDEWALK, z, self._draw_pole, s * (d_r + self._u(0.25, 0.6)), z, kind)
            z += self._u(12, 35)
        if self.zebra is not None and self._p(0.7):
            self._add(objs, _BAND_SIDEWALK, self.zebra - 0.5, self._draw_pole, s * (d_r + 0.4), self.zebra - 0.5, 'tlight')
        if sw <= 0:
            return
        y = self.curb_h
        lam = {'urban': 3.2, 'suburban': 1.2, 'open': 0.3}[style]
        for _ in range(int(self.rng.poisson(lam))):
            x = s * self._u(d_r + 0.4, max(d_o - 0.3, d_r + 0.5))
            # Denser near the camera, where people are resolvable.
            z = 4 + (min(z_lim, 70) - 4) * self._u(0, 1)**1.5
            self._add(objs, _BAND_SIDEWALK, z, self._draw_person, x, y, z)
            if self._p(0.3):
                for _ in range(int(self.rng.integers(1, 4))):
                    dz = self._u(-1.2, 1.2)
                    self._add(objs, _BAND_SIDEWALK, z + dz, self._draw_person, x + self._u(-0.7, 0.7), y, z + dz)
        if self._p(0.4 if style == 'urban' else 0.15):
            z = self._u(5, min(z_lim, 40))
            x = s * (d_o - 0.5 if self._p(0.5) else d_r + 0.6)
            facing = self._pick([-1, 1])
            for i in range(int(self.rng.integers(1, 5))):
                self._add(objs, _BAND_SIDEWALK, z + 0.6 * i, self._draw_two_wheeler, x, y, z + 0.6 * i, 'bicycle', 'side',
                          facing, False)
        if self._p(0.06):
            z = self._u(5, min(z_lim, 40))
            self._add(objs, _BAND_SIDEWALK, z, self._draw_two_wheeler, s * (d_r + 0.8), y, z, 'motorcycle', 'side',
                      self._pick([-1, 1]), False)
        for _ in range(int(self.rng.poisson(0.8 if style == 'urban' else 0.3))):
            z = self._u(3, min(z_lim, 60))
            self._add(objs, _BAND_SIDEWALK, z, self._draw_clutter, s * self._u(d_r + 0.5, max(d_o - 0.6, d_r + 0.6)), y, z)

    def _plan_road_objects(self, sides: List[Dict[str, Any]]) -> list:
        """Plans vehicles, riders and crossing pedestrians on the road (band 3)."""
        objs: list = []
        occupied: List[Tuple[float, float, float, float]] = []

        def free(x0: float, x1: float, z0: float, z1: float) -> bool:
            for a0, a1, b0, b1 in occupied:
                if x0 < a1 + 0.3 and a0 < x1 + 0.3 and z0 < b1 + 1.0 and b0 < z1 + 1.0:
                    return False
            return True

        def reserve(xc: float, w: float, z0: float, length: float) -> bool:
            if not free(xc - w / 2, xc + w / 2, z0, z0 + length):
                return False
            occupied.append((xc - w / 2, xc + w / 2, z0, z0 + length))
            return True

        if self.tram:
            z0 = self._u(12, 60)
            length = self._u(25, 40)
            if reserve(self.tram_x, 2.6, z0, length):
                self._add(objs, _BAND_ROAD, z0, self._draw_tram, self.tram_x, z0, length,
                          'front' if self._p(0.5) else 'rear')
        # Parked cars along the curb.
        for s in (-1, 1):
            if not self.park[s]:
                continue
            z = self._u(4, 14)
            while z < min(80, self.z_street - 2):
                if self._p(0.8):
                    kind = self._choice(['car', 'van', 'truck'], [0.9, 0.07, 0.03])
                    length = {'car': 4.5, 'van': 5.3, 'truck': 8.5}[kind]
                    xc = s * (self.road_edge[s] - 1.15 + self._u(-0.1, 0.15))
                    if reserve(xc, 2.0, z, length):
                        self._add(objs, _BAND_ROAD, z, self._draw_vehicle, kind, xc, z, self._pick(['front', 'rear']))
                    z += length + self._u(0.6, 4)
                else:
                    z += self._u(3, 10)
        # Traffic in the lanes: own lane and lanes to the left (the leftmost one oncoming).
        lanes = [(0.0, 'rear', 0.75)]
        for k in range(1, self.n_left + 1):
            lanes.append((-k * self.lane_w, 'front' if k == self.n_left else 'rear', 0.9))
        for xc, facing, lam in lanes:
            for _ in range(int(self.rng.poisson(lam))):
                kind = self._choice(['car', 'van', 'truck', 'bus', 'motorcycle'], [0.7, 0.06, 0.09, 0.1, 0.05])
                z0 = self._u(7, 90)
                length = {'car': 4.5, 'van': 5.3, 'truck': 9.5, 'bus': 12.5, 'motorcycle': 2.2}[kind]
                x = xc + self._u(-0.3, 0.3)
                if reserve(x, 2.6, z0, length):
                    if kind == 'motorcycle':
                        self._add(objs, _BAND_ROAD, z0, self._draw_two_wheeler, x, 0.0, z0, 'motorcycle', 'rear', 1, True)
                    else:
                        self._add(objs, _BAND_ROAD, z0, self._draw_vehicle, kind, x, z0, facing)
        # Riders: cyclists near the right edge, seen from behind, or crossing, seen from the side.
        if self._p(0.4):
            for _ in range(1 + int(self._p(0.3))):
                kind = 'bicycle' if self._p(0.75) else 'motorcycle'
                z0 = self._u(6, 45)
                if self._p(0.7):
                    if kind == 'bicycle':
                        x = self.road_edge[1] - (2.2 if self.park[1] else 0.0) - self._u(0.5, 1.0)
                    else:
                        x = self._u(-0.6, 0.6)
                    if reserve(x, 0.8, z0, 2.0):
                        self._add(objs, _BAND_ROAD, z0, self._draw_two_wheeler, x, 0.0, z0, kind, 'rear', 1, True)
                else:
                    x = self._u(-self.road_edge[-1] + 1, self.road_edge[1] - 1)
                    if reserve(x, 2.0, z0, 0.8):
                        self._add(objs, _BAND_ROAD, z0, self._draw_two_wheeler, x, 0.0, z0, kind, 'side',
                                  self._pick([-1, 1]), True)
        if self.zebra is not None:
            for _ in range(int(self.rng.poisson(1.3))):
                z = self.zebra + self._u(0.5, 3.0)
                self._add(objs, _BAND_ROAD, z, self._draw_person, self._u(-self.road_edge[-1], self.road_edge[1]), 0.0, z,
                          'side')
        return objs

    # ------------------------------------------------------------------------------------------
    # sky, ground, background
    def _draw_sky(self) -> None:
        """Fills the frame above the horizon with a vertical sky gradient and soft clouds."""
        # Rows below the horizon are all covered by the ground, so the sky is only computed above it.
        rows = min(int(math.floor(self.hy)) + 1, self.h)
        ys = np.arange(rows, dtype=np.float32)[:, None, None]
        t = np.clip(ys / max(self.hy, 1.0), 0, 1)**0.8
        base = self.sky_top.astype(np.float32)[None, None] * (1 - t) + self.haze_col.astype(np.float32)[None, None] * t
        c = (self._smooth_noise(45) + 0.5 * self._smooth_noise(12, variant=2))[:rows]
        a = (np.clip((c - 0.4) * 0.8, 0, 1) * np.float32(self.cloudiness))[..., None]
        cloud = self.cloud_col.astype(np.float32)[None, None] * (0.85 + 0.15 * np.clip(c, -1, 1))[..., None]
        self.img[:rows] = base * (1 - a) + cloud * a
        self.lbl[:] = SKY

    def _draw_ground(self, sides: List[Dict[str, Any]]) -> None:
        """Draws terrain, front gardens, sidewalks, curbs, rail beds, the road and its markings."""
        r0 = int(math.floor(self.hy))
        self.fill([np.array([[-1, r0], [self.w + 1, r0], [self.w + 1, self.h + 1], [-1, self.h + 1]], float)],
                  TERRAIN, tex='terrain')
        zs = self.z_street
        far = self.z_end if self.z_end else 3000.0
        c = self.curb_h
        for side in sides:
            s, d_r, d_o = side['s'], side['D_r'], side['D_o']
            if side['D_f'] is not None and side['front'] == 'sidewalk':
                self.fill_w([self.quad_y(c, s * d_o, s * side['D_f'], 0.6, zs)], SIDEWALK, tex='sidewalk')
            if side['rail'] is not None:
                d = side['rail']
                self.fill_w([self.quad_y(0.0, s * (d - 2.2), s * (d + 2.2), 0.6, 3000.0)], IGNORE_INDEX, tex='gravel')
                for off in (-0.72, 0.72):
                    self.seg_w((s * (d + off), 0.15, 2.0), (s * (d + off), 0.15, 3000.0), 0.07, None, (150, 148, 145))
            if side['sw'] > 0:
                self.fill_w([self.quad_y(c, s * d_r, s * d_o, 0.6, zs)], SIDEWALK, tex='sidewalk')
                # Paving joints, only where they are resolvable.
                tile = self._u(0.4, 1.2)
                joint = np.clip(self.sidewalk_col * 0.78, 0, 255)
                for z in np.arange(1.0, min(zs, 25.0), tile):
                    self.line_w((s * d_r, c, z), (s * d_o, c, z), joint)
                for x in np.arange(d_r + tile, d_o, tile):
                    self.line_w((s * x, c, 1.0), (s * x, c, min(zs, 25.0)), joint)
            # Curb: the visible vertical face between road and sidewalk (labelled sidewalk).
            self.fill_w([self.quad_x(s * d_r, 0.0, c, 0.6, zs)], SIDEWALK, self.curb_col)
        if self.z_end:
            # Cross street and the far sidewalk in front of the closing facades.
            self.fill_w([self.quad_y(c, -400, 400, self.z_end - 3, self.z_end)], SIDEWALK, tex='sidewalk')
            self.fill_w([self.quad_y(0.0, -400, 400, zs, self.z_end - 3)], ROAD, tex='road')
        left, right = -self.road_edge[-1], self.road_edge[1]
        self.fill_w([self.quad_y(0.0, left, right, 0.6, min(far, zs + 0.5) if self.z_end else far)], ROAD,
                    tex='road')
        self._draw_markings(left, right)

    def _draw_markings(self, left: float, right: float) -> None:
        """Paints lane markings, zebra crossing, bike lane, tram rails and patches (all road)."""
        zs = self.z_street
        paint = self._jit((222, 222, 214), 10) * self._u(0.75, 1.0)
        dash, gap = self._u(3, 6), self._u(6, 12)
        for k in range(0, self.n_left + 1):
            x = -self.lane_w / 2 - k * self.lane_w
            if k == self.n_left and not self.park[-1]:
                continue
            z = self._u(0, dash + gap)
            while z < min(zs, 200):
                self.fill_w([self.quad_y(0.0, x - 0.07, x + 0.07, z, z + dash)], ROAD, paint)
                z += dash + gap
        if self._p(0.5):
            for x in (left + 0.3, right - 0.3):
                self.fill_w([self.quad_y(0.0, x - 0.06, x + 0.06, 0.6, zs)], ROAD, paint)
        if self.bike_lane:
            x0 = right - 1.6
            col = self._jit((170, 80, 70), 15) if self._p(0.6) else paint
            if col is paint:
                self.fill_w([self.quad_y(0.0, x0 - 0.07, x0 + 0.07, 0.6, zs)], ROAD, paint)
            else:
                self.fill_w([self.quad_y(0.0, x0, right - 0.1, 0.6, zs)], ROAD, col)
        if self.zebra is not None:
            length = self._u(3, 4)
            x = left + 0.3
            while x < right - 0.3:
                self.fill_w([self.quad_y(0.0, x, x + 0.5, self.zebra, self.zebra + length)], ROAD, paint)
                x += 1.0
        if self.tram:
            for off in (-0.72, 0.72):
                self.seg_w((self.tram_x + off, 0.0, 2.0), (self.tram_x + off, 0.0, min(zs, 3000.0)), 0.07, ROAD,
                           (150, 150, 152))
        for _ in range(int(self.rng.poisson(1.5))):
            # Darker asphalt repairs and manholes.
            z = self._u(4, 40)
            x = self._u(left, right)
            w, l = self._u(0.5, 3), self._u(0.5, 6)
            self.darken([self.quad_y(0.0, x, min(x + w, right), z, z + l)], self._u(0.75, 0.92))

    def _draw_cast_shadows(self, sides: List[Dict[str, Any]]) -> None:
        """On sunny images the buildings of one side throw shadows across the street."""
        if not self.sunny:
            return
        k = self._u(0.45, 0.7)
        reach = self._u(2, 14)
        dz = self._u(-6, 6)
        for side in sides:
            if side['s'] != self.shadow_side:
                continue
            s = side['s']
            for b in side['buildings']:
                d0 = b['D']
                d1 = max(d0 - reach * b['H'] / 15.0, -self.road_edge[-s])
                poly = np.array([[s * d0, 0, b['z0']], [s * d0, 0, b['z1']], [s * d1, 0, b['z1'] + dz],
                                 [s * d1, 0, max(b['z0'] + dz, 0.6)]])
                self.darken([poly], k)

    def _draw_background(self, sides: List[Dict[str, Any]]) -> None:
        """Distant skyline and tree line near the horizon, and the facades closing the street."""
        if self._p(0.6):
            zb = self._u(150, 450)
            x = -zb
            while x < zb:
                w = self._u(10, 40)
                hgt = self._u(5, 45)
                col = self.haze(np.asarray(self._pick(_FACADE_COLOURS)) * self._u(0.7, 1.0), zb)
                self.fill_w([self.quad_z(zb, x, x + w, 0.0, hgt)], BUILDING, col)
                x += w * self._u(0.8, 1.1)
        if self._p(0.5):
            zt = self._u(60, 250)
            xs = np.linspace(-zt * 1.2, zt * 1.2, 80)
            hs = self._u(6, 18) + np.cumsum(self.rng.normal(0, 1.2, xs.size))
            hs = np.clip(hs, 2, 30)
            pts = [[xs[0], 0.0, zt]] + [[x, hh, zt] for x, hh in zip(xs, hs)] + [[xs[-1], 0.0, zt]]
            self.fill_w([np.array(pts)], VEGETATION, tex='vegetation')
        if self.z_end:
            x0 = -self.z_end * 1.5
            x1 = self.z_end * 1.5
            x = x0
            while x < x1:
                w = self._u(8, 25)
                b = dict(H=self._u(8, 28), colour=np.asarray(self._pick(_FACADE_COLOURS), np.float64))
                col = self.haze(b['colour'] * self._u(0.85, 1.0), self.z_end)
                self._draw_facade(np.array([x, 0.0, self.z_end]), np.array([1.0, 0, 0]), w, b['H'], col,
                                  self.z_end, lit_ground=True)
                x += w

    # ------------------------------------------------------------------------------------------
    # buildings and boundaries
    def _draw_facade(self, origin: np.ndarray, u: np.ndarray, length: float, height: float, colour: np.ndarray,
                     z_ref: float, lit_ground: bool = True, windows: bool = True) -> None:
        """Draws a flat facade (building label) spanned by ``u`` (horizontal) and Y, with windows.

        Args:
            origin: World position of the facade's bottom-left corner.
            u: Unit horizontal direction of the facade.
            length: Facade length along ``u`` in metres.
            height: Facade height.
            colour: Wall colour (already lit/hazed).
            z_ref: Representative depth for haze on window colours.
            lit_ground: Draw shop windows / doors on the ground floor.
            windows: Draw the window grid.
        """
        v = np.array([0.0, 1.0, 0.0])

        def rects(a0: np.ndarray, a1: np.ndarray, b0: np.ndarray, b1: np.ndarray) -> np.ndarray:
            a0, a1, b0, b1 = (np.asarray(t, np.float64)[:, None] for t in (a0, a1, b0, b1))
            corners = np.stack([
                origin + a0 * u + b0 * v, origin + a0 * u + b1 * v, origin + a1 * u + b1 * v,
                origin + a1 * u + b0 * v
            ], axis=1)
            return corners

        main = self.proj(rects([0], [length], [0], [height])[0])
        if (main[:, 0].max() < 0 or main[:, 0].min() > self.w or main[:, 1].max() < 0
                or main[:, 1].min() > self.h):
            return  # entirely outside the frame
        self.fill([main], BUILDING, colour)
        if min(np.ptp(main[:, 0]), np.ptp(main[:, 1])) < 3:
            return  # too small for any detail to be resolved
        # Plinth and cornice bands give facades a horizontal structure.
        self.fill_w([rects([0], [length], [0], [0.5])[0]], None, colour * 0.75)
        if height > 4:
            self.fill_w([rects([0], [length], [height - 0.45], [height])[0]], None, np.clip(colour * 1.12, 0, 255))
        if not windows:
            return
        gf = self._u(3.2, 4.5)
        floor_h = self._u(2.9, 3.6)
        col_w = self._u(1.6, 3.2)
        n_f = int((height - gf - 0.6) / floor_h)
        n_c = int((length - 0.8) / col_w)
        if n_f >= 1 and n_c >= 1:
            win_w = col_w * self._u(0.35, 0.62)
            win_h = floor_h * self._u(0.45, 0.62)
            jj, kk = np.meshgrid(np.arange(n_c), np.arange(n_f))
            a0 = 0.4 + (length - 0.8 - n_c * col_w) / 2 + jj.ravel() * col_w + (col_w - win_w) / 2
            b0 = gf + kk.ravel() * floor_h + (floor_h - win_h) * 0.55
            quads = rects(a0, a0 + win_w, b0, b0 + win_h)
            px = self.proj(quads)
            size = np.minimum(np.ptp(px[..., 0], axis=1), np.ptp(px[..., 1], axis=1))
            keep = size >= 0.8
            quads, px = quads[keep], px[keep]
            if self._p(0.3) and len(px):
                # Light window frames, drawn as slightly larger quads under the glass.
                fr = rects(a0[keep] - 0.12, a0[keep] + win_w + 0.12, b0[keep] - 0.12, b0[keep] + win_h + 0.12)
                self.fill(list(self.proj(fr)), None, np.clip(colour * 1.2 + 20, 0, 255), evenodd=True)
            if len(px):
                glass = [self.haze(self._jit(self._pick(_GLASS), 8), z_ref),
                         self.haze(self._jit(self.haze_col * 0.7, 10), z_ref),
                         self.haze(self._jit((196, 186, 150), 15), z_ref)]
                group = self.rng.choice(3, size=len(px), p=[0.62, 0.26, 0.12])
                for gi in range(3):
                    sel = px[group == gi]
                    if len(sel):
                        self.fill(list(sel), None, glass[gi], evenodd=True)
        if lit_ground and length > 3:
            # Shop fronts or doors on the ground floor.
            if self._p(0.5):
                a = 0.6
                while a < length - 1.5:
                    w = min(self._u(1.5, 4.5), length - 0.6 - a)
                    self.fill_w([rects([a], [a + w], [0.5], [gf - 0.7])[0]], None,
                                self.haze(self._jit(self._pick(_GLASS), 10), z_ref))
                    a += w + self._u(0.5, 2.0)
                if self._p(0.35):
                    # Shop sign band: colourful but labelled building (a classic sign look-alike).
                    self.fill_w([rects([0.3], [length - 0.3], [gf - 0.6], [gf - 0.15])[0]], None,
                                self.haze(self._pick(((200, 30, 30), (30, 80, 170), (230, 200, 40),
                                                      (240, 240, 240), (30, 130, 60))), z_ref))
            else:
                a = self._u(0.5, max(length - 2, 0.6))
                self.fill_w([rects([a], [a + 1.2], [0.0], [2.3])[0]], None, colour * 0.45)

    def _draw_side_building(self, s: int, b: Dict[str, Any]) -> None:
        """Draws a building along the street side: its end wall, roof and street facade."""
        d, z0, z1, hb = b['D'], b['z0'], b['z1'], b['H']
        zc = (z0 + z1) / 2
        col = self.haze(b['colour'] * b['light'], zc)
        depth = 15.0
        # End wall facing the camera (visible where the nearer neighbour is set back or missing).
        self._draw_facade(np.array([s * d, 0.0, z0]), np.array([float(s), 0, 0]), depth, hb,
                          self.haze(b['colour'] * b['light'] * 0.85, z0), z0, lit_ground=False, windows=False)
        if b['roof']:
            roof = np.asarray(self._pick(_ROOF_COLOURS), np.float64)
            rise = self._u(2, 4)
            poly = np.array([[s * d, hb, z0], [s * d, hb, z1], [s * (d + 4), hb + rise, z1],
                             [s * (d + 4), hb + rise, z0]])
            self.fill_w([poly], BUILDING, self.haze(roof, zc))
        self._draw_facade(np.array([s * d, 0.0, z0]), np.array([0.0, 0, 1.0]), z1 - z0, hb, col, zc)

    def _draw_wall(self, s: int, d: float, z0: float, z1: float, hgt: float, colour: np.ndarray) -> None:
        """A low wall in the building palette (no windows), 0.3 m thick, in front of the facades."""
        col = self.haze(colour * self.side_light[s] * self._u(0.85, 1.05), z0)
        x_in, x_out = sorted((s * d, s * (d + 0.3)))
        self.box(x_in, x_out, 0.0, hgt, z0, z1, WALL, col, top_shade=1.15)
        if self._p(0.5):
            # Brick or block courses.
            joint = np.clip(col * 0.8, 0, 255)
            for y in np.arange(0.25, hgt, self._u(0.2, 0.5)):
                self.line_w((s * d, y, z0), (s * d, y, min(z1, z0 + 40)), joint)

    def _draw_fence(self, s: int, d: float, z0: float, z1: float, hgt: float, style: str,
                    colour: np.ndarray) -> None:
        """A fence: posts, rails and pickets/mesh/bars (see-through) or solid panels."""
        col = self.haze(colour * self.side_light[s], z0)
        x = s * d
        z1 = min(z1, z0 + 60)
        def verticals(step: float, y0: float, y1: float) -> Tuple[np.ndarray, np.ndarray]:
            zs = np.arange(z0, z1 + 1e-6, step)
            return (np.stack([np.full_like(zs, x), np.full_like(zs, y0), zs], 1),
                    np.stack([np.full_like(zs, x), np.full_like(zs, y1), zs], 1))

        if style == 'panel':
            self.fill_w([self.quad_x(x, 0.05, hgt, z0, z1)], FENCE, col)
            for z in np.arange(z0, min(z1, z0 + 25), self._u(0.12, 0.3)):
                self.line_w((x, 0.05, z), (x, hgt, z), col * 0.75)
        elif style == 'pickets':
            self.segs_w(*verticals(self._u(0.12, 0.22), 0.05, hgt), 0.05, FENCE, col, min_px=0.6)
        elif style == 'bars':
            self.segs_w(*verticals(self._u(0.12, 0.2), 0.05, hgt), 0.025, FENCE, col, min_px=0.6)
        else:
            step = self._u(0.18, 0.3)
            self.segs_w(*verticals(step, 0.05, hgt), 0.015, FENCE, col, min_px=0.5)
            ys = np.arange(0.05, hgt, step)
            self.segs_w(np.stack([np.full_like(ys, x), ys, np.full_like(ys, z0)], 1),
                        np.stack([np.full_like(ys, x), ys, np.full_like(ys, z1)], 1), 0.015, FENCE, col, min_px=0.5)
        for y in (0.15, hgt - 0.05):
            self.seg_w((x, y, z0), (x, y, z1), 0.06, FENCE, col)
        self.segs_w(*verticals(self._u(2.0, 3.0), 0.0, hgt + 0.05), 0.08, FENCE, col * 0.9)

    def _draw_hedge(self, s: int, d: float, z0: float, z1: float, hgt: float) -> None:
        """A hedge: a row of leafy boxes with an uneven top."""
        z1 = min(z1, z0 + 80)
        zs = np.linspace(z0, z1, max(int((z1 - z0) / 0.7), 2))
        hs = np.maximum(hgt + self.rng.uniform(-0.2, 0.2, zs.size), 0.4)
        xi, xo = s * d, s * (d + 0.8)
        top_in = np.stack([np.full_like(zs, xi), hs, zs], 1)
        top_out = np.stack([np.full_like(zs, xo), hs, zs], 1)
        # Face towards the road with an uneven top, the top surface (seen from above when low) and the end.
        side = np.concatenate([[[xi, 0.0, z0]], top_in, [[xi, 0.0, z1]]])
        polys = [side, self.quad_z(z0, min(xi, xo), max(xi, xo), 0.0, hs[0])]
        if hgt < self.ch:
            polys.insert(1, np.concatenate([top_in, top_out[::-1]]))
        self.fill_w(polys, VEGETATION, tex='vegetation')

    def _draw_guard_rail(self, s: int, d: float, z0: float, z1: float) -> None:
        """A guard rail along the road: void (ignore) in Cityscapes."""
        col = self.haze((170, 172, 176), z0)
        x = s * d
        self.fill_w([self.quad_x(x, 0.45, 0.75, z0, z1)], IGNORE_INDEX, col)
        for z in np.arange(z0, min(z1, 80), 4.0):
            self.seg_w((x, 0.0, z), (x, 0.75, z), 0.1, IGNORE_INDEX, col * 0.7)

    def _draw_treeline(self, s: int, d: float, z0: float, z1: float, hgt: float) -> None:
        """A forest edge along the street side: a vegetation band with a bumpy top."""
        zs = np.geomspace(max(z0, 1.0), max(z1, z0 + 1.0), 60)
        hs = np.clip(hgt + np.cumsum(self.rng.normal(0, 0.8, zs.size)), 2, 25)
        pts = [[s * d, 0.0, zs[0]]] + [[s * d, hh, z] for z, hh in zip(zs, hs)] + [[s * d, 0.0, zs[-1]]]
        self.fill_w([np.array(pts)], VEGETATION, tex='vegetation')

    def _draw_tree(self, x: float, z: float, trunk_h: float, crown_r: float) -> None:
        """A tree: trunk plus a crown of overlapping leafy discs (all vegetation)."""
        trunk_col = self.haze(self._jit((82, 70, 58), 12), z)
        self.seg_w((x, 0.0, z), (x, trunk_h + crown_r * 0.5, z), self._u(0.2, 0.4), VEGETATION, trunk_col)
        cy = trunk_h + crown_r
        discs = []
        for _ in range(int(self.rng.integers(5, 10))):
            ox, oy = self.rng.normal(0, crown_r * 0.35, 2)
            rr = crown_r * self._u(0.45, 0.75)
            centre = self.frontal((x, cy, z), np.array([[ox, oy]]))[0]
            discs.append(_circle(centre[0], centre[1], rr * self.f / z))
        self.fill(discs, VEGETATION, tex='vegetation')

    # ------------------------------------------------------------------------------------------
    # poles, lights, signs
    def _draw_pole(self, x: float, z: float, kind: str) -> None:
        """A pole with its attachment: street light arm, traffic sign(s), traffic light or catenary mast."""
        col = self.haze(self._pick(_METAL), z)
        s = 1.0 if x > 0 else -1.0
        y0 = self.curb_h
        if kind == 'light':
            hp = self._u(6, 9)
            self.seg_w((x, y0, z), (x, hp, z), self._u(0.14, 0.24), POLE, col)
            arm = self._u(1.0, 2.5)
            self.seg_w((x, hp - 0.3, z), (x - s * arm, hp, z), 0.09, POLE, col)
            head = self.frontal((x - s * arm, hp, z), np.array([[-0.3, 0.0], [0.3, 0.0], [0.25, -0.15],
                                                                [-0.25, -0.15]]))
            self.fill([head], POLE, col)
            if self._p(0.25):
                self._draw_sign(x, self._u(2.2, 3.0), z, back=self._p(0.2))
        elif kind == 'sign':
            hp = self._u(2.2, 3.4)
            self.seg_w((x, y0, z), (x, hp, z), self._u(0.06, 0.1), POLE, col)
            self._draw_sign(x, hp - 0.35, z, back=self._p(0.2))
            if self._p(0.35):
                self._draw_sign(x, hp - 1.05, z, back=False, small=True)
        elif kind == 'tlight':
            hp = self._u(3.0, 4.5)
            self.seg_w((x, y0, z), (x, hp, z), self._u(0.1, 0.18), POLE, col)
            back = self._p(0.25)
            self._draw_traffic_light(x, hp, z, back)
            if self._p(0.3):
                # Mast arm reaching over the road with a second head.
                arm = self._u(3, 6)
                self.seg_w((x, hp - 0.1, z), (x - s * arm, hp - 0.1, z), 0.12, POLE, col)
                self._draw_traffic_light(x - s * arm, hp - 0.2, z, back)
            if self._p(0.4):
                # Pedestrian signal at eye height.
                self._draw_traffic_light(x, 2.4, z, back, small=True)
            if self._p(0.3):
                self._draw_sign(x, hp + 0.45, z, back=back, small=True)
        else:  # catenary mast between road and railway, its arm reaching out over the track
            hp = self._u(6, 8)
            self.seg_w((x, 0.0, z), (x, hp, z), 0.25, POLE, col)
            self.seg_w((x, hp - 0.5, z), (x + s * 3.2, hp - 0.5, z), 0.1, POLE, col)

    def _draw_traffic_light(self, x: float, y_top: float, z: float, back: bool, small: bool = False) -> None:
        """A signal head facing the camera (lamps lit) or away (dark housing only)."""
        w, h = (0.26, 0.62) if small else (0.34, 0.95)
        housing = self._pick(((30, 30, 32), (30, 30, 32), (190, 160, 40), (60, 70, 60)))
        housing = self.haze(self._jit(housing, 6), z)
        pts = np.array([[-w / 2, 0], [w / 2, 0], [w / 2, -h], [-w / 2, -h]])
        self.fill([self.frontal((x, y_top, z), pts)], LIGHT, housing)
        if back:
            return
        n = 2 if small else 3
        lit = int(self.rng.integers(n))
        on = [(245, 50, 40), (250, 190, 40), (70, 235, 130)] if n == 3 else [(245, 50, 40), (70, 235, 130)]
        r = w * 0.33
        for i in range(n):
            cy = -h * (i + 0.5) / n
            c = self.frontal((x, y_top, z), np.array([[0.0, cy]]))[0]
            col = on[i] if i == lit else (55, 45, 45)
            # Lamps glow, so they fade less with distance than surfaces do.
            self.fill([_circle(c[0], c[1], r * self.f / z)], LIGHT, self.haze(col, z * 0.5))

    def _draw_sign(self, x: float, yc: float, z: float, back: bool, small: bool = False) -> None:
        """A traffic sign board facing the camera; seen from the back it is a plain grey shape."""
        kind = self._choice(['prohibit', 'mandatory', 'warning', 'yield', 'stop', 'info', 'direction'],
                            [0.22, 0.15, 0.18, 0.08, 0.05, 0.2, 0.12])
        r = self._u(0.28, 0.4) * (0.75 if small else 1.0)
        anchor = (x, yc, z)
        red, white, blue = (200, 30, 35), (235, 235, 232), (30, 80, 170)

        def shape(kind: str, scale: float) -> np.ndarray:
            if kind in ('prohibit', 'mandatory'):
                t = np.linspace(0, 2 * np.pi, 24, endpoint=False)
                return np.stack([np.cos(t), np.sin(t)], 1) * r * scale
            if kind == 'warning':
                return np.array([[0, 1.0], [0.95, -0.65], [-0.95, -0.65]]) * r * 1.15 * scale
            if kind == 'yield':
                return np.array([[0, -1.0], [0.95, 0.65], [-0.95, 0.65]]) * r * 1.15 * scale
            if kind == 'stop':
                t = np.linspace(0, 2 * np.pi, 8, endpoint=False) + np.pi / 8
                return np.stack([np.cos(t), np.sin(t)], 1) * r * scale
            if kind == 'info':
                return np.array([[-0.8, -1.0], [0.8, -1.0], [0.8, 1.0], [-0.8, 1.0]]) * r * scale
            return np.array([[-2.2, -0.6], [2.2, -0.6], [2.2, 0.6], [-2.2, 0.6]]) * r * scale

        outer = self.frontal(anchor, shape(kind, 1.0))
        if back:
            self.fill([outer], SIGN, self.haze(self._jit((140, 142, 146), 10), z))
            return
        if kind in ('prohibit', 'warning', 'yield'):
            self.fill([outer], SIGN, self.haze(red, z))
            self.fill([self.frontal(anchor, shape(kind, 0.72))], SIGN, self.haze(white, z))
        elif kind == 'mandatory':
            self.fill([outer], SIGN, self.haze(blue, z))
            arrow = np.array([[-0.1, -0.6], [0.1, -0.6], [0.1, 0.2], [0.3, 0.2], [0, 0.6], [-0.3, 0.2],
                              [-0.1, 0.2]]) * r
            self.fill([self.frontal(anchor, arrow)], SIGN, self.haze(white, z))
        elif kind == 'stop':
            self.fill([outer], SIGN, self.haze(red, z))
            bar = np.array([[-0.6, -0.12], [0.6, -0.12], [0.6, 0.12], [-0.6, 0.12]]) * r
            self.fill([self.frontal(anchor, bar)], SIGN, self.haze(white, z))
        elif kind == 'info':
            col = self._pick((blue, white, (240, 200, 30)))
            self.fill([outer], SIGN, self.haze(col, z))
            self.fill([self.frontal(anchor, shape(kind, 0.6))], SIGN,
                      self.haze(white if col is blue else (40, 40, 40), z))
        else:
            col = self._pick(((240, 200, 30), (30, 110, 60), (235, 235, 232)))
            self.fill([outer], SIGN, self.haze(col, z))
            band = np.array([[-1.8, -0.15], [1.4, -0.15], [1.4, 0.15], [-1.8, 0.15]]) * r
            self.fill([self.frontal(anchor, band)], SIGN, self.haze((40, 40, 40), z))

    # ------------------------------------------------------------------------------------------
    # people and two-wheelers
    def _draw_body(self, anchor: Sequence[float], kp: Dict[str, Tuple[float, float]], scale: float, label: int,
                   colours: Dict[str, np.ndarray], torso_w: Tuple[float, float], helmet: bool = False) -> None:
        """Draws a stick-and-slab human figure from keypoints (metres in the camera-facing plane).

        Args:
            anchor: World point the keypoints are relative to (the feet or the vehicle's ground point).
            kp: Keypoints ``hip_l, hip_r, knee_l, knee_r, foot_l, foot_r, hip, neck, sh_l, sh_r, hand_l,
                hand_r, head`` as ``(x, y)`` in metres.
            scale: Multiplies all keypoints (body size).
            label: ``PERSON`` or ``RIDER``.
            colours: ``top``, ``bottom``, ``skin``, ``hair`` colours.
            torso_w: Torso width at hip and shoulder in metres (before scaling).
            helmet: Draw a round helmet instead of hair.
        """
        z = anchor[2]
        s = self.f / max(z, _Z_NEAR)

        def P(name: str) -> np.ndarray:
            return self.frontal(anchor, np.array([kp[name]]) * scale)[0]

        leg_w = max(0.12 * scale * s, 1.0)
        arm_w = max(0.075 * scale * s, 1.0)
        polys_bottom = []
        for side in ('l', 'r'):
            polys_bottom.append(_seg_px(P('hip_' + side), P('knee_' + side), leg_w, leg_w * 0.9))
            polys_bottom.append(_seg_px(P('knee_' + side), P('foot_' + side), leg_w * 0.9, leg_w * 0.8))
        self.fill(polys_bottom, label, colours['bottom'])
        shoes = [_circle(*P('foot_' + side), max(0.05 * scale * s, 0.6), 8) for side in ('l', 'r')]
        self.fill(shoes, label, (30, 28, 28))
        hip, neck = P('hip'), P('neck')
        d = neck - hip
        n = float(np.hypot(*d)) or 1.0
        perp = np.array([-d[1], d[0]]) / n
        hw = max(torso_w[0] * scale * s, 1.0) / 2
        sw = max(torso_w[1] * scale * s, 1.0) / 2
        torso = np.stack([hip + perp * hw, neck + perp * sw, neck - perp * sw, hip - perp * hw])
        self.fill([torso], label, colours['top'])
        arms = [_seg_px(P('sh_' + side), P('hand_' + side), arm_w, arm_w * 0.85) for side in ('l', 'r')]
        self.fill(arms, label, colours['top'] * 0.9)
        head = P('head')
        hr = max(0.11 * scale * s, 0.8)
        if helmet:
            self.fill([_circle(head[0], head[1], hr * 1.2)], label, colours['helmet'])
        else:
            self.fill([_circle(head[0], head[1] - hr * 0.1, hr)], label, colours['hair'])
            self.fill([_circle(head[0], head[1] + hr * 0.12, hr * 0.86)], label, colours['skin'])

    def _person_colours(self, z: float) -> Dict[str, np.ndarray]:
        return {
            'top': self.haze(self._jit(self._pick(_TOP_CLOTHES), 12), z),
            'bottom': self.haze(self._jit(self._pick(_BOTTOM_CLOTHES), 10), z),
            'skin': self.haze(self._jit(self._pick(_SKIN), 8), z),
            'hair': self.haze(self._jit(self._pick(_HAIR), 8), z),
            'helmet': self.haze(self._jit(self._pick(((30, 30, 30), (220, 220, 220), (200, 40, 40),
                                                      (40, 80, 170), (230, 200, 40))), 8), z),
        }

    def _draw_person(self, x: float, y: float, z: float, facing: Optional[str] = None) -> None:
        """A pedestrian standing or walking, seen from the front, back or side."""
        if facing is None:
            facing = self._choice(['side', 'front', 'back'], [0.5, 0.25, 0.25])
        h = self._u(1.55, 1.95) if self._p(0.9) else self._u(1.0, 1.35)
        sc = h / 1.75
        cols = self._person_colours(z)
        if facing == 'side':
            dr = self._pick([-1.0, 1.0])
            st = self._u(0.0, 0.3)
            kp = {'hip_l': (0, 0.92), 'hip_r': (0, 0.92), 'knee_l': (dr * st * 0.5, 0.5),
                  'knee_r': (-dr * st * 0.5, 0.5), 'foot_l': (dr * st, 0.05), 'foot_r': (-dr * st, 0.05),
                  'hip': (0, 0.9), 'neck': (0.02 * dr, 1.45), 'sh_l': (0.0, 1.4), 'sh_r': (0.0, 1.4),
                  'hand_l': (-dr * st * 0.7, 0.92), 'hand_r': (dr * st * 0.5, 0.92), 'head': (0.03 * dr, 1.63)}
            tw = (0.22, 0.25)
        else:
            sp = self._u(0.0, 0.08)
            kp = {'hip_l': (-0.1, 0.92), 'hip_r': (0.1, 0.92), 'knee_l': (-0.11, 0.5), 'knee_r': (0.11, 0.5),
                  'foot_l': (-0.12 - sp, 0.05), 'foot_r': (0.12 + sp, 0.05), 'hip': (0, 0.9), 'neck': (0, 1.45),
                  'sh_l': (-0.22, 1.4), 'sh_r': (0.22, 1.4), 'hand_l': (-0.27, 0.9), 'hand_r': (0.27, 0.9),
                  'head': (0, 1.63)}
            tw = (0.36, 0.46)
        if facing == 'back':
            cols['skin'] = cols['hair']
        self._draw_body((x, y, z), kp, sc, PERSON, cols, tw)
        if self._p(0.2):
            # Bag or backpack (part of the person in Cityscapes).
            bag = np.array([[0.12, 0.95], [0.32, 0.95], [0.32, 1.25], [0.12, 1.25]]) * sc
            if facing == 'back':
                bag = np.array([[-0.18, 1.0], [0.18, 1.0], [0.18, 1.38], [-0.18, 1.38]]) * sc
            self.fill([self.frontal((x, y, z), bag)], PERSON, self.haze(self._jit(self._pick(_TOP_CLOTHES), 10), z))

    def _draw_two_wheeler(self, x: float, y: float, z: float, kind: str, view: str, direction: int,
                          rider: bool) -> None:
        """A bicycle or motorcycle (side or rear view), optionally with a rider (rider label)."""
        label = BICYCLE if kind == 'bicycle' else MOTORCYCLE
        anchor = (x, y, z)
        s = self.f / max(z, _Z_NEAR)
        dr = float(direction)
        frame = self.haze(self._jit(self._pick(_CAR_COLOURS if kind == 'motorcycle' else _TOP_CLOTHES), 12), z)
        tyre = self.haze((24, 24, 26), z)

        def P(pt: Tuple[float, float]) -> np.ndarray:
            return self.frontal(anchor, np.array([pt]))[0]

        def tube(a: Tuple[float, float], b: Tuple[float, float], w: float, col: Sequence[float]) -> None:
            self.fill([_seg_px(P(a), P(b), max(w * s, 1.0))], label, col)

        def wheel(c: Tuple[float, float], r: float, t: float) -> None:
            cc = P(c)
            ro = r * s
            ri = max(ro - max(t * s, 1.0), 0.0)
            polys = [_circle(cc[0], cc[1], ro)]
            if ri > 0.5:
                polys.append(_circle(cc[0], cc[1], ri))
            self.fill(polys, label, tyre, evenodd=True)

        if view == 'side':
            if kind == 'bicycle':
                rh, fh = (-0.53 * dr, 0.35), (0.53 * dr, 0.35)
                wheel(rh, 0.35, 0.05)
                wheel(fh, 0.35, 0.05)
                crank, st_top = (0.0, 0.32), (-0.17 * dr, 0.88)
                head_t, head_b = (0.43 * dr, 0.98), (0.47 * dr, 0.78)
                for a, b in ((rh, crank), (rh, st_top), (crank, st_top), (st_top, head_t), (crank, head_b),
                             (head_t, head_b), (head_b, fh), (head_t, (0.40 * dr, 1.05))):
                    tube(a, b, 0.04, frame)
                tube((-0.3 * dr, 0.95), (-0.1 * dr, 0.95), 0.06, (30, 30, 30))
                kp = {'hip': (-0.2 * dr, 1.0), 'neck': (0.15 * dr, 1.5), 'sh_l': (0.15 * dr, 1.47),
                      'sh_r': (0.15 * dr, 1.47), 'hand_l': (0.40 * dr, 1.05), 'hand_r': (0.40 * dr, 1.05),
                      'head': (0.26 * dr, 1.66), 'hip_l': (-0.2 * dr, 1.0), 'hip_r': (-0.2 * dr, 1.0),
                      'knee_l': (0.08 * dr, 0.74), 'knee_r': (-0.02 * dr, 0.8), 'foot_l': (0.08 * dr, 0.2),
                      'foot_r': (-0.1 * dr, 0.42)}
            else:
                rh, fh = (-0.7 * dr, 0.32), (0.72 * dr, 0.32)
                wheel(rh, 0.32, 0.11)
                wheel(fh, 0.32, 0.11)
                body = np.array([[-0.85, 0.55], [-0.6, 0.8], [-0.1, 0.85], [0.3, 0.95], [0.5, 0.9], [0.45, 0.55],
                                 [0.1, 0.35], [-0.4, 0.4]]) * [dr, 1]
                self.fill([self.frontal(anchor, body)], label, frame)
                engine = np.array([[-0.2, 0.25], [0.3, 0.25], [0.35, 0.6], [-0.15, 0.65]]) * [dr, 1]
                self.fill([self.frontal(anchor, engine)], label, (50, 50, 52))
                tube((0.5 * dr, 0.95), fh, 0.06, (90, 90, 92))
                tube((-0.3 * dr, 0.3), (-0.8 * dr, 0.45), 0.07, (150, 150, 152))
                tube((0.45 * dr, 1.0), (0.55 * dr, 1.12), 0.04, (40, 40, 40))
                kp = {'hip': (-0.25 * dr, 0.92), 'neck': (0.05 * dr, 1.45), 'sh_l': (0.05 * dr, 1.42),
                      'sh_r': (0.05 * dr, 1.42), 'hand_l': (0.48 * dr, 1.05), 'hand_r': (0.48 * dr, 1.05),
                      'head': (0.15 * dr, 1.62), 'hip_l': (-0.25 * dr, 0.92), 'hip_r': (-0.25 * dr, 0.92),
                      'knee_l': (0.2 * dr, 0.75), 'knee_r': (0.15 * dr, 0.8), 'foot_l': (0.0, 0.4),
                      'foot_r': (-0.05 * dr, 0.45)}
            tw = (0.21, 0.24)
        else:
            if kind == 'bicycle':
                tube((0.0, 0.0), (0.0, 0.7), 0.045, tyre)
                tube((0.0, 0.6), (0.0, 0.95), 0.04, frame)
                tube((-0.08, 0.95), (0.08, 0.95), 0.06, (30, 30, 30))
                tube((-0.28, 1.05), (0.28, 1.05), 0.035, (40, 40, 40))
                kp = {'hip': (0, 1.0), 'neck': (0, 1.45), 'sh_l': (-0.2, 1.42), 'sh_r': (0.2, 1.42),
                      'hand_l': (-0.27, 1.05), 'hand_r': (0.27, 1.05), 'head': (0, 1.6), 'hip_l': (-0.1, 1.0),
                      'hip_r': (0.1, 1.0), 'knee_l': (-0.17, 0.7), 'knee_r': (0.16, 0.62),
                      'foot_l': (-0.11, 0.32), 'foot_r': (0.1, 0.2)}
            else:
                tube((0.0, 0.0), (0.0, 0.62), 0.14, tyre)
                body = np.array([[-0.22, 0.5], [0.22, 0.5], [0.25, 0.95], [-0.25, 0.95]])
                self.fill([self.frontal(anchor, body)], label, frame)
                tail = np.array([[-0.08, 0.78], [0.08, 0.78], [0.08, 0.86], [-0.08, 0.86]])
                self.fill([self.frontal(anchor, tail)], label, self.haze((200, 30, 30), z * 0.5))
                tube((-0.4, 1.1), (0.4, 1.1), 0.04, (40, 40, 40))
                kp = {'hip': (0, 0.95), 'neck': (0, 1.45), 'sh_l': (-0.22, 1.42), 'sh_r': (0.22, 1.42),
                      'hand_l': (-0.38, 1.1), 'hand_r': (0.38, 1.1), 'head': (0, 1.62), 'hip_l': (-0.12, 0.95),
                      'hip_r': (0.12, 0.95), 'knee_l': (-0.3, 0.7), 'knee_r': (0.3, 0.7), 'foot_l': (-0.2, 0.45),
                      'foot_r': (0.2, 0.45)}
            tw = (0.34, 0.44)
        if rider:
            cols = self._person_colours(z)
            helmet = kind == 'motorcycle' or self._p(0.3)
            self._draw_body(anchor, kp, self._u(0.92, 1.08), RIDER, cols, tw, helmet=helmet)

    # ------------------------------------------------------------------------------------------
    # vehicles
    def _wheel_w(self, x: float, zc: float, r: float, label: int) -> None:
        """A wheel on a vehicle's side face (a circle in the plane X = x)."""
        t = np.linspace(0, 2 * np.pi, 20, endpoint=False)
        pts = np.stack([np.full_like(t, x), r + r * np.sin(t), zc + r * np.cos(t)], 1)
        self.fill_w([pts], label, _DARK)
        rim = np.stack([np.full_like(t, x), r + 0.55 * r * np.sin(t), zc + 0.55 * r * np.cos(t)], 1)
        self.fill_w([rim], None, (110, 110, 112))

    def _draw_vehicle(self, kind: str, xc: float, z0: float, facing: str) -> None:
        """A car, van, truck or bus seen from behind (``facing='rear'``) or from the front."""
        if kind in ('car', 'van'):
            self._draw_car(xc, z0, facing, van=kind == 'van')
        elif kind == 'truck':
            self._draw_truck(xc, z0, facing)
        else:
            self._draw_bus(xc, z0, facing)

    def _shadow_under(self, x0: float, x1: float, z0: float, z1: float) -> None:
        self.darken([self.quad_y(0.0, x0 - 0.15, x1 + 0.15, max(z0 - 0.3, 0.6), z1 + 0.3)], self._u(0.3, 0.5))

    def _side_x(self, x0: float, x1: float) -> Optional[float]:
        """X of the visible side face of a box, or None when it straddles the camera axis."""
        return x1 if x1 < 0 else (x0 if x0 > 0 else None)

    def _draw_car(self, xc: float, z0: float, facing: str, van: bool = False) -> None:
        """A car: dark underbody and wheels, body box, glass cabin, lights and plate."""
        w, length, h = self._u(1.7, 1.9), self._u(3.9, 4.8), self._u(1.4, 1.55)
        if van:
            w, length, h = self._u(1.9, 2.0), self._u(4.8, 5.5), self._u(1.9, 2.2)
        x0, x1, z1 = xc - w / 2, xc + w / 2, z0 + length
        col = self.haze(self._jit(self._pick(_CAR_COLOURS), 10), z0)
        glass = self.haze(self._jit(self._pick(_GLASS), 8), z0)
        belt = h * (0.55 if van else 0.62)
        self._shadow_under(x0, x1, z0, z1)
        self.box(x0 + 0.08, x1 - 0.08, 0.0, 0.45, z0 + 0.25, z1 - 0.25, CAR, _DARK)
        if belt < self.ch:
            self.fill_w([self.quad_y(belt, x0, x1, z0, z1)], CAR, np.clip(col * 0.8 + self.haze_col * 0.25, 0, 255))
        xs = self._side_x(x0, x1)
        if xs is not None:
            self.fill_w([self.quad_x(xs, 0.3, belt, z0, z1)], CAR, col * 0.85)
            for zc in (z0 + 0.85, z1 - 0.85):
                self._wheel_w(xs, zc, 0.32, CAR)
        # Cabin: the window facing the camera is the rear window or the (further inset) windscreen.
        near_in, far_in = (self._u(0.5, 0.9), self._u(1.2, 1.6)) if facing == 'rear' else \
            (self._u(1.2, 1.6), self._u(0.5, 0.9))
        if van:
            near_in, far_in = (0.1, 1.0) if facing == 'rear' else (0.8, 0.2)
        c0, c1 = z0 + near_in, z1 - far_in
        cx0, cx1 = x0 + 0.1, x1 - 0.1
        faces = self.box(cx0, cx1, belt, h, c0, c1, CAR, glass, side_shade=1.0, top_shade=1.0)
        if 'top' in faces:
            self.fill_w([faces['top']], CAR, col)
        if 'side' in faces:
            # B-pillar in body colour.
            zm = (c0 + c1) / 2
            self.fill_w([self.quad_x(faces['side'][0, 0], belt, h, zm - 0.08, zm + 0.08)], CAR, col * 0.85)
            self.fill_w([self.quad_x(faces['side'][0, 0], h - 0.06, h, c0, c1)], CAR, col * 0.85)
        self.fill_w([self.quad_z(c0, cx0, cx1, h - 0.06, h)], CAR, col)
        # Body face towards the camera, with lamps, plate and bumper.
        self.fill_w([self.quad_z(z0, x0, x1, 0.3, belt)], CAR, col)
        self.fill_w([self.quad_z(z0, x0, x1, 0.3, 0.45)], CAR, col * 0.55)
        lamp = (185, 25, 25) if facing == 'rear' else (235, 235, 220)
        ly0, ly1 = belt - 0.22, belt - 0.06
        self.fill_w([self.quad_z(z0, x0 + 0.05, x0 + 0.35, ly0, ly1), self.quad_z(z0, x1 - 0.35, x1 - 0.05, ly0, ly1)],
                    CAR, self.haze(lamp, z0 * 0.5))
        self.fill_w([self.quad_z(z0, xc - 0.26, xc + 0.26, 0.45, 0.57)], CAR, self.haze((225, 225, 215), z0))
        if facing == 'front':
            self.fill_w([self.quad_z(z0, xc - 0.35, xc + 0.35, 0.6, belt - 0.08)], CAR, col * 0.4)

    def _draw_truck(self, xc: float, z0: float, facing: str) -> None:
        """A truck: cab plus a tall cargo box; seen from behind mostly the box door is visible."""
        w = 2.45
        lb, hb = self._u(5, 9), self._u(3.2, 3.8)
        x0, x1 = xc - w / 2, xc + w / 2
        box_col = self.haze(self._jit(self._pick(_BIG_VEHICLE_COLOURS), 10), z0)
        cab_col = self.haze(self._jit(self._pick(_BIG_VEHICLE_COLOURS), 10), z0)
        glass = self.haze(self._jit(self._pick(_GLASS), 8), z0)
        if facing == 'rear':
            box_z, cab_z = (z0, z0 + lb), (z0 + lb + 0.3, z0 + lb + 2.5)
        else:
            cab_z, box_z = (z0, z0 + 2.2), (z0 + 2.5, z0 + 2.5 + lb)
        self._shadow_under(x0, x1, z0, z0 + lb + 2.5)
        parts = sorted([('cab', cab_z), ('box', box_z)], key=lambda p: -p[1][0])
        for name, (a, b) in parts:
            self.box(x0 + 0.1, x1 - 0.1, 0.0, 1.0, a + 0.2, b - 0.2, TRUCK, _DARK)
            xs = self._side_x(x0, x1)
            if name == 'cab':
                self.box(x0, x1, 0.5, 2.9, a, b, TRUCK, cab_col)
                if xs is not None:
                    self.fill_w([self.quad_x(xs, 1.8, 2.6, a + 0.2, b - 0.6)], TRUCK, glass)
                if facing == 'front':
                    self.fill_w([self.quad_z(a, x0 + 0.15, x1 - 0.15, 1.7, 2.7)], TRUCK, glass)
                    self.fill_w([self.quad_z(a, x0 + 0.4, x1 - 0.4, 0.7, 1.3)], TRUCK, cab_col * 0.45)
            else:
                self.box(x0, x1, 1.0, hb, a, b, TRUCK, box_col)
                if facing == 'rear':
                    self.line_w((xc, 1.05, a), (xc, hb - 0.05, a), box_col * 0.6)
                    for xl in (x0 + 0.1, x1 - 0.3):
                        self.fill_w([self.quad_z(a, xl, xl + 0.2, 1.05, 1.25)], TRUCK, self.haze((190, 25, 25), a))
                if xs is not None and self._p(0.4):
                    # Company stripe along the box side.
                    self.fill_w([self.quad_x(xs, 1.8, 2.4, a + 0.3, b - 0.3)], TRUCK,
                                self.haze(self._pick(_BIG_VEHICLE_COLOURS), a))
            if xs is not None:
                for zc in (a + 0.8, b - 0.8):
                    self._wheel_w(xs, zc, 0.5, TRUCK)

    def _draw_bus(self, xc: float, z0: float, facing: str) -> None:
        """A city bus: one long box with a continuous window band and pillars."""
        w, length, h = 2.55, (12.0 if self._p(0.8) else 18.0), self._u(3.0, 3.2)
        x0, x1, z1 = xc - w / 2, xc + w / 2, z0 + length
        col = self.haze(self._jit(self._pick(_BIG_VEHICLE_COLOURS), 8), z0)
        glass = self.haze(self._jit(self._pick(_GLASS), 8), z0)
        self._shadow_under(x0, x1, z0, z1)
        self.box(x0 + 0.1, x1 - 0.1, 0.0, 0.4, z0 + 0.2, z1 - 0.2, BUS, _DARK)
        self.box(x0, x1, 0.3, h, z0, z1, BUS, col)
        xs = self._side_x(x0, x1)
        if xs is not None:
            self.fill_w([self.quad_x(xs, 1.15, 2.65, z0 + 0.5, z1 - 0.4)], BUS, glass)
            step = self._u(1.3, 2.0)
            for z in np.arange(z0 + 0.5, z1 - 0.4, step):
                self.fill_w([self.quad_x(xs, 1.15, 2.65, z, z + 0.14)], BUS, col * 0.85)
            if self._p(0.5):
                self.fill_w([self.quad_x(xs, 0.7, 0.95, z0, z1)], BUS, self.haze(self._pick(_BIG_VEHICLE_COLOURS), z0))
            for zc in (z0 + 2.5, z1 - 3.0):
                self._wheel_w(xs, zc, 0.5, BUS)
        if facing == 'front':
            self.fill_w([self.quad_z(z0, x0 + 0.1, x1 - 0.1, 0.95, 2.7)], BUS, glass)
            self.fill_w([self.quad_z(z0, x0 + 0.2, x1 - 0.2, 2.75, 3.0)], BUS, (25, 25, 25))
            self.fill_w([self.quad_z(z0, x0 + 0.5, x1 - 0.9, 2.82, 2.92)], BUS, self.haze((250, 160, 40), z0 * 0.5))
        else:
            self.fill_w([self.quad_z(z0, x0 + 0.15, x1 - 0.15, 2.0, 2.75)], BUS, glass)
            for xl in (x0 + 0.1, x1 - 0.3):
                self.fill_w([self.quad_z(z0, xl, xl + 0.2, 0.8, 1.3)], BUS, self.haze((190, 25, 25), z0))

    def _draw_rail_vehicle(self, x0: float, x1: float, y0: float, h: float, z0: float, length: float,
                           facing: str, pantograph: bool) -> None:
        """Shared body of trams and trains (train label): long box, window band, articulations."""
        z1 = z0 + length
        col = self.haze(self._jit(self._pick(_BIG_VEHICLE_COLOURS), 8), z0)
        glass = self.haze(self._jit(self._pick(_GLASS), 8), z0)
        self.box(x0 + 0.1, x1 - 0.1, y0 - 0.4, y0, z0 + 0.3, z1 - 0.3, TRAIN, _DARK)
        self.box(x0, x1, y0, y0 + h, z0, z1, TRAIN, col)
        xs = self._side_x(x0, x1)
        wy0, wy1 = y0 + 0.7 + 0.1 * h, y0 + 0.72 * h
        if xs is not None:
            self.fill_w([self.quad_x(xs, wy0, wy1, z0 + 1.0, z1 - 0.5)], TRAIN, glass)
            step = self._u(1.8, 2.6)
            for z in np.arange(z0 + 1.0, z1 - 0.5, step):
                self.fill_w([self.quad_x(xs, wy0, wy1, z, z + 0.25)], TRAIN, col * 0.9)
            seg = self._u(8, 25)
            for z in np.arange(z0 + seg, z1 - 1, seg):
                self.fill_w([self.quad_x(xs, y0, y0 + h, z, z + 0.35)], TRAIN, col * 0.45)
            if self._p(0.6):
                stripe = self.haze(self._pick(((200, 30, 30), (30, 60, 140), (240, 200, 40))), z0)
                self.fill_w([self.quad_x(xs, y0 + 0.35, y0 + 0.55, z0, z1)], TRAIN, stripe)
        self.fill_w([self.quad_z(z0, x0 + 0.15, x1 - 0.15, wy0, wy1 + 0.1)], TRAIN, glass)
        if facing == 'front':
            for xl in (x0 + 0.2, x1 - 0.4):
                self.fill_w([self.quad_z(z0, xl, xl + 0.2, y0 + 0.4, y0 + 0.6)], TRAIN, self.haze((240, 240, 220), z0))
        if pantograph:
            xm = (x0 + x1) / 2
            zp = z0 + length * 0.3
            top = y0 + h
            self.seg_w((xm, top, zp), (xm, top + 1.0, zp + 0.8), 0.05, TRAIN, (60, 60, 60))
            self.seg_w((xm, top + 1.0, zp + 0.8), (xm, top + 1.2, zp), 0.05, TRAIN, (60, 60, 60))

    def _draw_tram(self, xc: float, z0: float, length: float, facing: str) -> None:
        """A tram in the street (Cityscapes labels trams as train)."""
        w = self._u(2.3, 2.65)
        self._shadow_under(xc - w / 2, xc + w / 2, z0, z0 + length)
        self._draw_rail_vehicle(xc - w / 2, xc + w / 2, 0.4, self._u(2.9, 3.1), z0, length, facing, True)

    def _draw_train_far(self, s: int, d: float, z0: float, length: float) -> None:
        """A train on a railway beside the road, seen from the side at a distance."""
        w = 3.0
        x0, x1 = sorted((s * (d - w / 2), s * (d + w / 2)))
        self._draw_rail_vehicle(x0, x1, 0.9, self._u(3.0, 3.4), z0, length, 'front', self._p(0.5))

    # ------------------------------------------------------------------------------------------
    # void objects and ego vehicle
    def _draw_clutter(self, x: float, y: float, z: float) -> None:
        """Street furniture that Cityscapes labels as void: bins, advertising columns, benches."""
        kind = self._choice(['bin', 'column', 'bench', 'box'], [0.45, 0.15, 0.2, 0.2])
        col = self.haze(self._jit(self._pick(((40, 80, 50), (90, 90, 95), (40, 60, 120), (220, 120, 30),
                                                (150, 150, 150))), 10), z)
        if kind == 'bin':
            self.box(x - 0.3, x + 0.3, y, y + 1.05, z, z + 0.6, IGNORE_INDEX, col)
        elif kind == 'box':
            self.box(x - 0.4, x + 0.4, y, y + 1.3, z, z + 0.5, IGNORE_INDEX, col)
        elif kind == 'bench':
            self.box(x - 0.25, x + 0.25, y + 0.4, y + 0.5, z, z + 1.8, IGNORE_INDEX, (110, 80, 55))
            self.box(x - 0.25, x + 0.25, y, y + 0.4, z + 0.1, z + 0.2, IGNORE_INDEX, (60, 60, 60))
        else:
            self.box(x - 0.6, x + 0.6, y, y + 3.0, z, z + 1.2, IGNORE_INDEX, (120, 120, 120))
            for k in range(3):
                yy = y + 0.5 + k * 0.8
                self.fill_w([self.quad_z(z, x - 0.55, x + 0.55, yy, yy + 0.7)], IGNORE_INDEX,
                            self.haze(self._jit(self._pick(_TOP_CLOTHES), 30), z))

    def _draw_ego_vehicle(self) -> None:
        """The camera car's bonnet across the bottom rows, labelled ignore as in Cityscapes."""
        hc = self.h * self._u(0.05, 0.12)
        hs = hc * self._u(0.2, 0.6)
        xs = np.linspace(-1, self.w + 1, 48)
        t = (xs - self.w / 2) / (self.w / 2)
        ys = self.h - (hc - (hc - hs) * t**2)
        poly = np.concatenate([[[-1, self.h + 1]], np.stack([xs, ys], 1), [[self.w + 1, self.h + 1]]])
        col = self._jit(self._pick(((30, 30, 32), (50, 50, 55), (150, 152, 156), (20, 24, 40))), 8)
        self.fill([poly], IGNORE_INDEX, col)
        # A band reflecting the scene right below the bonnet's edge.
        band = np.concatenate([np.stack([xs, ys], 1), np.stack([xs, ys + hc * 0.25], 1)[::-1]])
        self.fill([band], None, np.clip(col * 0.7 + self.haze_col * 0.3, 0, 255))

    # ------------------------------------------------------------------------------------------
    # camera model
    def _finish(self) -> np.ndarray:
        """Applies lighting, colour cast, blur and sensor noise; returns the uint8 RGB image."""
        img = self.img
        lum = 1 + 0.05 * self._smooth_noise(80)
        if self._p(0.4):
            # Vignetting (separable approximation of a radial fall-off).
            k = self._u(0.05, 0.25)
            vy = 1 - k / 2 * np.linspace(-1, 1, self.h, dtype=np.float32)**2
            vx = 1 - k / 2 * np.linspace(-1, 1, self.w, dtype=np.float32)**2
            lum = lum * vy[:, None] * vx[None, :]
        img *= lum[..., None]
        # Exposure, contrast, colour cast and gamma form a per-channel tone curve, applied as a lookup
        # table on the final 8-bit image (the sensor noise below then passes through it as well).
        mean = float(img.mean())
        contrast, gain, gamma = self._u(0.8, 1.15), self._u(0.7, 1.2), self._u(0.85, 1.2)
        cast = 1 + self.rng.normal(0, 0.05, 3)
        v = np.arange(256, dtype=np.float64)[:, None]
        curve = ((v - mean) * contrast + mean) * gain * cast[None, :]
        lut = np.rint(255.0 * np.clip(curve / 255.0, 0, 1)**gamma).astype(np.uint8)
        r = self.rng.random()
        if r < 0.15:
            img = cv2.GaussianBlur(img, (0, 0), self._u(1.0, 2.0) * max(self.px, 0.3))
        elif r < 0.25:
            k = int(max(self._u(3, 9) * self.px, 2)) | 1
            kernel = np.zeros((k, k), np.float32)
            kernel[k // 2, :] = 1.0 / k
            img = cv2.filter2D(img, -1, kernel, borderType=cv2.BORDER_REFLECT)
        else:
            img = cv2.GaussianBlur(img, (0, 0), self._u(0.35, 0.7) * max(self.px, 0.5))
        img += self.rng.standard_normal(img.shape, dtype=np.float32) * np.float32(self._u(1.5, 6.5))
        out = np.clip(np.rint(img), 0, 255).astype(np.uint8)
        return cv2.LUT(out, lut.reshape(256, 1, 3))


def render_toy_city_sample(seed: int, split: str, index: int, height: int = 256,
                           width: int = 512) -> Tuple[np.ndarray, np.ndarray]:
    """Renders one toy-city image and its label map in memory.

    Args:
        seed: Dataset seed (non-negative).
        split: ``'train'`` or ``'val'``.
        index: Image index within the split (non-negative).
        height: Image height in pixels (>= ``MIN_IMAGE_SIZE``).
        width: Image width in pixels (>= ``MIN_IMAGE_SIZE``).

    Returns:
        ``(image, label)``: ``(height, width, 3)`` uint8 RGB image and ``(height, width)`` uint8 label map
        of train ids 0..18 and ``IGNORE_INDEX``.
    """
    _validate_image_size(height, width)
    rng = toy_city_sample_rng(seed, split, index)
    return _Scene(rng, height, width).render()


def read_toy_city_meta(out_dir: str) -> Optional[Dict[str, Any]]:
    """Reads ``toy_city_meta.json`` from a dataset root.

    Args:
        out_dir: Dataset root.

    Returns:
        The parsed metadata, or None when the file is missing or unreadable.
    """
    path = osp.join(out_dir, META_FILE)
    if not osp.isfile(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _make_progress(total: int, enabled: bool) -> Callable[[], None]:
    """Returns an ``update()`` callable for a progress bar (mmengine's, else tqdm's, else none)."""
    if not enabled or total <= 0:
        return lambda: None
    try:
        from mmengine.utils import ProgressBar
        bar = ProgressBar(total)
        return bar.update
    except ImportError:
        pass
    try:
        from tqdm import tqdm
        tbar = tqdm(total=total, desc='toy_city')

        def update() -> None:
            tbar.update(1)
            if tbar.n >= total:
                tbar.close()

        return update
    except ImportError:
        return lambda: None


def _prepare_out_dir(out_dir: str) -> None:
    """Clears a previous toy-city output in ``out_dir``; refuses to touch any other data there."""
    split_dirs = [osp.join(out_dir, sub, split) for sub in (IMG_DIR, ANN_DIR) for split in _SPLIT_CODES]
    used = [d for d in split_dirs if osp.isdir(d) and os.listdir(d)]
    meta_path = osp.join(out_dir, META_FILE)
    if used and not osp.isfile(meta_path):
        raise FileExistsError(f'{out_dir} already holds {IMG_DIR}/ or {ANN_DIR}/ data without a {META_FILE}; '
                              'refusing to overwrite what may be a real dataset. Choose another out_dir.')
    # Remove the marker first: an interrupted run then leaves no valid metadata behind.
    if osp.isfile(meta_path):
        os.remove(meta_path)
    for d in used:
        shutil.rmtree(d)


def _write_splits(out_dir: str, counts: Dict[str, int], seed: int, height: int, width: int,
                  pixel_hist: Dict[str, np.ndarray], image_hist: Dict[str, np.ndarray],
                  update: Callable[[], None]) -> None:
    """Renders and writes every image of every split, accumulating label histograms per split."""
    for split, n in counts.items():
        pixel_hist[split] = np.zeros(256, np.int64)
        image_hist[split] = np.zeros(256, np.int64)
        for i in range(n):
            img, lbl = render_toy_city_sample(seed, split, i, height, width)
            city, stem = toy_city_file_stem(split, i, n)
            img_dir = osp.join(out_dir, IMG_DIR, split, city)
            ann_dir = osp.join(out_dir, ANN_DIR, split, city)
            os.makedirs(img_dir, exist_ok=True)
            os.makedirs(ann_dir, exist_ok=True)
            # OpenCV writes BGR; the stored PNG is a normal RGB image.
            ok = cv2.imwrite(osp.join(img_dir, stem + IMG_SUFFIX), img[..., ::-1])
            ok = ok and cv2.imwrite(osp.join(ann_dir, stem + SEG_MAP_SUFFIX), lbl)
            if not ok:
                raise OSError(f'failed to write {stem} under {out_dir}')
            hist = np.bincount(lbl.ravel(), minlength=256)
            pixel_hist[split] += hist
            image_hist[split] += hist > 0
            update()


def generate_toy_city(out_dir: str, num_train: int = 200, num_val: int = 50, height: int = 256,
                      width: int = 512, seed: int = 0, progress: bool = True) -> Dict[str, Any]:
    """Generates the toy-city dataset in Cityscapes layout.

    Existing toy-city output in ``out_dir`` (recognised by its ``toy_city_meta.json``) is replaced;
    a directory that holds Cityscapes-style data without that file is left alone and an error raised.
    ``toy_city_meta.json`` is written last, so its presence marks a complete dataset.

    Args:
        out_dir: Dataset root to write (created if missing).
        num_train: Number of training images (>= 1).
        num_val: Number of validation images (>= 0).
        height: Image height in pixels (>= ``MIN_IMAGE_SIZE``).
        width: Image width in pixels (>= ``MIN_IMAGE_SIZE``).
        seed: Dataset seed (non-negative); the same seed gives byte-identical files.
        progress: Show a progress bar.

    Returns:
        A summary dict: ``out_dir``, ``params`` (the arguments above), ``num_images`` per split,
        ``class_pixel_fraction`` per split (class name -> fraction of all pixels, plus ``'ignore'``),
        ``class_image_count`` per split (class name -> number of images containing it) and
        ``elapsed_s``.

    Raises:
        ValueError: On invalid arguments.
        FileExistsError: If ``out_dir`` holds foreign Cityscapes-style data.
        OSError: If an image cannot be written.
    """
    if not isinstance(out_dir, (str, os.PathLike)) or not str(out_dir):
        raise ValueError(f'out_dir must be a non-empty path, got {out_dir!r}')
    _validate_int('num_train', num_train, 1)
    _validate_int('num_val', num_val, 0)
    _validate_image_size(height, width)
    _validate_int('seed', seed, 0)
    out_dir = str(out_dir)
    t0 = time.perf_counter()
    _prepare_out_dir(out_dir)
    params = dict(num_train=int(num_train), num_val=int(num_val), height=int(height), width=int(width),
                  seed=int(seed))
    counts = {'train': int(num_train), 'val': int(num_val)}
    update = _make_progress(sum(counts.values()), progress)
    pixel_hist: Dict[str, np.ndarray] = {}
    image_hist: Dict[str, np.ndarray] = {}
    # The frames are small: OpenCV's thread pool costs more than it saves, especially on a shared
    # 2-core machine. The caller's setting is restored afterwards.
    cv_threads = cv2.getNumThreads()
    cv2.setNumThreads(1)
    try:
        _write_splits(out_dir, counts, seed, height, width, pixel_hist, image_hist, update)
    finally:
        cv2.setNumThreads(cv_threads)

    def by_name(hist: np.ndarray, total: float, as_int: bool = False) -> Dict[str, Any]:
        keys = list(TOY_CITY_CLASSES) + ['ignore']
        vals = list(hist[:len(TOY_CITY_CLASSES)]) + [hist[IGNORE_INDEX]]
        if as_int:
            return {k: int(v) for k, v in zip(keys, vals)}
        return {k: round(float(v) / max(total, 1.0), 6) for k, v in zip(keys, vals)}

    summary: Dict[str, Any] = {
        'out_dir': out_dir,
        'params': params,
        'num_images': counts,
        'class_pixel_fraction': {s: by_name(h, float(h.sum())) for s, h in pixel_hist.items()},
        'class_image_count': {s: by_name(h, 0, as_int=True) for s, h in image_hist.items()},
    }
    meta = {'generator': 'mmseg_cbt.datasets.toy_city', 'version': GENERATOR_VERSION, **summary}
    meta['out_dir'] = None  # the data may be moved; keep the file independent of its location
    with open(osp.join(out_dir, META_FILE), 'w') as f:
        json.dump(meta, f, indent=2, sort_keys=True)
        f.write('\n')
    summary['elapsed_s'] = round(time.perf_counter() - t0, 3)
    return summary
