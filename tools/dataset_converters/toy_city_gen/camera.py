"""The roof camera: pinhole projection of world points and the sensor that develops the drawn frame.

World coordinates are metres: X to the right, Y up from the road surface, Z forward (depth). The camera sits at
``(0, ch, 0)`` looking along +Z with the horizon at image row ``hy``.
"""
from typing import TYPE_CHECKING, Sequence

import cv2
import numpy as np

from .frame import Draws

if TYPE_CHECKING:
    from .materials import NoiseBank

__all__ = ['Z_NEAR', 'Camera', 'quad_x', 'quad_y', 'quad_z']

Z_NEAR = 0.5
"""Nearest depth (metres) a projected vertex may have."""


def quad_x(x: float, y0: float, y1: float, z0: float, z1: float) -> np.ndarray:
    """A rectangle in the plane ``X = x`` (a side face)."""
    return np.array([[x, y0, z0], [x, y1, z0], [x, y1, z1], [x, y0, z1]], np.float64)


def quad_y(y: float, x0: float, x1: float, z0: float, z1: float) -> np.ndarray:
    """A rectangle in the plane ``Y = y`` (ground, roof)."""
    return np.array([[x0, y, z0], [x1, y, z0], [x1, y, z1], [x0, y, z1]], np.float64)


def quad_z(z: float, x0: float, x1: float, y0: float, y1: float) -> np.ndarray:
    """A rectangle in the plane ``Z = z`` (a face looking at the camera)."""
    return np.array([[x0, y0, z], [x1, y0, z], [x1, y1, z], [x0, y1, z]], np.float64)


class Camera:
    """A pinhole camera on a car's roof, drawn at random for one image.

    Focal length like Cityscapes (about 1.1 x width), a slightly yawed camera and a variable pitch (horizon row)
    and mounting height.

    Args:
        r: The image's random draws (four are taken, in this order: focal length, centre, horizon, height).
        height: Image height in pixels.
        width: Image width in pixels.
    """

    def __init__(self, r: Draws, height: int, width: int) -> None:
        self.h, self.w = int(height), int(width)
        # Pixel scale relative to the default 512-px width: texture feature sizes and blur follow it.
        self.px = self.w / 512.0
        self.f = 1.1 * self.w * r.u(0.92, 1.08)
        self.cx = self.w * (0.5 + r.u(-0.04, 0.04))
        self.hy = self.h * r.u(0.36, 0.47)
        self.ch = r.u(1.15, 1.45)

    def proj(self, pts: np.ndarray) -> np.ndarray:
        """Projects world points ``(..., 3)`` to pixel coordinates ``(..., 2)``."""
        p = np.asarray(pts, np.float64)
        inv = self.f / np.maximum(p[..., 2], Z_NEAR)
        out = np.empty(p.shape[:-1] + (2, ), np.float64)
        out[..., 0] = self.cx + p[..., 0] * inv
        out[..., 1] = self.hy + (self.ch - p[..., 1]) * inv
        return out

    def frontal(self, anchor: Sequence[float], pts_m: np.ndarray) -> np.ndarray:
        """Maps metre offsets ``(x right, y up)`` in the camera-facing plane through ``anchor`` to pixels."""
        s = self.f / max(anchor[2], Z_NEAR)
        ax = self.cx + anchor[0] * s
        ay = self.hy + (self.ch - anchor[1]) * s
        p = np.asarray(pts_m, np.float64).reshape(-1, 2)
        out = np.empty_like(p)
        out[:, 0] = ax + s * p[:, 0]
        out[:, 1] = ay - s * p[:, 1]
        return out

    def develop(self, img: np.ndarray, r: Draws, noise: 'NoiseBank') -> np.ndarray:
        """Applies lighting, colour cast, blur and sensor noise to the drawn frame.

        Args:
            img: ``(H, W, 3)`` float32 RGB frame; modified in place.
            r: The image's random draws.
            noise: The image's noise fields.

        Returns:
            The ``(H, W, 3)`` uint8 RGB image.
        """
        lum = 1 + 0.05 * noise.smooth(80)
        if r.p(0.4):
            # Vignetting (separable approximation of a radial fall-off).
            k = r.u(0.05, 0.25)
            vy = 1 - k / 2 * np.linspace(-1, 1, self.h, dtype=np.float32)**2
            vx = 1 - k / 2 * np.linspace(-1, 1, self.w, dtype=np.float32)**2
            lum = lum * vy[:, None] * vx[None, :]
        img *= lum[..., None]
        # Exposure, contrast, colour cast and gamma form a per-channel tone curve, applied as a lookup
        # table on the final 8-bit image (the sensor noise below then passes through it as well).
        mean = float(img.mean())
        contrast, gain, gamma = r.u(0.8, 1.15), r.u(0.7, 1.2), r.u(0.85, 1.2)
        cast = 1 + r.rng.normal(0, 0.05, 3)
        v = np.arange(256, dtype=np.float64)[:, None]
        curve = ((v - mean) * contrast + mean) * gain * cast[None, :]
        lut = np.rint(255.0 * np.clip(curve / 255.0, 0, 1)**gamma).astype(np.uint8)
        kind = r.rng.random()
        if kind < 0.15:
            img = cv2.GaussianBlur(img, (0, 0), r.u(1.0, 2.0) * max(self.px, 0.3))
        elif kind < 0.25:
            k = int(max(r.u(3, 9) * self.px, 2)) | 1
            kernel = np.zeros((k, k), np.float32)
            kernel[k // 2, :] = 1.0 / k
            img = cv2.filter2D(img, -1, kernel, borderType=cv2.BORDER_REFLECT)
        else:
            img = cv2.GaussianBlur(img, (0, 0), r.u(0.35, 0.7) * max(self.px, 0.5))
        img += r.rng.standard_normal(img.shape, dtype=np.float32) * np.float32(r.u(1.5, 6.5))
        out = np.clip(np.rint(img), 0, 255).astype(np.uint8)
        return cv2.LUT(out, lut.reshape(256, 1, 3))
