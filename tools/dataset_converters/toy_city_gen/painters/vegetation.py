"""Vegetation: trees, hedges and forest edges (all vegetation label, one leafy texture)."""
import numpy as np

from ..camera import quad_z
from ..frame import Painter
from ..raster import circle
from ..spec import VEGETATION

__all__ = ['VegetationPainter']


class VegetationPainter(Painter):
    """Draws trees, hedges and tree lines."""

    def hedge(self, s: int, d: float, z0: float, z1: float, hgt: float) -> None:
        """A hedge: a row of leafy boxes with an uneven top."""
        z1 = min(z1, z0 + 80)
        zs = np.linspace(z0, z1, max(int((z1 - z0) / 0.7), 2))
        hs = np.maximum(hgt + self.r.rng.uniform(-0.2, 0.2, zs.size), 0.4)
        xi, xo = s * d, s * (d + 0.8)
        top_in = np.stack([np.full_like(zs, xi), hs, zs], 1)
        top_out = np.stack([np.full_like(zs, xo), hs, zs], 1)
        # Face towards the road with an uneven top, the top surface (seen from above when low) and the end.
        side = np.concatenate([[[xi, 0.0, z0]], top_in, [[xi, 0.0, z1]]])
        polys = [side, quad_z(z0, min(xi, xo), max(xi, xo), 0.0, hs[0])]
        if hgt < self.cam.ch:
            polys.insert(1, np.concatenate([top_in, top_out[::-1]]))
        self.canvas.fill_w(polys, VEGETATION, tex='vegetation')

    def treeline(self, s: int, d: float, z0: float, z1: float, hgt: float) -> None:
        """A forest edge along the street side: a vegetation band with a bumpy top."""
        zs = np.geomspace(max(z0, 1.0), max(z1, z0 + 1.0), 60)
        hs = np.clip(hgt + np.cumsum(self.r.rng.normal(0, 0.8, zs.size)), 2, 25)
        pts = [[s * d, 0.0, zs[0]]] + [[s * d, hh, z] for z, hh in zip(zs, hs)] + [[s * d, 0.0, zs[-1]]]
        self.canvas.fill_w([np.array(pts)], VEGETATION, tex='vegetation')

    def tree(self, x: float, z: float, trunk_h: float, crown_r: float) -> None:
        """A tree: trunk plus a crown of overlapping leafy discs (all vegetation)."""
        trunk_col = self.atm.haze(self.r.jit((82, 70, 58), 12), z)
        self.canvas.seg_w((x, 0.0, z), (x, trunk_h + crown_r * 0.5, z), self.r.u(0.2, 0.4), VEGETATION, trunk_col)
        cy = trunk_h + crown_r
        discs = []
        for _ in range(int(self.r.rng.integers(5, 10))):
            ox, oy = self.r.rng.normal(0, crown_r * 0.35, 2)
            rr = crown_r * self.r.u(0.45, 0.75)
            centre = self.cam.frontal((x, cy, z), np.array([[ox, oy]]))[0]
            discs.append(circle(centre[0], centre[1], rr * self.cam.f / z))
        self.canvas.fill(discs, VEGETATION, tex='vegetation')
