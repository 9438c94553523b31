"""The semantics of masked (early-exit) execution, defined once for every path that implements them.

After exit ``n`` the stop mask (``active``: True = still computing, at the resolution of the exits' logits)
restricts every layer that runs before exit ``n + 1`` to the active output positions. A layer whose output has
another resolution uses the mask resized with **nearest** interpolation to its size. What a stopped position
holds is the *fill*:

* ``copy`` (zero cost): a layer whose output has the shape of its input leaves its input value there, so a stopped
  pixel carries its last feature through the stage unchanged; a layer that changes shape has no previous value and
  writes 0 there.
* ``zeros``: every masked layer writes 0 at stopped positions.
* ``rbf``: ADP-C's fill (Liu et al., ICLR 2022), ``sum_{d != 0} K(d) y(p + d) m(p + d) / sum_{d != 0} K(d)`` over
  a 7x7 window with ``K(d) = exp(-L^2 |d|^2)`` (L = 3, ADP-C's initial value of its learnt parameter), written at
  the stopped positions of every masked layer output.

Element-wise operations (activations, residual additions, multi-resolution sums) apply at active positions only.
The simulated path (dense, then masked) implements these rules with :class:`MaskContext`; the sparse path computes
the same values at the active positions only and is tested against it.
"""
from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ['FILL_MODES', 'RBF_LENGTH', 'RBF_SIZE', 'check_fill', 'MaskContext', 'rbf_kernel', 'rbf_fill']

#: What stopped positions hold (``test_cfg.fill``).
FILL_MODES = ('copy', 'zeros', 'rbf')
#: ADP-C's RBF length scale L (its initial value) and window size.
RBF_LENGTH = 3.0
RBF_SIZE = 7


def check_fill(fill: str, option: str = 'fill') -> str:
    """Returns ``fill`` if it is one of :data:`FILL_MODES`, else raises a ValueError naming ``option``."""
    if fill not in FILL_MODES:
        raise ValueError(f'{option} must be one of {FILL_MODES}, got {fill!r}')
    return fill


class MaskContext:
    """Active masks at every resolution, derived once per exit from the base mask, and the fill rule.

    Args:
        active (Tensor): (B, H, W) bool, True = still computing.
        fill (str): One of :data:`FILL_MODES`.
    """

    def __init__(self, active: Tensor, fill: str = 'copy') -> None:
        check_fill(fill)
        if active.dtype != torch.bool or active.dim() != 3:
            raise ValueError(f'active must be a (B, H, W) bool tensor, got {tuple(active.shape)} {active.dtype}')
        self.active = active
        self.fill = fill
        self._masks: Dict[Tuple[int, int], Tensor] = {}

    def mask(self, hw: Sequence[int]) -> Tensor:
        """(B, 1, h, w) bool mask at resolution ``hw`` (nearest resize of the base mask), cached."""
        key = (int(hw[0]), int(hw[1]))
        m = self._masks.get(key)
        if m is None:
            if key == tuple(self.active.shape[1:]):
                m = self.active.unsqueeze(1)
            else:
                m = F.interpolate(self.active.unsqueeze(1).float(), size=key, mode='nearest') > 0.5
            self._masks[key] = m
        return m

    def apply(self, y: Tensor, inp: Optional[Tensor] = None) -> Tensor:
        """Masks a layer output: active positions keep ``y``, stopped ones the fill.

        Args:
            y (Tensor): The layer's dense output (B, C, h, w).
            inp (Tensor, optional): The layer's input; under ``copy`` a same-shape input is what stopped positions
                keep.
        """
        m = self.mask(y.shape[-2:])
        if self.fill == 'rbf':
            return torch.where(m, y, rbf_fill(y, m))
        if self.fill == 'copy' and inp is not None and inp.shape == y.shape:
            return torch.where(m, y, inp)
        return torch.where(m, y, torch.zeros_like(y))


def rbf_kernel(length: float = RBF_LENGTH, size: int = RBF_SIZE, device=None, dtype=torch.float32) -> Tensor:
    """ADP-C's RBF kernel ``exp(-L^2 d^2)`` with the centre excluded, normalised by its sum."""
    r = torch.arange(size, device=device, dtype=dtype) - size // 2
    d2 = r.view(-1, 1)**2 + r.view(1, -1)**2
    k = torch.exp(-(length**2) * d2)
    k[size // 2, size // 2] = 0
    return k / k.sum()


def rbf_fill(y: Tensor, m: Tensor, length: float = RBF_LENGTH) -> Tensor:
    """RBF interpolation of the active values of ``y`` (depthwise conv of ``y * m`` with :func:`rbf_kernel`)."""
    k = rbf_kernel(length, device=y.device, dtype=y.dtype)
    c = y.shape[1]
    return F.conv2d(y * m, k.expand(c, 1, RBF_SIZE, RBF_SIZE).contiguous(), padding=RBF_SIZE // 2, groups=c)
