"""Street furniture: poles with street lights, signs and traffic lights, and void clutter (bins, benches)."""
import numpy as np

from ..camera import quad_z
from ..frame import Painter
from ..palettes import METAL, TOP_CLOTHES
from ..raster import circle
from ..spec import IGNORE_INDEX, LIGHT, POLE, SIGN

__all__ = ['StreetFurniturePainter']


class StreetFurniturePainter(Painter):
    """Draws poles (pole), traffic lights (traffic light), signs (traffic sign) and void street furniture."""

    def pole(self, x: float, z: float, kind: str) -> None:
        """A pole with its attachment: street light arm, traffic sign(s), traffic light or catenary mast."""
        col = self.atm.haze(self.r.pick(METAL), z)
        s = 1.0 if x > 0 else -1.0
        y0 = self.street.curb_h
        if kind == 'light':
            hp = self.r.u(6, 9)
            self.canvas.seg_w((x, y0, z), (x, hp, z), self.r.u(0.14, 0.24), POLE, col)
            arm = self.r.u(1.0, 2.5)
            self.canvas.seg_w((x, hp - 0.3, z), (x - s * arm, hp, z), 0.09, POLE, col)
            head = self.cam.frontal((x - s * arm, hp, z),
                                    np.array([[-0.3, 0.0], [0.3, 0.0], [0.25, -0.15], [-0.25, -0.15]]))
            self.canvas.fill([head], POLE, col)
            if self.r.p(0.25):
                self.sign(x, self.r.u(2.2, 3.0), z, back=self.r.p(0.2))
        elif kind == 'sign':
            hp = self.r.u(2.2, 3.4)
            self.canvas.seg_w((x, y0, z), (x, hp, z), self.r.u(0.06, 0.1), POLE, col)
            self.sign(x, hp - 0.35, z, back=self.r.p(0.2))
            if self.r.p(0.35):
                self.sign(x, hp - 1.05, z, back=False, small=True)
        elif kind == 'tlight':
            hp = self.r.u(3.0, 4.5)
            self.canvas.seg_w((x, y0, z), (x, hp, z), self.r.u(0.1, 0.18), POLE, col)
            back = self.r.p(0.25)
            self.traffic_light(x, hp, z, back)
            if self.r.p(0.3):
                # Mast arm reaching over the road with a second head.
                arm = self.r.u(3, 6)
                self.canvas.seg_w((x, hp - 0.1, z), (x - s * arm, hp - 0.1, z), 0.12, POLE, col)
                self.traffic_light(x - s * arm, hp - 0.2, z, back)
            if self.r.p(0.4):
                # Pedestrian signal at eye height.
                self.traffic_light(x, 2.4, z, back, small=True)
            if self.r.p(0.3):
                self.sign(x, hp + 0.45, z, back=back, small=True)
        else:  # catenary mast between road and railway, its arm reaching out over the track
            hp = self.r.u(6, 8)
            self.canvas.seg_w((x, 0.0, z), (x, hp, z), 0.25, POLE, col)
            self.canvas.seg_w((x, hp - 0.5, z), (x + s * 3.2, hp - 0.5, z), 0.1, POLE, col)

    def traffic_light(self, x: float, y_top: float, z: float, back: bool, small: bool = False) -> None:
        """A signal head facing the camera (lamps lit) or away (dark housing only)."""
        w, h = (0.26, 0.62) if small else (0.34, 0.95)
        housing = self.r.pick(((30, 30, 32), (30, 30, 32), (190, 160, 40), (60, 70, 60)))
        housing = self.atm.haze(self.r.jit(housing, 6), z)
        pts = np.array([[-w / 2, 0], [w / 2, 0], [w / 2, -h], [-w / 2, -h]])
        self.canvas.fill([self.cam.frontal((x, y_top, z), pts)], LIGHT, housing)
        if back:
            return
        n = 2 if small else 3
        lit = int(self.r.rng.integers(n))
        on = [(245, 50, 40), (250, 190, 40), (70, 235, 130)] if n == 3 else [(245, 50, 40), (70, 235, 130)]
        r = w * 0.33
        for i in range(n):
            cy = -h * (i + 0.5) / n
            c = self.cam.frontal((x, y_top, z), np.array([[0.0, cy]]))[0]
            col = on[i] if i == lit else (55, 45, 45)
            # Lamps glow, so they fade less with distance than surfaces do.
            self.canvas.fill([circle(c[0], c[1], r * self.cam.f / z)], LIGHT, self.atm.haze(col, z * 0.5))

    def sign(self, x: float, yc: float, z: float, back: bool, small: bool = False) -> None:
        """A traffic sign board facing the camera; seen from the back it is a plain grey shape."""
        kind = self.r.choice(['prohibit', 'mandatory', 'warning', 'yield', 'stop', 'info', 'direction'],
                             [0.22, 0.15, 0.18, 0.08, 0.05, 0.2, 0.12])
        r = self.r.u(0.28, 0.4) * (0.75 if small else 1.0)
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

        outer = self.cam.frontal(anchor, shape(kind, 1.0))
        if back:
            self.canvas.fill([outer], SIGN, self.atm.haze(self.r.jit((140, 142, 146), 10), z))
            return
        if kind in ('prohibit', 'warning', 'yield'):
            self.canvas.fill([outer], SIGN, self.atm.haze(red, z))
            self.canvas.fill([self.cam.frontal(anchor, shape(kind, 0.72))], SIGN, self.atm.haze(white, z))
        elif kind == 'mandatory':
            self.canvas.fill([outer], SIGN, self.atm.haze(blue, z))
            arrow = np.array([[-0.1, -0.6], [0.1, -0.6], [0.1, 0.2], [0.3, 0.2], [0, 0.6], [-0.3, 0.2], [-0.1, 0.2]
                              ]) * r
            self.canvas.fill([self.cam.frontal(anchor, arrow)], SIGN, self.atm.haze(white, z))
        elif kind == 'stop':
            self.canvas.fill([outer], SIGN, self.atm.haze(red, z))
            bar = np.array([[-0.6, -0.12], [0.6, -0.12], [0.6, 0.12], [-0.6, 0.12]]) * r
            self.canvas.fill([self.cam.frontal(anchor, bar)], SIGN, self.atm.haze(white, z))
        elif kind == 'info':
            col = self.r.pick((blue, white, (240, 200, 30)))
            self.canvas.fill([outer], SIGN, self.atm.haze(col, z))
            self.canvas.fill([self.cam.frontal(anchor, shape(kind, 0.6))], SIGN,
                             self.atm.haze(white if col is blue else (40, 40, 40), z))
        else:
            col = self.r.pick(((240, 200, 30), (30, 110, 60), (235, 235, 232)))
            self.canvas.fill([outer], SIGN, self.atm.haze(col, z))
            band = np.array([[-1.8, -0.15], [1.4, -0.15], [1.4, 0.15], [-1.8, 0.15]]) * r
            self.canvas.fill([self.cam.frontal(anchor, band)], SIGN, self.atm.haze((40, 40, 40), z))

    def clutter(self, x: float, y: float, z: float) -> None:
        """Street furniture that Cityscapes labels as void: bins, advertising columns, benches."""
        kind = self.r.choice(['bin', 'column', 'bench', 'box'], [0.45, 0.15, 0.2, 0.2])
        col = self.atm.haze(
            self.r.jit(self.r.pick(((40, 80, 50), (90, 90, 95), (40, 60, 120), (220, 120, 30), (150, 150, 150))), 10),
            z)
        if kind == 'bin':
            self.canvas.box(x - 0.3, x + 0.3, y, y + 1.05, z, z + 0.6, IGNORE_INDEX, col)
        elif kind == 'box':
            self.canvas.box(x - 0.4, x + 0.4, y, y + 1.3, z, z + 0.5, IGNORE_INDEX, col)
        elif kind == 'bench':
            self.canvas.box(x - 0.25, x + 0.25, y + 0.4, y + 0.5, z, z + 1.8, IGNORE_INDEX, (110, 80, 55))
            self.canvas.box(x - 0.25, x + 0.25, y, y + 0.4, z + 0.1, z + 0.2, IGNORE_INDEX, (60, 60, 60))
        else:
            self.canvas.box(x - 0.6, x + 0.6, y, y + 3.0, z, z + 1.2, IGNORE_INDEX, (120, 120, 120))
            for k in range(3):
                yy = y + 0.5 + k * 0.8
                self.canvas.fill_w([quad_z(z, x - 0.55, x + 0.55, yy, yy + 0.7)], IGNORE_INDEX,
                                   self.atm.haze(self.r.jit(self.r.pick(TOP_CLOTHES), 30), z))
