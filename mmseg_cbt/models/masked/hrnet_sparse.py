"""Masked inference that really skips stopped pixels: the early-exit HRNet on sparse convolutions.

Computes exactly the semantics documented in :mod:`.semantics` (the simulated path of :mod:`.hrnet_simulated` is
the test oracle), for the ``copy``, ``zeros`` and ``rbf`` fills, with :mod:`mmseg_cbt.ops`:

* every feature map of a masked stage lives in a zero-bordered channels-last buffer for the whole stage (one
  NCHW -> NHWC copy per branch and stage, none per layer);
* one :class:`~mmseg_cbt.ops.SparseIndex` per resolution and exit, shared by all convs whose output lives there;
* convs are BN-folded (:class:`~mmseg_cbt.ops.PackedConv`, cached per module until its weights change) and
  computed only at active output positions (gather + GEMM + fused bias/residual/ReLU + scatter; dense above the
  measured crossover); residual additions, ReLUs and fuse sums run on the active rows only;
* BasicBlocks work in place: the block output is written into its input buffer, so under ``copy`` a stopped pixel
  keeps its value at zero cost; one scratch buffer per branch holds the blocks' intermediate map.

Inference only (buffers are written in place, which autograd cannot follow): training with masks uses the
simulated path (``train_cfg.masked_training``). With the ``rbf`` fill the interpolation is computed only on its
support, the stopped positions within 3 pixels of an active one (which contains the ring that active windows read),
as a sparse (support x active) matrix times the active rows; the stopped positions beyond it hold 0, as in ADP-C's
formula, so every position of every stage output equals the simulated path; the exit heads' maps take it the same way.
"""
from typing import Dict, List, Tuple

import torch
import torch.nn as nn
from torch import Tensor

from mmseg.models.backbones.resnet import BasicBlock
from mmseg.models.utils import resize

from mmseg_cbt.ops import (add_weighted_rows_, gather_rows, new_padded_buffer, padded_interior, scatter_rows,
                           sparse_conv_rows, to_padded_nhwc)
from .hrnet_simulated import conv_units
from .sparse_context import SparseContext, packed_conv

__all__ = ['sparse_stage']


def _out_hw(buf: Tensor, conv: nn.Conv2d) -> Tuple[int, int]:
    h, w = buf.shape[1] - 2, buf.shape[2] - 2
    k, s, p = conv.kernel_size[0], conv.stride[0], conv.padding[0]
    return (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1


def _run_units(ctx: SparseContext, seq: nn.Sequential, buf: Tensor) -> Tensor:
    """A chain of shape-changing conv units; stopped positions of every output are 0 (fresh zero buffers)."""
    for conv, bn, relu in conv_units(seq):
        hw = _out_hw(buf, conv)
        out = ctx.mark_clean(
            new_padded_buffer(buf.shape[0], conv.out_channels, hw[0], hw[1], dtype=buf.dtype, device=buf.device))
        packed_conv(conv, bn).apply(buf, ctx.index(hw), out, relu=relu)
        buf = ctx.finish(out)
    return buf


def _block(ctx: SparseContext, block: nn.Module, x: Tensor, h: Tensor, first: bool) -> None:
    """A BasicBlock in place: ``x <- relu(bn2(conv2(relu(bn1(conv1 x)))) + x)`` at the active positions.

    ``h`` is the branch's scratch buffer; its stopped positions hold the fill (copy: the stage's branch input,
    which no layer changes at stopped positions; zeros: 0).
    """
    if not isinstance(block, BasicBlock) or block.downsample is not None:
        raise NotImplementedError('sparse masked stages support BasicBlocks without downsample (HRNet stages 2-4)')
    idx = ctx.index((x.shape[1] - 2, x.shape[2] - 2))
    ctx.finish(packed_conv(block.conv1, block.norm1).apply(x, idx, h, relu=True))
    # conv2 reads h (never x), the residual row is read before it is overwritten: safe in place
    ctx.finish(packed_conv(block.conv2, block.norm2).apply(h, idx, x, residual=x, relu=True))
    if first and ctx.fill == 'zeros':
        ctx.zero_stopped(x)  # the block input's own stopped values were read by conv1; from now on they are 0


def _fuse(ctx: SparseContext, module: nn.Module, bufs: List[Tensor]) -> List[Tensor]:
    """The multi-resolution fuse, summed on the active rows of each output branch only."""
    if module.fuse_layers is None:
        return bufs
    sizes = [(b.shape[1] - 2, b.shape[2] - 2) for b in bufs]
    results = []
    for i, fuse in enumerate(module.fuse_layers):
        idx_i = ctx.index(sizes[i])
        acc = gather_rows(bufs[i], idx_i)
        for j, layer in enumerate(fuse):
            if j == i or idx_i.num_active == 0:
                continue
            if j > i:
                conv, bn, upsample = layer[0], layer[1], layer[2]
                t = ctx.mark_clean(
                    new_padded_buffer(
                        bufs[j].shape[0], conv.out_channels, *sizes[j], dtype=acc.dtype, device=acc.device))
                ctx.finish(packed_conv(conv, bn).apply(bufs[j], ctx.index(sizes[j]), t))
                scale = float(upsample.scale_factor)
                if all(int(sj * scale) == si for sj, si in zip(sizes[j], sizes[i])) and not upsample.align_corners:
                    # bilinear upsampling evaluated at the active rows only (4 taps each) instead of the full map
                    rows, weights = ctx.bilinear_taps(sizes[i], sizes[j], scale)
                    add_weighted_rows_(acc, t.view(-1, t.shape[-1]), rows, weights)
                else:  # sizes that the scale factor does not reach exactly: mmseg's two-step resize, densely
                    up = resize(upsample(padded_interior(t)), size=sizes[i], mode='bilinear', align_corners=False)
                    acc += up.permute(0, 2, 3, 1)[ctx.masks.mask(sizes[i])[:, 0]]
            else:
                units = conv_units(layer)
                src = bufs[j]
                for conv, bn, relu in units[:-1]:
                    hw = _out_hw(src, conv)
                    out = ctx.mark_clean(
                        new_padded_buffer(src.shape[0], conv.out_channels, *hw, dtype=src.dtype, device=src.device))
                    packed_conv(conv, bn).apply(src, ctx.index(hw), out, relu=relu)
                    src = ctx.finish(out)
                conv, bn, relu = units[-1]
                p = packed_conv(conv, bn)
                acc += sparse_conv_rows(
                    src, idx_i, p.wmat, p.bias, stride=p.stride, padding=p.padding, relu=relu, dense_weight=p.weight)
        results.append(acc.relu_())
    outs = bufs[:len(results)]
    for i, rows in enumerate(results):
        # all outputs are computed before any buffer is overwritten: every fuse reads the blocks' outputs
        ctx.finish(scatter_rows(outs[i], ctx.index(sizes[i]), rows))
    return outs


@torch.no_grad()
def sparse_stage(backbone: nn.Module,
                 stage: int,
                 feats: List[Tensor],
                 active: Tensor,
                 fill: str = 'copy') -> List[Tensor]:
    """Transition ``stage - 1`` and stage ``stage`` computed at the active pixels only.

    Args:
        backbone (EarlyExitHRNet): The backbone (eval mode: BN folded with its running statistics).
        stage (int): 2, 3 or 4.
        feats (list[Tensor]): Previous stage's branch outputs (NCHW).
        active (Tensor): (B, H/4, W/4) bool, True = still computing.
        fill (str): One of :data:`~mmseg_cbt.models.masked.FILL_MODES`.

    Returns:
        list[Tensor]: Branch outputs, NCHW views (channels-last strides) of the stage's buffers.
    """
    if stage not in (2, 3, 4):
        raise ValueError(f'masked stages are 2, 3 and 4 (stem, stage 1 and exit 1 are dense), got {stage}')
    if backbone.training:
        raise RuntimeError("feature_mask='sparse' is inference-only: call model.eval() (training with masks uses "
                           "the simulated path, train_cfg.masked_training)")
    ctx = SparseContext(active, fill)
    converted: Dict[int, Tensor] = {}

    def buffer_of(t: Tensor) -> Tensor:
        if id(t) not in converted:
            converted[id(t)] = to_padded_nhwc(t)
        return converted[id(t)]

    # every transition reads its source before any block writes a branch buffer in place
    bufs = [
        buffer_of(src) if layer is None else _run_units(ctx, layer, buffer_of(src))
        for layer, src in backbone.transition_inputs(stage, feats)
    ]
    scratch = [b.clone() if fill == 'copy' else ctx.mark_clean(torch.zeros_like(b)) for b in bufs]
    first = True
    for module in getattr(backbone, f'stage{stage}'):
        for i, branch in enumerate(module.branches):
            for k, block in enumerate(branch):
                _block(ctx, block, bufs[i], scratch[i], first and k == 0)
        first = False
        bufs = _fuse(ctx, module, bufs)
    return [padded_interior(b) for b in bufs]
