"""Vehicles: cars and vans (car), trucks, buses, trams and trains, and the camera car's own bonnet (void)."""
from typing import Optional

import numpy as np

from ..camera import quad_x, quad_y, quad_z
from ..frame import Painter
from ..palettes import BIG_VEHICLE_COLOURS, CAR_COLOURS, DARK, GLASS
from ..spec import BUS, CAR, IGNORE_INDEX, TRAIN, TRUCK

__all__ = ['VehiclePainter']


class VehiclePainter(Painter):
    """Draws road vehicles as shaded boxes with glass, lamps and wheels."""

    def _wheel_w(self, x: float, zc: float, r: float, label: int) -> None:
        """A wheel on a vehicle's side face (a circle in the plane X = x)."""
        t = np.linspace(0, 2 * np.pi, 20, endpoint=False)
        pts = np.stack([np.full_like(t, x), r + r * np.sin(t), zc + r * np.cos(t)], 1)
        self.canvas.fill_w([pts], label, DARK)
        rim = np.stack([np.full_like(t, x), r + 0.55 * r * np.sin(t), zc + 0.55 * r * np.cos(t)], 1)
        self.canvas.fill_w([rim], None, (110, 110, 112))

    def vehicle(self, kind: str, xc: float, z0: float, facing: str) -> None:
        """A car, van, truck or bus seen from behind (``facing='rear'``) or from the front."""
        if kind in ('car', 'van'):
            self.car(xc, z0, facing, van=kind == 'van')
        elif kind == 'truck':
            self.truck(xc, z0, facing)
        else:
            self.bus(xc, z0, facing)

    def _shadow_under(self, x0: float, x1: float, z0: float, z1: float) -> None:
        """The dark contact shadow on the road under a vehicle's footprint."""
        self.canvas.darken([quad_y(0.0, x0 - 0.15, x1 + 0.15, max(z0 - 0.3, 0.6), z1 + 0.3)], self.r.u(0.3, 0.5))

    def _side_x(self, x0: float, x1: float) -> Optional[float]:
        """X of the visible side face of a box, or None when it straddles the camera axis."""
        return x1 if x1 < 0 else (x0 if x0 > 0 else None)

    def car(self, xc: float, z0: float, facing: str, van: bool = False) -> None:
        """A car: dark underbody and wheels, body box, glass cabin, lights and plate."""
        w, length, h = self.r.u(1.7, 1.9), self.r.u(3.9, 4.8), self.r.u(1.4, 1.55)
        if van:
            w, length, h = self.r.u(1.9, 2.0), self.r.u(4.8, 5.5), self.r.u(1.9, 2.2)
        x0, x1, z1 = xc - w / 2, xc + w / 2, z0 + length
        col = self.atm.haze(self.r.jit(self.r.pick(CAR_COLOURS), 10), z0)
        glass = self.atm.haze(self.r.jit(self.r.pick(GLASS), 8), z0)
        belt = h * (0.55 if van else 0.62)
        self._shadow_under(x0, x1, z0, z1)
        self.canvas.box(x0 + 0.08, x1 - 0.08, 0.0, 0.45, z0 + 0.25, z1 - 0.25, CAR, DARK)
        if belt < self.cam.ch:
            self.canvas.fill_w([quad_y(belt, x0, x1, z0, z1)], CAR, np.clip(col * 0.8 + self.atm.haze_col * 0.25, 0,
                                                                            255))
        xs = self._side_x(x0, x1)
        if xs is not None:
            self.canvas.fill_w([quad_x(xs, 0.3, belt, z0, z1)], CAR, col * 0.85)
            for zc in (z0 + 0.85, z1 - 0.85):
                self._wheel_w(xs, zc, 0.32, CAR)
        # Cabin: the window facing the camera is the rear window or the (further inset) windscreen.
        near_in, far_in = (self.r.u(0.5, 0.9), self.r.u(1.2, 1.6)) if facing == 'rear' else \
            (self.r.u(1.2, 1.6), self.r.u(0.5, 0.9))
        if van:
            near_in, far_in = (0.1, 1.0) if facing == 'rear' else (0.8, 0.2)
        c0, c1 = z0 + near_in, z1 - far_in
        cx0, cx1 = x0 + 0.1, x1 - 0.1
        faces = self.canvas.box(cx0, cx1, belt, h, c0, c1, CAR, glass, side_shade=1.0, top_shade=1.0)
        if 'top' in faces:
            self.canvas.fill_w([faces['top']], CAR, col)
        if 'side' in faces:
            # B-pillar in body colour.
            zm = (c0 + c1) / 2
            self.canvas.fill_w([quad_x(faces['side'][0, 0], belt, h, zm - 0.08, zm + 0.08)], CAR, col * 0.85)
            self.canvas.fill_w([quad_x(faces['side'][0, 0], h - 0.06, h, c0, c1)], CAR, col * 0.85)
        self.canvas.fill_w([quad_z(c0, cx0, cx1, h - 0.06, h)], CAR, col)
        # Body face towards the camera, with lamps, plate and bumper.
        self.canvas.fill_w([quad_z(z0, x0, x1, 0.3, belt)], CAR, col)
        self.canvas.fill_w([quad_z(z0, x0, x1, 0.3, 0.45)], CAR, col * 0.55)
        lamp = (185, 25, 25) if facing == 'rear' else (235, 235, 220)
        ly0, ly1 = belt - 0.22, belt - 0.06
        self.canvas.fill_w([quad_z(z0, x0 + 0.05, x0 + 0.35, ly0, ly1),
                            quad_z(z0, x1 - 0.35, x1 - 0.05, ly0, ly1)], CAR, self.atm.haze(lamp, z0 * 0.5))
        self.canvas.fill_w([quad_z(z0, xc - 0.26, xc + 0.26, 0.45, 0.57)], CAR, self.atm.haze((225, 225, 215), z0))
        if facing == 'front':
            self.canvas.fill_w([quad_z(z0, xc - 0.35, xc + 0.35, 0.6, belt - 0.08)], CAR, col * 0.4)

    def truck(self, xc: float, z0: float, facing: str) -> None:
        """A truck: cab plus a tall cargo box; seen from behind mostly the box door is visible."""
        w = 2.45
        lb, hb = self.r.u(5, 9), self.r.u(3.2, 3.8)
        x0, x1 = xc - w / 2, xc + w / 2
        box_col = self.atm.haze(self.r.jit(self.r.pick(BIG_VEHICLE_COLOURS), 10), z0)
        cab_col = self.atm.haze(self.r.jit(self.r.pick(BIG_VEHICLE_COLOURS), 10), z0)
        glass = self.atm.haze(self.r.jit(self.r.pick(GLASS), 8), z0)
        if facing == 'rear':
            box_z, cab_z = (z0, z0 + lb), (z0 + lb + 0.3, z0 + lb + 2.5)
        else:
            cab_z, box_z = (z0, z0 + 2.2), (z0 + 2.5, z0 + 2.5 + lb)
        self._shadow_under(x0, x1, z0, z0 + lb + 2.5)
        parts = sorted([('cab', cab_z), ('box', box_z)], key=lambda p: -p[1][0])
        for name, (a, b) in parts:
            self.canvas.box(x0 + 0.1, x1 - 0.1, 0.0, 1.0, a + 0.2, b - 0.2, TRUCK, DARK)
            xs = self._side_x(x0, x1)
            if name == 'cab':
                self.canvas.box(x0, x1, 0.5, 2.9, a, b, TRUCK, cab_col)
                if xs is not None:
                    self.canvas.fill_w([quad_x(xs, 1.8, 2.6, a + 0.2, b - 0.6)], TRUCK, glass)
                if facing == 'front':
                    self.canvas.fill_w([quad_z(a, x0 + 0.15, x1 - 0.15, 1.7, 2.7)], TRUCK, glass)
                    self.canvas.fill_w([quad_z(a, x0 + 0.4, x1 - 0.4, 0.7, 1.3)], TRUCK, cab_col * 0.45)
            else:
                self.canvas.box(x0, x1, 1.0, hb, a, b, TRUCK, box_col)
                if facing == 'rear':
                    self.canvas.line_w((xc, 1.05, a), (xc, hb - 0.05, a), box_col * 0.6)
                    for xl in (x0 + 0.1, x1 - 0.3):
                        self.canvas.fill_w([quad_z(a, xl, xl + 0.2, 1.05, 1.25)], TRUCK, self.atm.haze((190, 25, 25),
                                                                                                       a))
                if xs is not None and self.r.p(0.4):
                    # Company stripe along the box side.
                    self.canvas.fill_w([quad_x(xs, 1.8, 2.4, a + 0.3, b - 0.3)], TRUCK,
                                       self.atm.haze(self.r.pick(BIG_VEHICLE_COLOURS), a))
            if xs is not None:
                for zc in (a + 0.8, b - 0.8):
                    self._wheel_w(xs, zc, 0.5, TRUCK)

    def bus(self, xc: float, z0: float, facing: str) -> None:
        """A city bus: one long box with a continuous window band and pillars."""
        w, length, h = 2.55, (12.0 if self.r.p(0.8) else 18.0), self.r.u(3.0, 3.2)
        x0, x1, z1 = xc - w / 2, xc + w / 2, z0 + length
        col = self.atm.haze(self.r.jit(self.r.pick(BIG_VEHICLE_COLOURS), 8), z0)
        glass = self.atm.haze(self.r.jit(self.r.pick(GLASS), 8), z0)
        self._shadow_under(x0, x1, z0, z1)
        self.canvas.box(x0 + 0.1, x1 - 0.1, 0.0, 0.4, z0 + 0.2, z1 - 0.2, BUS, DARK)
        self.canvas.box(x0, x1, 0.3, h, z0, z1, BUS, col)
        xs = self._side_x(x0, x1)
        if xs is not None:
            self.canvas.fill_w([quad_x(xs, 1.15, 2.65, z0 + 0.5, z1 - 0.4)], BUS, glass)
            step = self.r.u(1.3, 2.0)
            for z in np.arange(z0 + 0.5, z1 - 0.4, step):
                self.canvas.fill_w([quad_x(xs, 1.15, 2.65, z, z + 0.14)], BUS, col * 0.85)
            if self.r.p(0.5):
                self.canvas.fill_w([quad_x(xs, 0.7, 0.95, z0, z1)], BUS,
                                   self.atm.haze(self.r.pick(BIG_VEHICLE_COLOURS), z0))
            for zc in (z0 + 2.5, z1 - 3.0):
                self._wheel_w(xs, zc, 0.5, BUS)
        if facing == 'front':
            self.canvas.fill_w([quad_z(z0, x0 + 0.1, x1 - 0.1, 0.95, 2.7)], BUS, glass)
            self.canvas.fill_w([quad_z(z0, x0 + 0.2, x1 - 0.2, 2.75, 3.0)], BUS, (25, 25, 25))
            self.canvas.fill_w([quad_z(z0, x0 + 0.5, x1 - 0.9, 2.82, 2.92)], BUS, self.atm.haze((250, 160, 40),
                                                                                                z0 * 0.5))
        else:
            self.canvas.fill_w([quad_z(z0, x0 + 0.15, x1 - 0.15, 2.0, 2.75)], BUS, glass)
            for xl in (x0 + 0.1, x1 - 0.3):
                self.canvas.fill_w([quad_z(z0, xl, xl + 0.2, 0.8, 1.3)], BUS, self.atm.haze((190, 25, 25), z0))

    def _rail_vehicle(self, x0: float, x1: float, y0: float, h: float, z0: float, length: float, facing: str,
                      pantograph: bool) -> None:
        """Shared body of trams and trains (train label): long box, window band, articulations."""
        z1 = z0 + length
        col = self.atm.haze(self.r.jit(self.r.pick(BIG_VEHICLE_COLOURS), 8), z0)
        glass = self.atm.haze(self.r.jit(self.r.pick(GLASS), 8), z0)
        self.canvas.box(x0 + 0.1, x1 - 0.1, y0 - 0.4, y0, z0 + 0.3, z1 - 0.3, TRAIN, DARK)
        self.canvas.box(x0, x1, y0, y0 + h, z0, z1, TRAIN, col)
        xs = self._side_x(x0, x1)
        wy0, wy1 = y0 + 0.7 + 0.1 * h, y0 + 0.72 * h
        if xs is not None:
            self.canvas.fill_w([quad_x(xs, wy0, wy1, z0 + 1.0, z1 - 0.5)], TRAIN, glass)
            step = self.r.u(1.8, 2.6)
            for z in np.arange(z0 + 1.0, z1 - 0.5, step):
                self.canvas.fill_w([quad_x(xs, wy0, wy1, z, z + 0.25)], TRAIN, col * 0.9)
            seg = self.r.u(8, 25)
            for z in np.arange(z0 + seg, z1 - 1, seg):
                self.canvas.fill_w([quad_x(xs, y0, y0 + h, z, z + 0.35)], TRAIN, col * 0.45)
            if self.r.p(0.6):
                stripe = self.atm.haze(self.r.pick(((200, 30, 30), (30, 60, 140), (240, 200, 40))), z0)
                self.canvas.fill_w([quad_x(xs, y0 + 0.35, y0 + 0.55, z0, z1)], TRAIN, stripe)
        self.canvas.fill_w([quad_z(z0, x0 + 0.15, x1 - 0.15, wy0, wy1 + 0.1)], TRAIN, glass)
        if facing == 'front':
            for xl in (x0 + 0.2, x1 - 0.4):
                self.canvas.fill_w([quad_z(z0, xl, xl + 0.2, y0 + 0.4, y0 + 0.6)], TRAIN,
                                   self.atm.haze((240, 240, 220), z0))
        if pantograph:
            xm = (x0 + x1) / 2
            zp = z0 + length * 0.3
            top = y0 + h
            self.canvas.seg_w((xm, top, zp), (xm, top + 1.0, zp + 0.8), 0.05, TRAIN, (60, 60, 60))
            self.canvas.seg_w((xm, top + 1.0, zp + 0.8), (xm, top + 1.2, zp), 0.05, TRAIN, (60, 60, 60))

    def tram(self, xc: float, z0: float, length: float, facing: str) -> None:
        """A tram in the street (Cityscapes labels trams as train)."""
        w = self.r.u(2.3, 2.65)
        self._shadow_under(xc - w / 2, xc + w / 2, z0, z0 + length)
        self._rail_vehicle(xc - w / 2, xc + w / 2, 0.4, self.r.u(2.9, 3.1), z0, length, facing, True)

    def train_far(self, s: int, d: float, z0: float, length: float) -> None:
        """A train on a railway beside the road, seen from the side at a distance."""
        w = 3.0
        x0, x1 = sorted((s * (d - w / 2), s * (d + w / 2)))
        self._rail_vehicle(x0, x1, 0.9, self.r.u(3.0, 3.4), z0, length, 'front', self.r.p(0.5))

    def ego_vehicle(self) -> None:
        """The camera car's bonnet across the bottom rows, labelled ignore as in Cityscapes."""
        hc = self.cam.h * self.r.u(0.05, 0.12)
        hs = hc * self.r.u(0.2, 0.6)
        xs = np.linspace(-1, self.cam.w + 1, 48)
        t = (xs - self.cam.w / 2) / (self.cam.w / 2)
        ys = self.cam.h - (hc - (hc - hs) * t**2)
        poly = np.concatenate([[[-1, self.cam.h + 1]], np.stack([xs, ys], 1), [[self.cam.w + 1, self.cam.h + 1]]])
        col = self.r.jit(self.r.pick(((30, 30, 32), (50, 50, 55), (150, 152, 156), (20, 24, 40))), 8)
        self.canvas.fill([poly], IGNORE_INDEX, col)
        # A band reflecting the scene right below the bonnet's edge.
        band = np.concatenate([np.stack([xs, ys], 1), np.stack([xs, ys + hc * 0.25], 1)[::-1]])
        self.canvas.fill([band], None, np.clip(col * 0.7 + self.atm.haze_col * 0.3, 0, 255))
