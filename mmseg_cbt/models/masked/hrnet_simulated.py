"""The simulated ("dense, then mask") path of the early-exit HRNet: the test oracle of :mod:`.hrnet_sparse`.

Transition ``n`` and stage ``n + 1`` run every conv densely and then apply the mask and fill of
:mod:`.semantics` to its output; BasicBlocks keep their input at stopped positions under ``copy``, residual
additions, ReLUs and fuse sums count at active positions only. Stem, stage 1 and exit 1 are always dense.
"""
from typing import List, Optional, Tuple

import torch.nn as nn
from torch import Tensor

from mmseg.models.backbones.resnet import BasicBlock
from mmseg.models.utils import resize

from .semantics import MaskContext

__all__ = ['conv_units', 'simulate_stage', 'unit_modules']


def _basic_block(ctx: MaskContext, block: BasicBlock, x: Tensor) -> Tensor:
    if not isinstance(block, BasicBlock):
        raise NotImplementedError(f'masked inference supports BasicBlock stages, got {type(block).__name__}')
    identity = x if block.downsample is None else ctx.apply(block.downsample(x))
    h = ctx.apply(block.relu(block.norm1(block.conv1(x))), x)
    # residual add and ReLU at active positions only; stopped positions keep the block input (copy)
    return ctx.apply(block.relu(block.norm2(block.conv2(h)) + identity), x)


def unit_modules(seq: nn.Sequential) -> List[nn.Sequential]:
    """The conv units (conv, norm[, ReLU] Sequentials) of an HRNet transition / fuse-downsample, in order."""
    mods = list(seq)
    if mods and all(isinstance(m, nn.Sequential) for m in mods):
        return [u for sub in mods for u in unit_modules(sub)]
    return [seq]


def conv_units(seq: nn.Sequential) -> List[Tuple[nn.Conv2d, Optional[nn.Module], bool]]:
    """(conv, norm, relu) triples of the units of :func:`unit_modules` (what the sparse path folds)."""
    units = []
    for unit in unit_modules(seq):
        mods = list(unit)
        conv = next(m for m in mods if isinstance(m, nn.Conv2d))
        norm = next((m for m in mods if m is not conv and not isinstance(m, nn.ReLU)), None)
        units.append((conv, norm, any(isinstance(m, nn.ReLU) for m in mods)))
    return units


def _sequential_units(ctx: MaskContext, seq: nn.Sequential, x: Tensor) -> Tensor:
    """A chain of conv units, masked after each unit."""
    for unit in unit_modules(seq):
        x = ctx.apply(unit(x))
    return x


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
                t = resize(
                    upsample(ctx.apply(bn(conv(xs[j])))), size=xs[i].shape[2:], mode='bilinear', align_corners=False)
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
    xs = [
        src if layer is None else _sequential_units(ctx, layer, src)
        for layer, src in backbone.transition_inputs(stage, feats)
    ]
    for module in getattr(backbone, f'stage{stage}'):
        xs = _hr_module(ctx, module, xs)
    return xs
