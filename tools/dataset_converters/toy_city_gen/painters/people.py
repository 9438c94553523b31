"""People and two-wheelers: pedestrians (person), bicycles and motorcycles with or without a rider (rider)."""
from typing import Dict, Optional, Sequence, Tuple

import numpy as np

from ..camera import Z_NEAR
from ..frame import Painter
from ..palettes import BOTTOM_CLOTHES, CAR_COLOURS, HAIR, SKIN, TOP_CLOTHES
from ..raster import circle, seg_px
from ..spec import BICYCLE, MOTORCYCLE, PERSON, RIDER

__all__ = ['PeoplePainter']


class PeoplePainter(Painter):
    """Draws stick-and-slab figures from keypoints and the two-wheelers they stand beside or ride."""

    def _body(self,
              anchor: Sequence[float],
              kp: Dict[str, Tuple[float, float]],
              scale: float,
              label: int,
              colours: Dict[str, np.ndarray],
              torso_w: Tuple[float, float],
              helmet: bool = False) -> None:
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
        s = self.cam.f / max(z, Z_NEAR)

        def P(name: str) -> np.ndarray:
            return self.cam.frontal(anchor, np.array([kp[name]]) * scale)[0]

        leg_w = max(0.12 * scale * s, 1.0)
        arm_w = max(0.075 * scale * s, 1.0)
        polys_bottom = []
        for side in ('l', 'r'):
            polys_bottom.append(seg_px(P('hip_' + side), P('knee_' + side), leg_w, leg_w * 0.9))
            polys_bottom.append(seg_px(P('knee_' + side), P('foot_' + side), leg_w * 0.9, leg_w * 0.8))
        self.canvas.fill(polys_bottom, label, colours['bottom'])
        shoes = [circle(*P('foot_' + side), max(0.05 * scale * s, 0.6), 8) for side in ('l', 'r')]
        self.canvas.fill(shoes, label, (30, 28, 28))
        hip, neck = P('hip'), P('neck')
        d = neck - hip
        n = float(np.hypot(*d)) or 1.0
        perp = np.array([-d[1], d[0]]) / n
        hw = max(torso_w[0] * scale * s, 1.0) / 2
        sw = max(torso_w[1] * scale * s, 1.0) / 2
        torso = np.stack([hip + perp * hw, neck + perp * sw, neck - perp * sw, hip - perp * hw])
        self.canvas.fill([torso], label, colours['top'])
        arms = [seg_px(P('sh_' + side), P('hand_' + side), arm_w, arm_w * 0.85) for side in ('l', 'r')]
        self.canvas.fill(arms, label, colours['top'] * 0.9)
        head = P('head')
        hr = max(0.11 * scale * s, 0.8)
        if helmet:
            self.canvas.fill([circle(head[0], head[1], hr * 1.2)], label, colours['helmet'])
        else:
            self.canvas.fill([circle(head[0], head[1] - hr * 0.1, hr)], label, colours['hair'])
            self.canvas.fill([circle(head[0], head[1] + hr * 0.12, hr * 0.86)], label, colours['skin'])

    def _person_colours(self, z: float) -> Dict[str, np.ndarray]:
        """Clothes, skin, hair and helmet colours of one figure at depth ``z``."""
        return {
            'top':
            self.atm.haze(self.r.jit(self.r.pick(TOP_CLOTHES), 12), z),
            'bottom':
            self.atm.haze(self.r.jit(self.r.pick(BOTTOM_CLOTHES), 10), z),
            'skin':
            self.atm.haze(self.r.jit(self.r.pick(SKIN), 8), z),
            'hair':
            self.atm.haze(self.r.jit(self.r.pick(HAIR), 8), z),
            'helmet':
            self.atm.haze(
                self.r.jit(
                    self.r.pick(((30, 30, 30), (220, 220, 220), (200, 40, 40), (40, 80, 170), (230, 200, 40))), 8), z),
        }

    def person(self, x: float, y: float, z: float, facing: Optional[str] = None) -> None:
        """A pedestrian standing or walking, seen from the front, back or side."""
        if facing is None:
            facing = self.r.choice(['side', 'front', 'back'], [0.5, 0.25, 0.25])
        h = self.r.u(1.55, 1.95) if self.r.p(0.9) else self.r.u(1.0, 1.35)
        sc = h / 1.75
        cols = self._person_colours(z)
        if facing == 'side':
            dr = self.r.pick([-1.0, 1.0])
            st = self.r.u(0.0, 0.3)
            kp = {
                'hip_l': (0, 0.92),
                'hip_r': (0, 0.92),
                'knee_l': (dr * st * 0.5, 0.5),
                'knee_r': (-dr * st * 0.5, 0.5),
                'foot_l': (dr * st, 0.05),
                'foot_r': (-dr * st, 0.05),
                'hip': (0, 0.9),
                'neck': (0.02 * dr, 1.45),
                'sh_l': (0.0, 1.4),
                'sh_r': (0.0, 1.4),
                'hand_l': (-dr * st * 0.7, 0.92),
                'hand_r': (dr * st * 0.5, 0.92),
                'head': (0.03 * dr, 1.63)
            }
            tw = (0.22, 0.25)
        else:
            sp = self.r.u(0.0, 0.08)
            kp = {
                'hip_l': (-0.1, 0.92),
                'hip_r': (0.1, 0.92),
                'knee_l': (-0.11, 0.5),
                'knee_r': (0.11, 0.5),
                'foot_l': (-0.12 - sp, 0.05),
                'foot_r': (0.12 + sp, 0.05),
                'hip': (0, 0.9),
                'neck': (0, 1.45),
                'sh_l': (-0.22, 1.4),
                'sh_r': (0.22, 1.4),
                'hand_l': (-0.27, 0.9),
                'hand_r': (0.27, 0.9),
                'head': (0, 1.63)
            }
            tw = (0.36, 0.46)
        if facing == 'back':
            cols['skin'] = cols['hair']
        self._body((x, y, z), kp, sc, PERSON, cols, tw)
        if self.r.p(0.2):
            # Bag or backpack (part of the person in Cityscapes).
            bag = np.array([[0.12, 0.95], [0.32, 0.95], [0.32, 1.25], [0.12, 1.25]]) * sc
            if facing == 'back':
                bag = np.array([[-0.18, 1.0], [0.18, 1.0], [0.18, 1.38], [-0.18, 1.38]]) * sc
            self.canvas.fill([self.cam.frontal((x, y, z), bag)], PERSON,
                             self.atm.haze(self.r.jit(self.r.pick(TOP_CLOTHES), 10), z))

    def two_wheeler(self, x: float, y: float, z: float, kind: str, view: str, direction: int, rider: bool) -> None:
        """A bicycle or motorcycle (side or rear view), optionally with a rider (rider label)."""
        label = BICYCLE if kind == 'bicycle' else MOTORCYCLE
        anchor = (x, y, z)
        s = self.cam.f / max(z, Z_NEAR)
        dr = float(direction)
        frame = self.atm.haze(self.r.jit(self.r.pick(CAR_COLOURS if kind == 'motorcycle' else TOP_CLOTHES), 12), z)
        tyre = self.atm.haze((24, 24, 26), z)

        def P(pt: Tuple[float, float]) -> np.ndarray:
            return self.cam.frontal(anchor, np.array([pt]))[0]

        def tube(a: Tuple[float, float], b: Tuple[float, float], w: float, col: Sequence[float]) -> None:
            self.canvas.fill([seg_px(P(a), P(b), max(w * s, 1.0))], label, col)

        def wheel(c: Tuple[float, float], r: float, t: float) -> None:
            cc = P(c)
            ro = r * s
            ri = max(ro - max(t * s, 1.0), 0.0)
            polys = [circle(cc[0], cc[1], ro)]
            if ri > 0.5:
                polys.append(circle(cc[0], cc[1], ri))
            self.canvas.fill(polys, label, tyre, evenodd=True)

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
                kp = {
                    'hip': (-0.2 * dr, 1.0),
                    'neck': (0.15 * dr, 1.5),
                    'sh_l': (0.15 * dr, 1.47),
                    'sh_r': (0.15 * dr, 1.47),
                    'hand_l': (0.40 * dr, 1.05),
                    'hand_r': (0.40 * dr, 1.05),
                    'head': (0.26 * dr, 1.66),
                    'hip_l': (-0.2 * dr, 1.0),
                    'hip_r': (-0.2 * dr, 1.0),
                    'knee_l': (0.08 * dr, 0.74),
                    'knee_r': (-0.02 * dr, 0.8),
                    'foot_l': (0.08 * dr, 0.2),
                    'foot_r': (-0.1 * dr, 0.42)
                }
            else:
                rh, fh = (-0.7 * dr, 0.32), (0.72 * dr, 0.32)
                wheel(rh, 0.32, 0.11)
                wheel(fh, 0.32, 0.11)
                body = np.array([[-0.85, 0.55], [-0.6, 0.8], [-0.1, 0.85], [0.3, 0.95], [0.5, 0.9], [0.45, 0.55],
                                 [0.1, 0.35], [-0.4, 0.4]]) * [dr, 1]
                self.canvas.fill([self.cam.frontal(anchor, body)], label, frame)
                engine = np.array([[-0.2, 0.25], [0.3, 0.25], [0.35, 0.6], [-0.15, 0.65]]) * [dr, 1]
                self.canvas.fill([self.cam.frontal(anchor, engine)], label, (50, 50, 52))
                tube((0.5 * dr, 0.95), fh, 0.06, (90, 90, 92))
                tube((-0.3 * dr, 0.3), (-0.8 * dr, 0.45), 0.07, (150, 150, 152))
                tube((0.45 * dr, 1.0), (0.55 * dr, 1.12), 0.04, (40, 40, 40))
                kp = {
                    'hip': (-0.25 * dr, 0.92),
                    'neck': (0.05 * dr, 1.45),
                    'sh_l': (0.05 * dr, 1.42),
                    'sh_r': (0.05 * dr, 1.42),
                    'hand_l': (0.48 * dr, 1.05),
                    'hand_r': (0.48 * dr, 1.05),
                    'head': (0.15 * dr, 1.62),
                    'hip_l': (-0.25 * dr, 0.92),
                    'hip_r': (-0.25 * dr, 0.92),
                    'knee_l': (0.2 * dr, 0.75),
                    'knee_r': (0.15 * dr, 0.8),
                    'foot_l': (0.0, 0.4),
                    'foot_r': (-0.05 * dr, 0.45)
                }
            tw = (0.21, 0.24)
        else:
            if kind == 'bicycle':
                tube((0.0, 0.0), (0.0, 0.7), 0.045, tyre)
                tube((0.0, 0.6), (0.0, 0.95), 0.04, frame)
                tube((-0.08, 0.95), (0.08, 0.95), 0.06, (30, 30, 30))
                tube((-0.28, 1.05), (0.28, 1.05), 0.035, (40, 40, 40))
                kp = {
                    'hip': (0, 1.0),
                    'neck': (0, 1.45),
                    'sh_l': (-0.2, 1.42),
                    'sh_r': (0.2, 1.42),
                    'hand_l': (-0.27, 1.05),
                    'hand_r': (0.27, 1.05),
                    'head': (0, 1.6),
                    'hip_l': (-0.1, 1.0),
                    'hip_r': (0.1, 1.0),
                    'knee_l': (-0.17, 0.7),
                    'knee_r': (0.16, 0.62),
                    'foot_l': (-0.11, 0.32),
                    'foot_r': (0.1, 0.2)
                }
            else:
                tube((0.0, 0.0), (0.0, 0.62), 0.14, tyre)
                body = np.array([[-0.22, 0.5], [0.22, 0.5], [0.25, 0.95], [-0.25, 0.95]])
                self.canvas.fill([self.cam.frontal(anchor, body)], label, frame)
                tail = np.array([[-0.08, 0.78], [0.08, 0.78], [0.08, 0.86], [-0.08, 0.86]])
                self.canvas.fill([self.cam.frontal(anchor, tail)], label, self.atm.haze((200, 30, 30), z * 0.5))
                tube((-0.4, 1.1), (0.4, 1.1), 0.04, (40, 40, 40))
                kp = {
                    'hip': (0, 0.95),
                    'neck': (0, 1.45),
                    'sh_l': (-0.22, 1.42),
                    'sh_r': (0.22, 1.42),
                    'hand_l': (-0.38, 1.1),
                    'hand_r': (0.38, 1.1),
                    'head': (0, 1.62),
                    'hip_l': (-0.12, 0.95),
                    'hip_r': (0.12, 0.95),
                    'knee_l': (-0.3, 0.7),
                    'knee_r': (0.3, 0.7),
                    'foot_l': (-0.2, 0.45),
                    'foot_r': (0.2, 0.45)
                }
            tw = (0.34, 0.44)
        if rider:
            cols = self._person_colours(z)
            helmet = kind == 'motorcycle' or self.r.p(0.3)
            self._body(anchor, kp, self.r.u(0.92, 1.08), RIDER, cols, tw, helmet=helmet)
