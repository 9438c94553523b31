"""Rasterising: polygons into the image and the label map by the same OpenCV calls, so labels are pixel exact."""
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np

from .camera import Z_NEAR, Camera, quad_x, quad_y, quad_z
from .spec import IGNORE_INDEX

__all__ = ['Canvas', 'circle', 'seg_px']

# OpenCV fixed-point drawing: coordinates carry 3 fractional bits, so thin or distant objects keep
# their sub-pixel position instead of snapping to whole pixels.
_SHIFT = 3
_SCALE = float(1 << _SHIFT)
# Vertices are clipped to this many pixels; far larger values only come from points right in front
# of the camera, and int32 fixed-point coordinates must not overflow.
_COORD_LIMIT = 1.0e5


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


def circle(cx: float, cy: float, r: float, n: Optional[int] = None) -> np.ndarray:
    """Returns a polygon approximating a circle (pixel coordinates)."""
    if n is None:
        n = int(np.clip(r * 1.5 + 8, 8, 48))
    t = np.linspace(0.0, 2.0 * np.pi, n, endpoint=False)
    return np.stack([cx + r * np.cos(t), cy + r * np.sin(t)], axis=1)


def seg_px(a: np.ndarray, b: np.ndarray, wa: float, wb: Optional[float] = None) -> np.ndarray:
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


class Canvas:
    """The RGB float image and the train-id label map of one frame, drawn in pixel or world space.

    Args:
        cam: The camera that maps world polygons to pixels.
        texture: Returns the full-frame texture of a material by name.
    """

    def __init__(self, cam: Camera, texture: Callable[[str], np.ndarray]) -> None:
        self.cam = cam
        self.h, self.w = cam.h, cam.w
        self.texture = texture
        self.img = np.zeros((self.h, self.w, 3), np.float32)
        self.lbl = np.full((self.h, self.w), IGNORE_INDEX, np.uint8)

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

    def fill(self,
             polys: Sequence[np.ndarray],
             label: Optional[int],
             colour: Optional[Sequence[float]] = None,
             tex: Optional[str] = None,
             evenodd: bool = False) -> None:
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

    def fill_w(self,
               polys: Sequence[np.ndarray],
               label: Optional[int],
               colour: Optional[Sequence[float]] = None,
               tex: Optional[str] = None,
               evenodd: bool = False) -> None:
        """Like :meth:`fill` for world-space polygons ``(N, 3)``."""
        self.fill([self.cam.proj(p) for p in polys], label, colour, tex, evenodd)

    def darken(self, polys: Sequence[np.ndarray], factor: float, world: bool = True) -> None:
        """Multiplies the image under the polygons by ``factor`` (shadows); labels are unchanged."""
        pts = [_to_fixed(self.cam.proj(p) if world else p) for p in polys]
        res = self._mask([[p] for p in pts])
        if res is None:
            return
        y0, x0, m = res
        view = self.img[y0:y0 + m.shape[0], x0:x0 + m.shape[1]]
        np.multiply(view, np.float32(factor), out=view, where=m[..., None])

    def seg_w(self,
              p0: Sequence[float],
              p1: Sequence[float],
              width_m: float,
              label: Optional[int],
              colour: Sequence[float],
              min_px: float = 1.0) -> None:
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
        f = self.cam.f
        a, b = self.cam.proj(np.array([p0, p1], np.float64))
        wa = max(f * width_m / max(p0[2], Z_NEAR), min_px)
        wb = max(f * width_m / max(p1[2], Z_NEAR), min_px)
        self.fill([seg_px(a, b, wa, wb)], label, colour)

    def segs_w(self,
               p0: np.ndarray,
               p1: np.ndarray,
               width_m: float,
               label: Optional[int],
               colour: Sequence[float],
               min_px: float = 1.0) -> None:
        """Vectorised :meth:`seg_w` for many bars ``p0[i] -> p1[i]`` (pickets, mesh wires, posts)."""
        p0 = np.asarray(p0, np.float64).reshape(-1, 3)
        p1 = np.asarray(p1, np.float64).reshape(-1, 3)
        if len(p0) == 0:
            return
        f = self.cam.f
        a, b = self.cam.proj(p0), self.cam.proj(p1)
        wa = np.maximum(f * width_m / np.maximum(p0[:, 2], Z_NEAR), min_px)[:, None]
        wb = np.maximum(f * width_m / np.maximum(p1[:, 2], Z_NEAR), min_px)[:, None]
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
        a, b = self.cam.proj(np.array([p0, p1], np.float64))
        a = _to_fixed(a).reshape(2)
        b = _to_fixed(b).reshape(2)
        cv2.line(self.img, (int(a[0]), int(a[1])), (int(b[0]), int(b[1])), tuple(float(v) for v in colour), 1,
                 cv2.LINE_8, _SHIFT)

    def box(self,
            x0: float,
            x1: float,
            y0: float,
            y1: float,
            z0: float,
            z1: float,
            label: Optional[int],
            colour: Sequence[float],
            tex: Optional[str] = None,
            side_shade: float = 0.82,
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
            faces['side'] = quad_x(x1, y0, y1, z0, z1)
        elif x0 > 0:
            faces['side'] = quad_x(x0, y0, y1, z0, z1)
        if y1 < self.cam.ch:
            faces['top'] = quad_y(y1, x0, x1, z0, z1)
        elif y0 > self.cam.ch:
            faces['bottom'] = quad_y(y0, x0, x1, z0, z1)
        faces['front'] = quad_z(z0, x0, x1, y0, y1)
        shades = {'side': side_shade, 'top': top_shade, 'bottom': 0.6, 'front': 1.0}
        for name, poly in faces.items():
            self.fill_w([poly], label, np.clip(c * shades[name], 0, 255), tex)
        return faces
