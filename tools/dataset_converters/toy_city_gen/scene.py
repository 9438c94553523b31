"""Scene planning: what stands where along the street, queued for the painter's algorithm, then drawn.

A straight street seen from a car's roof camera: the planner chooses the road's cross-section (:func:`plan_street`),
then for each side a style (urban, suburban, open) with buildings, boundaries, trees, poles, people and street
furniture, then the traffic on the road. Every object is queued with its band and depth and drawn afterwards, far
to near within a band, by the painter that knows it.
"""
import functools
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np

from .camera import Camera
from .frame import Draws, Frame, Street
from .materials import Atmosphere, Materials, NoiseBank
from .painters import (BuildingPainter, GroundPainter, PeoplePainter, StreetFurniturePainter, VegetationPainter,
                       VehiclePainter)
from .palettes import FACADE_COLOURS, FENCE_COLOURS
from .raster import Canvas
from .spec import toy_city_sample_rng, validate_image_size

__all__ = ['plan_street', 'Scene', 'render_toy_city_sample']

# Painter's-algorithm bands, drawn in this order (far to near within a band). On a straight street an
# object can only cover objects in its own or an earlier band, because the bands are ordered by lateral
# distance from the camera axis: facades, then yards in front of them (front gardens, verges, catenary
# masts), then the boundary line (walls, fences, hedges), then the sidewalk, then the road.
BAND_FACADE, BAND_YARD, BAND_BOUNDARY, BAND_SIDEWALK, BAND_ROAD = range(5)

# A queued drawing: (band, depth, plan order, draw).
Queued = Tuple[int, float, int, Callable[[], None]]


def plan_street(r: Draws) -> Street:
    """Chooses the road cross-section: lanes, parking lanes, bike lane, curb, street end.

    Args:
        r: The image's random draws.

    Returns:
        The street plan.
    """
    lane_w = r.u(2.9, 3.5)
    n_left = int(r.choice([0, 1, 2], [0.12, 0.55, 0.33]))
    park = {-1: r.p(0.4), 1: r.p(0.45)}
    bike_lane = (not park[1]) and r.p(0.3)
    right = lane_w / 2 + (2.2 if park[1] else 0) + (1.5 if bike_lane else 0) + r.u(0.1, 0.4)
    left = lane_w / 2 + n_left * lane_w + (2.2 if park[-1] else 0) + r.u(0.1, 0.4)
    curb_h = r.u(0.08, 0.16)
    z_end = r.u(70, 220) if r.p(0.5) else None
    cross_w = r.u(8, 14)
    # Sidewalks and side buildings stop at the cross street.
    z_street = (z_end - cross_w - 3) if z_end else 400.0
    zebra = r.u(10, 35) if r.p(0.2) else None
    tram = n_left >= 1 and r.p(0.06)
    road_edge = {-1: left, 1: right}
    return Street(lane_w, n_left, park, bike_lane, road_edge, curb_h, z_end, cross_w, z_street, zebra, tram, -lane_w)


class Scene:
    """Plans one street scene and draws it with the object painters.

    Args:
        frame: The rendering context (its ``street`` is planned here).
    """

    def __init__(self, frame: Frame) -> None:
        self.frame = frame
        self.r = frame.r
        self.atm = frame.atm
        self.buildings = BuildingPainter(frame)
        self.veg = VegetationPainter(frame)
        self.furniture = StreetFurniturePainter(frame)
        self.people = PeoplePainter(frame)
        self.vehicles = VehiclePainter(frame)
        self.ground = GroundPainter(frame, self.buildings)
        self._seq = 0

    @property
    def street(self) -> Street:
        """The street plan."""
        return self.frame.street

    def render(self) -> Tuple[np.ndarray, np.ndarray]:
        """Plans and draws the whole scene.

        Returns:
            ``(image, label)``: ``(H, W, 3)`` uint8 RGB and ``(H, W)`` uint8 train ids / 255.
        """
        frame = self.frame
        frame.street = plan_street(self.r)
        sides = [self._plan_side(-1), self._plan_side(1)]
        self.ground.sky()
        self.ground.ground(sides)
        self.ground.cast_shadows(sides)
        self.ground.background(sides)
        # Painter's algorithm: by lateral band first (see BAND_*), far to near within a band.
        queue: List[Queued] = []
        for side in sides:
            queue.extend(side['objects'])
        queue.extend(self._plan_road_objects(sides))
        queue.sort(key=lambda o: (o[0], -o[1], o[2]))
        for _, _, _, draw in queue:
            draw()
        if self.r.p(0.7):
            self.vehicles.ego_vehicle()
        return frame.cam.develop(frame.canvas.img, self.r, frame.noise), frame.canvas.lbl

    def _add(self, objects: List[Queued], band: int, z: float, fn: Callable[..., None], *args: Any,
             **kwargs: Any) -> None:
        """Queues ``fn(*args, **kwargs)`` for drawing in ``band`` at depth ``z`` (ties keep plan order)."""
        self._seq += 1
        objects.append((band, float(z), self._seq, functools.partial(fn, *args, **kwargs)))

    def _plan_side(self, s: int) -> Dict[str, Any]:
        """Plans one side of the street (s = -1 left, +1 right): ground strips and standing objects."""
        side: Dict[str, Any] = {'s': s, 'objects': [], 'buildings': [], 'rail': None, 'D_f': None}
        objs = side['objects']
        d_r = self.street.road_edge[s]
        style = self.r.choice(['urban', 'suburban', 'open'], [0.57, 0.29, 0.14])
        if style == 'open':
            sw = 0.0 if self.r.p(0.5) else self.r.u(1.2, 2.5)
        else:
            sw = self.r.u(1.8, 5.0)
        d_o = d_r + sw
        side.update(style=style, D_r=d_r, D_o=d_o, sw=sw, front='terrain')
        z_lim = self.street.z_street

        if style == 'urban':
            setback = 0.0 if self.r.p(0.6) else self.r.u(1.5, 5.0)
            d_f = d_o + setback
            if setback and self.r.p(0.3):
                side['front'] = 'sidewalk'
            z = self.r.u(-6, 1)
            while z < z_lim:
                if z > 5 and self.r.p(0.12):
                    gl = self.r.u(3, 12)
                    kind = self.r.choice(['wall', 'fence', 'hedge', 'none'], [0.35, 0.35, 0.1, 0.2])
                    self._plan_boundary(objs, s, d_o, z, min(z + gl, z_lim), kind)
                    if self.r.p(0.75):
                        self._add(objs, BAND_FACADE, z + gl / 2, self.veg.tree, s * (d_f + self.r.u(2, 8)), z + gl / 2,
                                  self.r.u(2, 4), self.r.u(2.5, 4.5))
                    z += gl
                    continue
                length = self.r.u(8, 28)
                b = self._plan_building(side, z, min(z + length, z_lim), self.r.u(9, 26),
                                        d_f + (self.r.u(0.3, 2.5) if self.r.p(0.25) else 0.0), 0.3)
                if b is not None:
                    if setback:
                        kind = self.r.choice(['hedge', 'fence', 'wall', 'none'], [0.3, 0.3, 0.25, 0.15])
                        self._plan_boundary(objs, s, d_o, b['z0'], b['z1'], kind, b['colour'])
                        if side['front'] == 'terrain' and setback > 2.5 and self.r.p(0.5):
                            # A tree in the front garden.
                            zt = self.r.u(b['z0'], b['z1'])
                            self._add(objs, BAND_YARD, zt, self.veg.tree, s * (d_o + setback / 2), zt, self.r.u(1.5, 3),
                                      min(setback / 2 + 1, self.r.u(1.5, 3)))
                z += length
        elif style == 'suburban':
            d_f = d_o + self.r.u(4, 12)
            z = self.r.u(-4, 4)
            while z < z_lim:
                if self.r.p(0.45):
                    z += self.r.u(4, 15)
                    continue
                length = self.r.u(8, 15)
                self._plan_building(side, z, min(z + length, z_lim), self.r.u(5, 10), d_f + self.r.u(0, 2), 0.7)
                z += length
            z = self.r.u(0, 5)
            while z < min(z_lim, 150):
                length = self.r.u(10, 30)
                kind = self.r.choice(['hedge', 'fence', 'wall', 'none'], [0.35, 0.35, 0.15, 0.15])
                self._plan_boundary(objs, s, d_o, z, min(z + length, z_lim), kind)
                z += length
            if self.r.p(0.7):
                z = self.r.u(2, 12)
                while z < min(z_lim, 120):
                    self._add(objs, BAND_YARD, z, self.veg.tree, s * self.r.u(d_o + 1.2, d_f - 1.0), z,
                              self.r.u(2, 3.5), self.r.u(1.5, 3.5))
                    z += self.r.u(7, 18)
        else:
            d_f = None
            d_t = self.r.u(10, 60)
            if self.r.p(0.6):
                z0 = self.r.u(0, 30)
                z1 = z_lim if self.street.z_end else self.r.u(100, 300)
                self._add(objs, BAND_FACADE, z0, self.veg.treeline, s, d_t, z0, z1, self.r.u(4, 14))
            else:
                d_t = 1e9
            if self.r.p(0.5) and min(d_t - 5, 35) > d_o + 6:
                d_rail = self.r.u(d_o + 6, min(d_t - 5, 35))
                side['rail'] = d_rail
                if self.r.p(0.8):
                    z0 = self.r.u(15, 70)
                    self._add(objs, BAND_FACADE, z0, self.vehicles.train_far, s, d_rail, z0, self.r.u(40, 120))
                if self.r.p(0.5):
                    z = self.r.u(5, 20)
                    while z < 200:
                        self._add(objs, BAND_YARD, z, self.furniture.pole, s * (d_rail - 2.6), z, 'mast')
                        z += self.r.u(40, 60)
            if self.r.p(0.3):
                self._plan_boundary(objs, s, d_o + 0.5, self.r.u(0, 10), self.r.u(40, 150), 'fence')
            elif self.r.p(0.25):
                self._add(objs, BAND_BOUNDARY, 0.6, self.buildings.guard_rail, s, d_r + 0.6, 0.6, self.r.u(40, 200))
            if self.r.p(0.5):
                # Yard band: in front of the railway and tree line, which are drawn before them.
                d_max = min(d_o + 25, d_t - 3, 1e9 if side['rail'] is None else side['rail'] - 4.5)
                for _ in range(int(self.r.rng.integers(1, 5)) if d_max > d_o + 2 else 0):
                    z = self.r.u(5, 80)
                    self._add(objs, BAND_YARD, z, self.veg.tree, s * self.r.u(d_o + 2, d_max), z, self.r.u(2, 4),
                              self.r.u(2, 4.5))
        side['D_f'] = d_f
        self._plan_sidewalk_objects(side)
        return side

    def _plan_building(self, side: Dict[str, Any], z0: float, z1: float, height: float, d: float,
                       roof_p: float) -> Optional[Dict[str, Any]]:
        """Queues a building along the side between depths ``z0`` and ``z1``, its street facade at ``X = s*d``.

        Args:
            side: The side's plan (the building is added to its ``buildings`` and ``objects``).
            z0: Near depth (clamped to the nearest drawable depth).
            z1: Far depth.
            height: Building height.
            d: Facade distance from the camera axis.
            roof_p: Probability of a pitched roof.

        Returns:
            The building, or None when it is too short to draw (colour and roof are drawn either way).
        """
        b = dict(
            z0=max(z0, 0.6),
            z1=z1,
            H=height,
            D=d,
            colour=np.asarray(self.r.pick(FACADE_COLOURS), np.float64),
            roof=self.r.p(roof_p),
            light=self.atm.side_light[side['s']])
        if b['z1'] - b['z0'] <= 1.0:
            return None
        side['buildings'].append(b)
        self._add(side['objects'], BAND_FACADE, b['z0'], self.buildings.side_building, side['s'], b)
        return b

    def _plan_boundary(self,
                       objs: list,
                       s: int,
                       d: float,
                       z0: float,
                       z1: float,
                       kind: str,
                       colour: Optional[np.ndarray] = None) -> None:
        """Adds a wall, fence or hedge along ``X = s*d`` between depths ``z0`` and ``z1``."""
        z0 = max(z0, 0.6)
        if z1 - z0 < 1.0 or kind == 'none':
            return
        if kind == 'wall':
            if colour is None or self.r.p(0.3):
                colour = np.asarray(self.r.pick(FACADE_COLOURS), np.float64)
            self._add(objs, BAND_BOUNDARY, z0, self.buildings.wall, s, d, z0, z1, self.r.u(0.6, 2.6), colour)
        elif kind == 'fence':
            style = self.r.choice(['pickets', 'mesh', 'panel', 'bars'], [0.35, 0.25, 0.2, 0.2])
            self._add(objs, BAND_BOUNDARY, z0, self.buildings.fence, s, d, z0, z1, self.r.u(0.9, 2.0), style,
                      np.asarray(self.r.pick(FENCE_COLOURS), np.float64))
        elif kind == 'hedge':
            self._add(objs, BAND_BOUNDARY, z0, self.veg.hedge, s, d, z0, z1, self.r.u(0.7, 1.8))

    def _plan_sidewalk_objects(self, side: Dict[str, Any]) -> None:
        """Adds trees, poles, persons, parked two-wheelers and street furniture on the sidewalk."""
        s, d_r, d_o, sw, style = side['s'], side['D_r'], side['D_o'], side['sw'], side['style']
        objs = side['objects']
        z_lim = self.street.z_street
        # Tree alley along the curb.
        if sw >= 2.2 and self.r.p(0.45 if style == 'urban' else 0.2):
            z = self.r.u(3, 10)
            step = self.r.u(7, 13)
            while z < min(z_lim, 120):
                self._add(objs, BAND_SIDEWALK, z, self.veg.tree, s * (d_r + self.r.u(0.7, 1.1)), z, self.r.u(2.2, 3.5),
                          self.r.u(1.8, 3.5))
                z += step * self.r.u(0.85, 1.15)
        # Poles: street lights, sign posts, traffic lights. They stand near the curb, also on open sides.
        z = self.r.u(2, 15)
        while z < min(z_lim, 160):
            kind = self.r.choice(['light', 'sign', 'tlight'], [0.35, 0.45, 0.2])
            self._add(objs, BAND_SIDEWALK, z, self.furniture.pole, s * (d_r + self.r.u(0.25, 0.6)), z, kind)
            z += self.r.u(12, 35)
        if self.street.zebra is not None and self.r.p(0.7):
            self._add(objs, BAND_SIDEWALK, self.street.zebra - 0.5, self.furniture.pole, s * (d_r + 0.4),
                      self.street.zebra - 0.5, 'tlight')
        if sw <= 0:
            return
        y = self.street.curb_h
        lam = {'urban': 3.2, 'suburban': 1.2, 'open': 0.3}[style]
        for _ in range(int(self.r.rng.poisson(lam))):
            x = s * self.r.u(d_r + 0.4, max(d_o - 0.3, d_r + 0.5))
            # Denser near the camera, where people are resolvable.
            z = 4 + (min(z_lim, 70) - 4) * self.r.u(0, 1)**1.5
            self._add(objs, BAND_SIDEWALK, z, self.people.person, x, y, z)
            if self.r.p(0.3):
                for _ in range(int(self.r.rng.integers(1, 4))):
                    dz = self.r.u(-1.2, 1.2)
                    self._add(objs, BAND_SIDEWALK, z + dz, self.people.person, x + self.r.u(-0.7, 0.7), y, z + dz)
        if self.r.p(0.4 if style == 'urban' else 0.15):
            z = self.r.u(5, min(z_lim, 40))
            x = s * (d_o - 0.5 if self.r.p(0.5) else d_r + 0.6)
            facing = self.r.pick([-1, 1])
            for i in range(int(self.r.rng.integers(1, 5))):
                self._add(objs, BAND_SIDEWALK, z + 0.6 * i, self.people.two_wheeler, x, y, z + 0.6 * i, 'bicycle',
                          'side', facing, False)
        if self.r.p(0.06):
            z = self.r.u(5, min(z_lim, 40))
            self._add(objs, BAND_SIDEWALK, z, self.people.two_wheeler, s * (d_r + 0.8), y, z, 'motorcycle', 'side',
                      self.r.pick([-1, 1]), False)
        for _ in range(int(self.r.rng.poisson(0.8 if style == 'urban' else 0.3))):
            z = self.r.u(3, min(z_lim, 60))
            self._add(objs, BAND_SIDEWALK, z, self.furniture.clutter,
                      s * self.r.u(d_r + 0.5, max(d_o - 0.6, d_r + 0.6)), y, z)

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

        if self.street.tram:
            z0 = self.r.u(12, 60)
            length = self.r.u(25, 40)
            if reserve(self.street.tram_x, 2.6, z0, length):
                self._add(objs, BAND_ROAD, z0, self.vehicles.tram, self.street.tram_x, z0, length,
                          'front' if self.r.p(0.5) else 'rear')
        # Parked cars along the curb.
        for s in (-1, 1):
            if not self.street.park[s]:
                continue
            z = self.r.u(4, 14)
            while z < min(80, self.street.z_street - 2):
                if self.r.p(0.8):
                    kind = self.r.choice(['car', 'van', 'truck'], [0.9, 0.07, 0.03])
                    length = {'car': 4.5, 'van': 5.3, 'truck': 8.5}[kind]
                    xc = s * (self.street.road_edge[s] - 1.15 + self.r.u(-0.1, 0.15))
                    if reserve(xc, 2.0, z, length):
                        self._add(objs, BAND_ROAD, z, self.vehicles.vehicle, kind, xc, z, self.r.pick(['front',
                                                                                                       'rear']))
                    z += length + self.r.u(0.6, 4)
                else:
                    z += self.r.u(3, 10)
        # Traffic in the lanes: own lane and lanes to the left (the leftmost one oncoming).
        lanes = [(0.0, 'rear', 0.75)]
        for k in range(1, self.street.n_left + 1):
            lanes.append((-k * self.street.lane_w, 'front' if k == self.street.n_left else 'rear', 0.9))
        for xc, facing, lam in lanes:
            for _ in range(int(self.r.rng.poisson(lam))):
                kind = self.r.choice(['car', 'van', 'truck', 'bus', 'motorcycle'], [0.7, 0.06, 0.09, 0.1, 0.05])
                z0 = self.r.u(7, 90)
                length = {'car': 4.5, 'van': 5.3, 'truck': 9.5, 'bus': 12.5, 'motorcycle': 2.2}[kind]
                x = xc + self.r.u(-0.3, 0.3)
                if reserve(x, 2.6, z0, length):
                    if kind == 'motorcycle':
                        self._add(objs, BAND_ROAD, z0, self.people.two_wheeler, x, 0.0, z0, 'motorcycle', 'rear', 1,
                                  True)
                    else:
                        self._add(objs, BAND_ROAD, z0, self.vehicles.vehicle, kind, x, z0, facing)
        # Riders: cyclists near the right edge, seen from behind, or crossing, seen from the side.
        if self.r.p(0.4):
            for _ in range(1 + int(self.r.p(0.3))):
                kind = 'bicycle' if self.r.p(0.75) else 'motorcycle'
                z0 = self.r.u(6, 45)
                if self.r.p(0.7):
                    if kind == 'bicycle':
                        x = self.street.road_edge[1] - (2.2 if self.street.park[1] else 0.0) - self.r.u(0.5, 1.0)
                    else:
                        x = self.r.u(-0.6, 0.6)
                    if reserve(x, 0.8, z0, 2.0):
                        self._add(objs, BAND_ROAD, z0, self.people.two_wheeler, x, 0.0, z0, kind, 'rear', 1, True)
                else:
                    x = self.r.u(-self.street.road_edge[-1] + 1, self.street.road_edge[1] - 1)
                    if reserve(x, 2.0, z0, 0.8):
                        self._add(objs, BAND_ROAD, z0, self.people.two_wheeler, x, 0.0, z0, kind, 'side',
                                  self.r.pick([-1, 1]), True)
        if self.street.zebra is not None:
            for _ in range(int(self.r.rng.poisson(1.3))):
                z = self.street.zebra + self.r.u(0.5, 3.0)
                self._add(objs, BAND_ROAD, z, self.people.person,
                          self.r.u(-self.street.road_edge[-1], self.street.road_edge[1]), 0.0, z, 'side')
        return objs


def render_toy_city_sample(seed: int,
                           split: str,
                           index: int,
                           height: int = 256,
                           width: int = 512) -> Tuple[np.ndarray, np.ndarray]:
    """Renders one toy-city image and its label map in memory.

    Args:
        seed: Dataset seed (non-negative).
        split: ``'train'`` or ``'val'``.
        index: Image index within the split (non-negative).
        height: Image height in pixels (``MIN_IMAGE_SIZE`` .. ``MAX_IMAGE_SIZE``).
        width: Image width in pixels (``MIN_IMAGE_SIZE`` .. ``MAX_IMAGE_SIZE``).

    Returns:
        ``(image, label)``: ``(height, width, 3)`` uint8 RGB image and ``(height, width)`` uint8 label map
        of train ids 0..18 and ``IGNORE_INDEX``.
    """
    validate_image_size(height, width)
    r = Draws(toy_city_sample_rng(seed, split, index))
    # Construction order is draw order: camera, atmosphere, materials (noise fields are drawn on first use).
    cam = Camera(r, height, width)
    noise = NoiseBank(r, cam.h, cam.w, cam.px)
    atm = Atmosphere(r)
    mat = Materials(r, noise)
    frame = Frame(r=r, cam=cam, noise=noise, atm=atm, mat=mat, canvas=Canvas(cam, mat.texture))
    return Scene(frame).render()
