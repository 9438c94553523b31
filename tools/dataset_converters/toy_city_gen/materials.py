"""The look of one image: weather and light, ground and vegetation materials, and the noise behind them."""
import math
from typing import Dict, Sequence, Tuple

import cv2
import numpy as np

from .frame import Draws

__all__ = ['NoiseBank', 'Atmosphere', 'Materials']


class NoiseBank:
    """Noise fields of one image, each kind drawn once, a little larger than the frame.

    Noise fields are the main cost of a frame, so users take differently offset windows of one field
    ("variants") instead of drawing new ones. Fields are drawn lazily, on first use.

    Args:
        r: The image's random draws.
        height: Image height in pixels.
        width: Image width in pixels.
        px: Pixel scale relative to a 512-px wide image.
    """

    PAD = 61

    def __init__(self, r: Draws, height: int, width: int, px: float) -> None:
        self.rng = r.rng
        self.h, self.w, self.px = height, width, px
        self._bank: Dict[Tuple[str, float], np.ndarray] = {}

    def _window(self, field: np.ndarray, variant: int) -> np.ndarray:
        oy = (variant * 29) % self.PAD
        ox = (variant * 43) % self.PAD
        return field[oy:oy + self.h, ox:ox + self.w]

    def smooth(self, cell: float, variant: int = 0) -> np.ndarray:
        """Unit-variance smooth noise with features of about ``cell`` pixels (at 512 px width)."""
        key = ('smooth', cell)
        if key not in self._bank:
            c = max(cell * self.px, 1.0)
            fh, fw = self.h + self.PAD, self.w + self.PAD
            gh, gw = int(fh / c) + 3, int(fw / c) + 3
            g = self.rng.standard_normal((gh, gw), dtype=np.float32)
            out = cv2.resize(g, (int(math.ceil(gw * c)), int(math.ceil(gh * c))), interpolation=cv2.INTER_CUBIC)
            out = out[:fh, :fw]
            self._bank[key] = (out - out.mean()) / (out.std() + 1e-6)
        return self._window(self._bank[key], variant)

    def fine(self, sigma: float = 0.0, variant: int = 0) -> np.ndarray:
        """Unit-variance per-pixel noise, optionally blurred to leaf/gravel grain size."""
        key = ('fine', round(sigma, 3))
        if key not in self._bank:
            if ('fine', 0.0) not in self._bank:
                self._bank[('fine', 0.0)] = self.rng.standard_normal((self.h + self.PAD, self.w + self.PAD),
                                                                     dtype=np.float32)
            n = self._bank[('fine', 0.0)]
            if sigma > 0:
                n = cv2.GaussianBlur(n, (0, 0), sigma)
                n /= n.std() + 1e-6
            self._bank[key] = n
        return self._window(self._bank[key], variant)


class Atmosphere:
    """The weather: sky colours, clouds, haze and whether the sun casts shadows.

    Args:
        r: The image's random draws.
    """

    def __init__(self, r: Draws) -> None:
        kind = r.choice(['clear', 'overcast', 'hazy', 'dusk'], [0.45, 0.3, 0.15, 0.1])
        top, hor, cloud = {
            'clear': ((70, 120, 190), (172, 200, 228), (236, 238, 242)),
            'overcast': ((172, 178, 188), (214, 218, 222), (150, 156, 166)),
            'hazy': ((150, 174, 204), (214, 214, 208), (230, 230, 232)),
            'dusk': ((62, 82, 140), (236, 172, 116), (200, 150, 140)),
        }[kind]
        self.sky_kind = kind
        self.sky_top = r.jit(top, 14)
        self.haze_col = r.jit(hor, 10)
        self.cloud_col = r.jit(cloud, 8)
        self.cloudiness = {'clear': 0.6, 'overcast': 0.9, 'hazy': 0.4, 'dusk': 0.5}[kind] * r.u(0.3, 1.0)
        self.haze_d = r.u(150, 450) if kind in ('overcast', 'hazy') else r.u(300, 1000)
        self.sunny = kind == 'clear' and r.p(0.75)
        self.shadow_side = -1 if r.p(0.5) else 1
        # Light falling on the facades of each street side (-1 left, +1 right).
        if self.sunny:
            self.side_light = {self.shadow_side: r.u(0.55, 0.78), -self.shadow_side: r.u(0.98, 1.12)}
        else:
            self.side_light = {-1: r.u(0.85, 1.0), 1: r.u(0.85, 1.0)}

    def haze(self, colour: Sequence[float], z: float) -> np.ndarray:
        """Blends a colour towards the horizon colour with distance (aerial perspective)."""
        a = 1.0 - math.exp(-max(z, 0.0) / self.haze_d)
        return np.asarray(colour, np.float64) * (1 - a) + self.haze_col * a


class Materials:
    """This image's ground and vegetation colours (overlapping ranges on purpose) and their textures.

    Args:
        r: The image's random draws.
        noise: The image's noise fields.
    """

    def __init__(self, r: Draws, noise: NoiseBank) -> None:
        self.noise = noise
        self.px = noise.px
        self._tex: Dict[str, np.ndarray] = {}
        g = r.u(72, 125)
        self.road_col = r.jit((g, g, g + 3), 4)
        if r.p(0.75):
            # Grey pavement, sometimes nearly the road's grey: then only the curb separates them.
            gs = g + r.u(6, 55)
            self.sidewalk_col = r.jit((gs, gs - 2, gs - 4), 5)
        else:
            self.sidewalk_col = r.jit((156, 112, 100), 16)
        self.curb_col = np.clip(self.sidewalk_col * r.u(1.05, 1.3), 0, 255)
        self.veg_col = r.jit((58, 88, 36), 14)
        self.veg_col2 = r.jit((150, 112, 40), 12) if r.p(0.1) else r.jit((96, 118, 48), 14)
        if r.p(0.4):
            # Terrain in the vegetation's own greens: only flatness and context tell them apart.
            self.terrain_col = np.clip(self.veg_col * r.u(1.05, 1.4), 0, 255)
        elif r.p(0.7):
            self.terrain_col = r.jit((100, 124, 62), 16)
        else:
            self.terrain_col = r.jit((134, 122, 84), 16)
        self.terrain_col2 = r.jit((128, 112, 78), 14)

    def texture(self, name: str) -> np.ndarray:
        """Returns (and caches) a full-frame ``(H, W, 3)`` float texture of a material."""
        if name in self._tex:
            return self._tex[name]
        f32 = np.float32
        noise = self.noise
        grain_sigma = 0.55 * self.px + 0.25
        if name == 'vegetation':
            # Strong leaf-scale grain, clumps and dark holes between leaves.
            leaf = noise.fine(grain_sigma)
            mid = noise.smooth(4)
            low = noise.smooth(28)
            holes = noise.smooth(4, variant=1)
            lum = 1 + 0.32 * leaf + 0.2 * mid
            lum *= 1 - 0.5 / (1 + np.exp(-(holes * 3 - 3.5)))
            t = (1 / (1 + np.exp(-1.6 * low)))[..., None]
            tex = (self.veg_col.astype(f32) * (1 - t) + self.veg_col2.astype(f32) * t) * lum[..., None]
        elif name == 'terrain':
            # Flat grass/dirt: similar greens, finer and weaker grain than vegetation.
            grain = noise.fine(grain_sigma, variant=1)
            mid = noise.smooth(4, variant=2)
            low = noise.smooth(28, variant=1)
            lum = 1 + 0.12 * grain + 0.1 * mid + 0.06 * low
            t = np.clip(noise.smooth(12, variant=1) * 0.5 - 0.3, 0, 1)[..., None]
            tex = (self.terrain_col.astype(f32) * (1 - t) + self.terrain_col2.astype(f32) * t) * lum[..., None]
        elif name == 'road':
            # No per-pixel term: the camera's sensor noise supplies the fine grain.
            lum = 1 + 0.06 * noise.smooth(2) + 0.07 * noise.smooth(28, variant=3)
            tex = self.road_col.astype(f32) * lum[..., None]
        elif name == 'sidewalk':
            lum = 1 + 0.06 * noise.smooth(2, variant=1) + 0.06 * noise.smooth(28, variant=4)
            tex = self.sidewalk_col.astype(f32) * lum[..., None]
        elif name == 'gravel':
            lum = 1 + 0.22 * noise.fine(grain_sigma, variant=2) + 0.08 * noise.smooth(28, variant=5)
            tex = np.array([112, 102, 92], f32) * lum[..., None]
        else:
            raise KeyError(f'unknown material {name!r}')
        tex = tex.astype(np.float32)
        self._tex[name] = tex
        return tex
