"""Buildings and the boundaries in front of them: facades with windows and shops, walls, fences, guard rails."""
from typing import Any, Dict, Tuple

import numpy as np

from ..camera import quad_x
from ..frame import Painter
from ..palettes import GLASS, ROOF_COLOURS
from ..spec import BUILDING, FENCE, IGNORE_INDEX, WALL

__all__ = ['BuildingPainter']


class BuildingPainter(Painter):
    """Draws buildings (building label), walls (wall), fences (fence) and guard rails (void)."""

    def facade(self,
               origin: np.ndarray,
               u: np.ndarray,
               length: float,
               height: float,
               colour: np.ndarray,
               z_ref: float,
               lit_ground: bool = True,
               windows: bool = True) -> None:
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
            corners = [
                origin + a0 * u + b0 * v, origin + a0 * u + b1 * v, origin + a1 * u + b1 * v, origin + a1 * u + b0 * v
            ]
            return np.stack(corners, axis=1)

        main = self.cam.proj(rects([0], [length], [0], [height])[0])
        if (main[:, 0].max() < 0 or main[:, 0].min() > self.cam.w or main[:, 1].max() < 0
                or main[:, 1].min() > self.cam.h):
            return  # entirely outside the frame
        self.canvas.fill([main], BUILDING, colour)
        if min(np.ptp(main[:, 0]), np.ptp(main[:, 1])) < 3:
            return  # too small for any detail to be resolved
        # Plinth and cornice bands give facades a horizontal structure.
        self.canvas.fill_w([rects([0], [length], [0], [0.5])[0]], None, colour * 0.75)
        if height > 4:
            self.canvas.fill_w([rects([0], [length], [height - 0.45], [height])[0]], None,
                               np.clip(colour * 1.12, 0, 255))
        if not windows:
            return
        gf = self.r.u(3.2, 4.5)
        floor_h = self.r.u(2.9, 3.6)
        col_w = self.r.u(1.6, 3.2)
        n_f = int((height - gf - 0.6) / floor_h)
        n_c = int((length - 0.8) / col_w)
        if n_f >= 1 and n_c >= 1:
            win_w = col_w * self.r.u(0.35, 0.62)
            win_h = floor_h * self.r.u(0.45, 0.62)
            jj, kk = np.meshgrid(np.arange(n_c), np.arange(n_f))
            a0 = 0.4 + (length - 0.8 - n_c * col_w) / 2 + jj.ravel() * col_w + (col_w - win_w) / 2
            b0 = gf + kk.ravel() * floor_h + (floor_h - win_h) * 0.55
            quads = rects(a0, a0 + win_w, b0, b0 + win_h)
            px = self.cam.proj(quads)
            size = np.minimum(np.ptp(px[..., 0], axis=1), np.ptp(px[..., 1], axis=1))
            keep = size >= 0.8
            quads, px = quads[keep], px[keep]
            if self.r.p(0.3) and len(px):
                # Light window frames, drawn as slightly larger quads under the glass.
                fr = rects(a0[keep] - 0.12, a0[keep] + win_w + 0.12, b0[keep] - 0.12, b0[keep] + win_h + 0.12)
                self.canvas.fill(list(self.cam.proj(fr)), None, np.clip(colour * 1.2 + 20, 0, 255), evenodd=True)
            if len(px):
                glass = [
                    self.atm.haze(self.r.jit(self.r.pick(GLASS), 8), z_ref),
                    self.atm.haze(self.r.jit(self.atm.haze_col * 0.7, 10), z_ref),
                    self.atm.haze(self.r.jit((196, 186, 150), 15), z_ref)
                ]
                group = self.r.rng.choice(3, size=len(px), p=[0.62, 0.26, 0.12])
                for gi in range(3):
                    sel = px[group == gi]
                    if len(sel):
                        self.canvas.fill(list(sel), None, glass[gi], evenodd=True)
        if lit_ground and length > 3:
            # Shop fronts or doors on the ground floor.
            if self.r.p(0.5):
                a = 0.6
                while a < length - 1.5:
                    w = min(self.r.u(1.5, 4.5), length - 0.6 - a)
                    self.canvas.fill_w([rects([a], [a + w], [0.5], [gf - 0.7])[0]], None,
                                       self.atm.haze(self.r.jit(self.r.pick(GLASS), 10), z_ref))
                    a += w + self.r.u(0.5, 2.0)
                if self.r.p(0.35):
                    # Shop sign band: colourful but labelled building (a classic sign look-alike).
                    self.canvas.fill_w([rects([0.3], [length - 0.3], [gf - 0.6], [gf - 0.15])[0]], None,
                                       self.atm.haze(
                                           self.r.pick(((200, 30, 30), (30, 80, 170), (230, 200, 40), (240, 240, 240),
                                                        (30, 130, 60))), z_ref))
            else:
                a = self.r.u(0.5, max(length - 2, 0.6))
                self.canvas.fill_w([rects([a], [a + 1.2], [0.0], [2.3])[0]], None, colour * 0.45)

    def side_building(self, s: int, b: Dict[str, Any]) -> None:
        """Draws a building along the street side: its end wall, roof and street facade."""
        d, z0, z1, hb = b['D'], b['z0'], b['z1'], b['H']
        zc = (z0 + z1) / 2
        col = self.atm.haze(b['colour'] * b['light'], zc)
        depth = 15.0
        # End wall facing the camera (visible where the nearer neighbour is set back or missing).
        self.facade(
            np.array([s * d, 0.0, z0]),
            np.array([float(s), 0, 0]),
            depth,
            hb,
            self.atm.haze(b['colour'] * b['light'] * 0.85, z0),
            z0,
            lit_ground=False,
            windows=False)
        if b['roof']:
            roof = np.asarray(self.r.pick(ROOF_COLOURS), np.float64)
            rise = self.r.u(2, 4)
            poly = np.array([[s * d, hb, z0], [s * d, hb, z1], [s * (d + 4), hb + rise, z1],
                             [s * (d + 4), hb + rise, z0]])
            self.canvas.fill_w([poly], BUILDING, self.atm.haze(roof, zc))
        self.facade(np.array([s * d, 0.0, z0]), np.array([0.0, 0, 1.0]), z1 - z0, hb, col, zc)

    def wall(self, s: int, d: float, z0: float, z1: float, hgt: float, colour: np.ndarray) -> None:
        """A low wall in the building palette (no windows), 0.3 m thick, in front of the facades."""
        col = self.atm.haze(colour * self.atm.side_light[s] * self.r.u(0.85, 1.05), z0)
        x_in, x_out = sorted((s * d, s * (d + 0.3)))
        self.canvas.box(x_in, x_out, 0.0, hgt, z0, z1, WALL, col, top_shade=1.15)
        if self.r.p(0.5):
            # Brick or block courses.
            joint = np.clip(col * 0.8, 0, 255)
            for y in np.arange(0.25, hgt, self.r.u(0.2, 0.5)):
                self.canvas.line_w((s * d, y, z0), (s * d, y, min(z1, z0 + 40)), joint)

    def fence(self, s: int, d: float, z0: float, z1: float, hgt: float, style: str, colour: np.ndarray) -> None:
        """A fence: posts, rails and pickets/mesh/bars (see-through) or solid panels."""
        col = self.atm.haze(colour * self.atm.side_light[s], z0)
        x = s * d
        z1 = min(z1, z0 + 60)

        def verticals(step: float, y0: float, y1: float) -> Tuple[np.ndarray, np.ndarray]:
            zs = np.arange(z0, z1 + 1e-6, step)
            return (np.stack([np.full_like(zs, x), np.full_like(zs, y0), zs],
                             1), np.stack([np.full_like(zs, x), np.full_like(zs, y1), zs], 1))

        if style == 'panel':
            self.canvas.fill_w([quad_x(x, 0.05, hgt, z0, z1)], FENCE, col)
            for z in np.arange(z0, min(z1, z0 + 25), self.r.u(0.12, 0.3)):
                self.canvas.line_w((x, 0.05, z), (x, hgt, z), col * 0.75)
        elif style == 'pickets':
            self.canvas.segs_w(*verticals(self.r.u(0.12, 0.22), 0.05, hgt), 0.05, FENCE, col, min_px=0.6)
        elif style == 'bars':
            self.canvas.segs_w(*verticals(self.r.u(0.12, 0.2), 0.05, hgt), 0.025, FENCE, col, min_px=0.6)
        else:
            step = self.r.u(0.18, 0.3)
            self.canvas.segs_w(*verticals(step, 0.05, hgt), 0.015, FENCE, col, min_px=0.5)
            ys = np.arange(0.05, hgt, step)
            self.canvas.segs_w(
                np.stack([np.full_like(ys, x), ys, np.full_like(ys, z0)], 1),
                np.stack([np.full_like(ys, x), ys, np.full_like(ys, z1)], 1),
                0.015,
                FENCE,
                col,
                min_px=0.5)
        for y in (0.15, hgt - 0.05):
            self.canvas.seg_w((x, y, z0), (x, y, z1), 0.06, FENCE, col)
        self.canvas.segs_w(*verticals(self.r.u(2.0, 3.0), 0.0, hgt + 0.05), 0.08, FENCE, col * 0.9)

    def guard_rail(self, s: int, d: float, z0: float, z1: float) -> None:
        """A guard rail along the road: void (ignore) in Cityscapes."""
        col = self.atm.haze((170, 172, 176), z0)
        x = s * d
        self.canvas.fill_w([quad_x(x, 0.45, 0.75, z0, z1)], IGNORE_INDEX, col)
        for z in np.arange(z0, min(z1, 80), 4.0):
            self.canvas.seg_w((x, 0.0, z), (x, 0.75, z), 0.1, IGNORE_INDEX, col * 0.7)
