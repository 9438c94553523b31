"""The ground and the far background: sky, terrain, sidewalks and curbs, the road and its markings, cast
shadows, the skyline and the facades closing the street."""
import math
from typing import Any, Dict, List

import numpy as np

from ..camera import quad_x, quad_y, quad_z
from ..frame import Frame, Painter
from ..palettes import FACADE_COLOURS
from ..spec import BUILDING, IGNORE_INDEX, ROAD, SIDEWALK, SKY, TERRAIN, VEGETATION
from .buildings import BuildingPainter

__all__ = ['GroundPainter']


class GroundPainter(Painter):
    """Draws what lies under and behind the street objects, before any of them.

    Args:
        frame: The rendering context.
        buildings: Draws the facades that close the street.
    """

    def __init__(self, frame: Frame, buildings: BuildingPainter) -> None:
        super().__init__(frame)
        self.mat = frame.mat
        self.buildings = buildings

    def sky(self) -> None:
        """Fills the frame above the horizon with a vertical sky gradient and soft clouds."""
        # Rows below the horizon are all covered by the ground, so the sky is only computed above it.
        rows = min(int(math.floor(self.cam.hy)) + 1, self.cam.h)
        ys = np.arange(rows, dtype=np.float32)[:, None, None]
        t = np.clip(ys / max(self.cam.hy, 1.0), 0, 1)**0.8
        base = self.atm.sky_top.astype(np.float32)[None, None] * (1 - t) + self.atm.haze_col.astype(
            np.float32)[None, None] * t
        c = (self.frame.noise.smooth(45) + 0.5 * self.frame.noise.smooth(12, variant=2))[:rows]
        a = (np.clip((c - 0.4) * 0.8, 0, 1) * np.float32(self.atm.cloudiness))[..., None]
        cloud = self.atm.cloud_col.astype(np.float32)[None, None] * (0.85 + 0.15 * np.clip(c, -1, 1))[..., None]
        self.canvas.img[:rows] = base * (1 - a) + cloud * a
        self.canvas.lbl[:] = SKY

    def ground(self, sides: List[Dict[str, Any]]) -> None:
        """Draws terrain, front gardens, sidewalks, curbs, rail beds, the road and its markings."""
        r0 = int(math.floor(self.cam.hy))
        self.canvas.fill(
            [np.array([[-1, r0], [self.cam.w + 1, r0], [self.cam.w + 1, self.cam.h + 1], [-1, self.cam.h + 1]], float)],
            TERRAIN,
            tex='terrain')
        zs = self.street.z_street
        far = self.street.z_end if self.street.z_end else 3000.0
        c = self.street.curb_h
        for side in sides:
            s, d_r, d_o = side['s'], side['D_r'], side['D_o']
            if side['D_f'] is not None and side['front'] == 'sidewalk':
                self.canvas.fill_w([quad_y(c, s * d_o, s * side['D_f'], 0.6, zs)], SIDEWALK, tex='sidewalk')
            if side['rail'] is not None:
                d = side['rail']
                self.canvas.fill_w([quad_y(0.0, s * (d - 2.2), s * (d + 2.2), 0.6, 3000.0)], IGNORE_INDEX, tex='gravel')
                for off in (-0.72, 0.72):
                    self.canvas.seg_w((s * (d + off), 0.15, 2.0), (s * (d + off), 0.15, 3000.0), 0.07, None,
                                      (150, 148, 145))
            if side['sw'] > 0:
                self.canvas.fill_w([quad_y(c, s * d_r, s * d_o, 0.6, zs)], SIDEWALK, tex='sidewalk')
                # Paving joints, only where they are resolvable.
                tile = self.r.u(0.4, 1.2)
                joint = np.clip(self.mat.sidewalk_col * 0.78, 0, 255)
                for z in np.arange(1.0, min(zs, 25.0), tile):
                    self.canvas.line_w((s * d_r, c, z), (s * d_o, c, z), joint)
                for x in np.arange(d_r + tile, d_o, tile):
                    self.canvas.line_w((s * x, c, 1.0), (s * x, c, min(zs, 25.0)), joint)
            # Curb: the visible vertical face between road and sidewalk (labelled sidewalk).
            self.canvas.fill_w([quad_x(s * d_r, 0.0, c, 0.6, zs)], SIDEWALK, self.mat.curb_col)
        if self.street.z_end:
            # Cross street and the far sidewalk in front of the closing facades.
            self.canvas.fill_w([quad_y(c, -400, 400, self.street.z_end - 3, self.street.z_end)],
                               SIDEWALK,
                               tex='sidewalk')
            self.canvas.fill_w([quad_y(0.0, -400, 400, zs, self.street.z_end - 3)], ROAD, tex='road')
        left, right = -self.street.road_edge[-1], self.street.road_edge[1]
        self.canvas.fill_w([quad_y(0.0, left, right, 0.6,
                                   min(far, zs + 0.5) if self.street.z_end else far)],
                           ROAD,
                           tex='road')
        self._markings(left, right)

    def _markings(self, left: float, right: float) -> None:
        """Paints lane markings, zebra crossing, bike lane, tram rails and patches (all road)."""
        zs = self.street.z_street
        paint = self.r.jit((222, 222, 214), 10) * self.r.u(0.75, 1.0)
        dash, gap = self.r.u(3, 6), self.r.u(6, 12)
        for k in range(0, self.street.n_left + 1):
            x = -self.street.lane_w / 2 - k * self.street.lane_w
            if k == self.street.n_left and not self.street.park[-1]:
                continue
            z = self.r.u(0, dash + gap)
            while z < min(zs, 200):
                self.canvas.fill_w([quad_y(0.0, x - 0.07, x + 0.07, z, z + dash)], ROAD, paint)
                z += dash + gap
        if self.r.p(0.5):
            for x in (left + 0.3, right - 0.3):
                self.canvas.fill_w([quad_y(0.0, x - 0.06, x + 0.06, 0.6, zs)], ROAD, paint)
        if self.street.bike_lane:
            x0 = right - 1.6
            col = self.r.jit((170, 80, 70), 15) if self.r.p(0.6) else paint
            if col is paint:
                self.canvas.fill_w([quad_y(0.0, x0 - 0.07, x0 + 0.07, 0.6, zs)], ROAD, paint)
            else:
                self.canvas.fill_w([quad_y(0.0, x0, right - 0.1, 0.6, zs)], ROAD, col)
        if self.street.zebra is not None:
            length = self.r.u(3, 4)
            x = left + 0.3
            while x < right - 0.3:
                self.canvas.fill_w([quad_y(0.0, x, x + 0.5, self.street.zebra, self.street.zebra + length)], ROAD,
                                   paint)
                x += 1.0
        if self.street.tram:
            for off in (-0.72, 0.72):
                self.canvas.seg_w((self.street.tram_x + off, 0.0, 2.0),
                                  (self.street.tram_x + off, 0.0, min(zs, 3000.0)), 0.07, ROAD, (150, 150, 152))
        for _ in range(int(self.r.rng.poisson(1.5))):
            # Darker asphalt repairs and manholes.
            z = self.r.u(4, 40)
            x = self.r.u(left, right)
            w, length = self.r.u(0.5, 3), self.r.u(0.5, 6)
            self.canvas.darken([quad_y(0.0, x, min(x + w, right), z, z + length)], self.r.u(0.75, 0.92))

    def cast_shadows(self, sides: List[Dict[str, Any]]) -> None:
        """On sunny images the buildings of one side throw shadows across the street."""
        if not self.atm.sunny:
            return
        k = self.r.u(0.45, 0.7)
        reach = self.r.u(2, 14)
        dz = self.r.u(-6, 6)
        for side in sides:
            if side['s'] != self.atm.shadow_side:
                continue
            s = side['s']
            for b in side['buildings']:
                d0 = b['D']
                d1 = max(d0 - reach * b['H'] / 15.0, -self.street.road_edge[-s])
                poly = np.array([[s * d0, 0, b['z0']], [s * d0, 0, b['z1']], [s * d1, 0, b['z1'] + dz],
                                 [s * d1, 0, max(b['z0'] + dz, 0.6)]])
                self.canvas.darken([poly], k)

    def background(self, sides: List[Dict[str, Any]]) -> None:
        """Distant skyline and tree line near the horizon, and the facades closing the street."""
        if self.r.p(0.6):
            zb = self.r.u(150, 450)
            x = -zb
            while x < zb:
                w = self.r.u(10, 40)
                hgt = self.r.u(5, 45)
                col = self.atm.haze(np.asarray(self.r.pick(FACADE_COLOURS)) * self.r.u(0.7, 1.0), zb)
                self.canvas.fill_w([quad_z(zb, x, x + w, 0.0, hgt)], BUILDING, col)
                x += w * self.r.u(0.8, 1.1)
        if self.r.p(0.5):
            zt = self.r.u(60, 250)
            xs = np.linspace(-zt * 1.2, zt * 1.2, 80)
            hs = self.r.u(6, 18) + np.cumsum(self.r.rng.normal(0, 1.2, xs.size))
            hs = np.clip(hs, 2, 30)
            pts = [[xs[0], 0.0, zt]] + [[x, hh, zt] for x, hh in zip(xs, hs)] + [[xs[-1], 0.0, zt]]
            self.canvas.fill_w([np.array(pts)], VEGETATION, tex='vegetation')
        if self.street.z_end:
            x0 = -self.street.z_end * 1.5
            x1 = self.street.z_end * 1.5
            x = x0
            while x < x1:
                w = self.r.u(8, 25)
                b = dict(H=self.r.u(8, 28), colour=np.asarray(self.r.pick(FACADE_COLOURS), np.float64))
                col = self.atm.haze(b['colour'] * self.r.u(0.85, 1.0), self.street.z_end)
                self.buildings.facade(
                    np.array([x, 0.0, self.street.z_end]),
                    np.array([1.0, 0, 0]),
                    w,
                    b['H'],
                    col,
                    self.street.z_end,
                    lit_ground=True)
                x += w
