"""What every part of one rendering shares: the random draws, the street plan and the drawing objects.

Every random choice of an image comes from one generator in a fixed order, so the pieces below must be created
and called in the order :mod:`.scene` uses: camera, atmosphere, materials, then planning, then drawing.
"""
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Dict, Optional, Sequence

import numpy as np

if TYPE_CHECKING:
    from .camera import Camera
    from .materials import Atmosphere, Materials, NoiseBank
    from .raster import Canvas

__all__ = ['Draws', 'Street', 'Frame', 'Painter']


class Draws:
    """Random choices of one image, all from one generator.

    Args:
        rng: The image's random generator.
    """

    def __init__(self, rng: np.random.Generator) -> None:
        self.rng = rng

    def u(self, a: float, b: float) -> float:
        """A uniform float in ``[a, b)``."""
        return float(self.rng.uniform(a, b))

    def p(self, p: float) -> bool:
        """True with probability ``p``."""
        return bool(self.rng.random() < p)

    def pick(self, seq: Sequence[Any]) -> Any:
        """One element of ``seq``, uniformly."""
        return seq[int(self.rng.integers(len(seq)))]

    def choice(self, options: Sequence[Any], probs: Sequence[float]) -> Any:
        """One of ``options`` with the (unnormalised) probabilities ``probs``."""
        probs = np.asarray(probs, np.float64)
        return options[int(self.rng.choice(len(options), p=probs / probs.sum()))]

    def jit(self, colour: Sequence[float], amount: float) -> np.ndarray:
        """``colour`` with every channel moved by up to ``amount``, clipped to 0..255."""
        c = np.asarray(colour, np.float64) + self.rng.uniform(-amount, amount, 3)
        return np.clip(c, 0, 255)


@dataclass
class Street:
    """The road's cross-section and extent (metres; X right, Z forward; side -1 left, +1 right).

    Attributes:
        lane_w: Lane width.
        n_left: Number of lanes left of the camera's lane (the leftmost one oncoming).
        park: Whether each side has a parking lane.
        bike_lane: Whether the right side has a bike lane.
        road_edge: Distance of the curb from the camera axis per side.
        curb_h: Curb (and sidewalk) height.
        z_end: Depth of the cross street closing the view, or None for an open street.
        cross_w: Width of the cross street.
        z_street: Depth where sidewalks and side buildings stop.
        zebra: Depth of a zebra crossing, or None.
        tram: Whether a tram track runs in the first left lane.
        tram_x: X of the tram track.
    """
    lane_w: float
    n_left: int
    park: Dict[int, bool]
    bike_lane: bool
    road_edge: Dict[int, float]
    curb_h: float
    z_end: Optional[float]
    cross_w: float
    z_street: float
    zebra: Optional[float]
    tram: bool
    tram_x: float


@dataclass
class Frame:
    """Everything one rendering shares.

    Attributes:
        r: The image's random draws.
        cam: Pinhole camera and sensor.
        noise: Noise fields shared by materials, sky and sensor.
        atm: Weather and light.
        mat: Ground and vegetation materials.
        canvas: Image and label buffers.
        street: The street plan (set by the planner before anything is drawn).
    """
    r: Draws
    cam: 'Camera'
    noise: 'NoiseBank'
    atm: 'Atmosphere'
    mat: 'Materials'
    canvas: 'Canvas'
    street: Optional[Street] = None


class Painter:
    """Base of the object painters: gives short access to the frame's parts.

    Args:
        frame: The rendering context.
    """

    def __init__(self, frame: Frame) -> None:
        self.frame = frame
        self.r = frame.r
        self.cam = frame.cam
        self.atm = frame.atm
        self.canvas = frame.canvas

    @property
    def street(self) -> Street:
        """The street plan (read at draw time: it is planned after the painters are made)."""
        return self.frame.street
