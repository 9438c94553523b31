"""Masked inference of the early-exit HRNet: the semantics, and the simulated ("dense then mask") path.

After exit n the stop mask (active = still computing, at 1/4 resolution) restricts every conv of transition n,
stage n+1 and exit n+1's head to active output positions. Each branch (and each intermediate resolution) uses the
mask resized with **nearest** interpolation to its size. What a stopped position holds is set by the fill rule:

* ``copy`` (zero cost): a layer whose output has the shape of its input (the convs inside a BasicBlock, a whole
  block, a fuse output) leaves its input value there, so a stopped pixel carries its last feature through the
  stage unchanged; a layer that changes shape (transition convs, the branch convs inside a fuse, exit-head convs)
  has no previous value and writes 0 there.
* ``zeros``: every masked layer writes 0 at stopped positions.
* ``rbf``: ADP-C's fill, ``sum_{d != 0} K(d) y(p + d) m(p + d) / sum_{d != 0} K(d)`` over a 7x7 window with
  ``K(d) = exp(-L^2 |d|^2)`` (L = 3, ADP-C's initial value; we have no trained L), written at the stopped
  positions of every masked conv output (shape-preserving and not alike).

ReLU, residual additions and the fuse sums apply at active positions only (stopped ones keep the fill). Exactly
these semantics are what the sparse path (:mod:`mmseg_cbt.models.backbones.sparse_hrnet`) computes for real, so the
simulated path here is its test oracle. Stem, stage 1 and exit 1 are always dense.
"""
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from mmseg.models.backbones.resnet import BasicBlock
from mmseg.models.utils import resize

__all__ = ['FILL_MODES', 'MaskContext', 'rbf_fill', 'simulate_stage', 'simulate_head']

FILL_MODES = ('copy', 'zeros', 'rbf')
RBF_L = 3.0


class MaskContext:
    """Active masks at every resolution, derived once per exit from the 1/4-resolution mask.

    Args:
        active (Tensor): (B, H/4, W/4) bool, True = still computing.
        fill (str): One of :data:`FILL_MODES`.
    """

    def __init__(self, active: Tensor, fill: str = 'copy') -> None:
        if fill not in FILL_MODES:
            raise ValueError(f'fill must be one of {FILL_MODES}, got {fill!r}')
        if active.dtype != torch.bool or active.dim() != 3:
            raise ValueError(f'active must be a (B, H, W) bool tensor, got {tuple(active.shape)} {active.dtype}')
        self.active = active
        self.fill = fill
        self._masks: Dict[Tuple[int, int], Tensor] = {}

    def mask(self, hw: Sequence[int]) -> Tensor:
        """(B, 1, h, w) bool mask at resolution ``hw`` (nearest resize of the 1/4 mask), cached."""
        key = (int(hw[0]), int(hw[1]))
        m = self._masks.get(key)
        if m is None:
            if key == tuple(self.active.shape[1:]):
                m = self.active.unsqueeze(1)
            else:
                m = F.interpolate(self.active.unsqueeze(1).float(), size=key, mode='nearest') > 0.5
            self._masks[key] = m
        return m

    def base(self, like: Tensor, same_shape_input: Optional[Tensor]) -> Tensor:
        """The value a stopped position holds before ``rbf`` (``copy``: the layer input if shape-preserving)."""
        if self.fill == 'copy' and same_shape_input is not None and same_shape_input.shape == like.shape:
            return same_shape_input
        return torch.zeros_like(like)

    def apply(self, y: Tensor, inp: Optional[Tensor] = None) -> Tensor:
        """Masks a layer output: active positions keep ``y``, stopped ones the fill."""
        m = self.mask(y.shape[-2:])
        if self.fill == 'rbf':
            return torch.where(m, y, rbf_fill(y, m))
        return torch.where(m, y, self.base(y, inp))


def rbf_kernel(length: float = RBF_L, size: int = 7, device=None, dtype=torch.float32) -> Tensor:
    """ADP-C's 7x7 RBF kernel ``exp(-L^2 d^2)`` with the centre excluded, normalised by its sum."""
    r = torch.arange(size, device=device, dtype=dtype) - size // 2
    d2 = r.view(-1, 1)**2 + r.view(1, -1)**2
    k = torch.exp(-(length**2) * d2)
    k[size // 2, size // 2] = 0
    return k / k.sum()


def rbf_fill(y: Tensor, m: Tensor, length: float = RBF_L) -> Tensor:
    """RBF interpolation of the active values of ``y`` (depthwise 7x7 conv of ``y * m``)."""
    k = rbf_kernel(length, device=y.device, dtype=y.dtype)
    c = y.shape[1]
    return F.conv2d(y * m, k.expand(c, 1, 7, 7).contiguous(), padding=3, groups=c)


def _unit(ctx: MaskContext, layers: nn.Module, x: Tensor, inp_for_copy: Optional[Tensor] = None) -> Tensor:
    """One conv(+BN)(+ReLU) unit, masked at its output resolution."""
    return ctx.apply(layers(x), inp_for_copy)


def _basic_block(ctx: MaskContext, block: BasicBlock, x: Tensor) -> Tensor:
    if not isinstance(block, BasicBlock):
        raise NotImplementedError(f'masked inference supports BasicBlock stages, got {type(block).__name__}')
    identity = x if block.downsample is None else ctx.apply(block.downsample(x))
    h = ctx.apply(block.relu(block.norm1(block.conv1(x))), x)
    # residual add and ReLU at active positions only; stopped positions keep the block input (copy)
    return ctx.apply(block.relu(block.norm2(block.conv2(h)) + identity), x)


def _sequential_units(ctx: MaskContext, seq: nn.Sequential, x: Tensor) -> Tensor:
    """A Sequential of conv/BN/ReLU (or of such Sequentials): mask after each conv unit."""
    mods = list(seq)
    if mods and all(isinstance(m, nn.Sequential) for m in mods):
        for sub in mods:
            x = _sequential_units(ctx, sub, x)
        return x
    return ctx.apply(seq(x))


def _hr_module(ctx: MaskContext, module: nn.Module, xs: List[Tensor]) -> List[Tensor]:
    xs = list(xs)
    for i, branch in enumerate(module.branches):
        x = xs[i]
        for block in branch:
            x = _basic_block(ctx, block, x)
        xs[i] = x
    if module.fuse_layers is None:
        return xs
    outs = []
    for i, fuse in enumerate(module.fuse_layers):
        y = None  # summed in mmseg's order (j = 0, 1, ...) so that an all-active mask reproduces it exactly
        for j, layer in enumerate(fuse):
            if j == i:
                t = xs[i]
            elif j > i:
                conv, bn, upsample = layer[0], layer[1], layer[2]
                t = resize(upsample(ctx.apply(bn(conv(xs[j])))), size=xs[i].shape[2:], mode='bilinear',
                           align_corners=False)
            else:
                t = _sequential_units(ctx, layer, xs[j])
            y = t if y is None else y + t
        outs.append(ctx.apply(module.relu(y), xs[i]))
    return outs


def simulate_stage(backbone: nn.Module, stage: int, feats: List[Tensor], ctx: MaskContext) -> List[Tensor]:
    """Transition ``stage - 1`` and stage ``stage`` with every conv computed densely, then masked.

    Args:
        backbone (EarlyExitHRNet): The backbone.
        stage (int): 2, 3 or 4.
        feats (list[Tensor]): Previous stage's branch outputs.
        ctx (MaskContext): Masks and fill rule.

    Returns:
        list[Tensor]: The stage's branch outputs.
    """
    if stage not in (2, 3, 4):
        raise ValueError(f'masked stages are 2, 3 and 4 (stem, stage 1 and exit 1 are dense), got {stage}')
    xs = [src if layer is None else _sequential_units(ctx, layer, src)
          for layer, src in backbone.transition_inputs(stage, feats)]
    for module in getattr(backbone, f'stage{stage}'):
        xs = _hr_module(ctx, module, xs)
    return xs


def simulate_head(head: nn.Module, feats: List[Tensor], ctx: MaskContext) -> Tensor:
    """An exit head with its convs masked (RH exit or mmseg FCNHead); other heads run densely.

    Returns:
        Tensor: Logits; only the active positions are meaningful (the segmentor copies the rest).
    """
    from mmseg.models.decode_heads import FCNHead

    from ..decode_heads import EarlyExitRHHead
    if isinstance(head, EarlyExitRHHead):
        x = head._transform_inputs(feats)
        sizes = [x.shape[2:]]
        for conv in head.down_convs:
            x = ctx.apply(conv(head.pool(x)))
            sizes.append(x.shape[2:])
        for i, conv in enumerate(head.up_convs):
            x = ctx.apply(conv(resize(x, size=sizes[-2 - i], mode='bilinear', align_corners=head.align_corners)))
        x = resize(x, size=sizes[0], mode='bilinear', align_corners=head.align_corners)
        return ctx.apply(head.cls_seg(x))
    if isinstance(head, FCNHead) and not head.concat_input:
        x = head._transform_inputs(feats)
        for conv in head.convs:
            x = ctx.apply(conv(x))
        return ctx.apply(head.cls_seg(x))
    return head(feats)
