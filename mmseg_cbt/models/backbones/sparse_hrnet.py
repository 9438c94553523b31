"""Masked inference that really skips stopped pixels: the early-exit HRNet on sparse convolutions.

Computes exactly the semantics documented in :mod:`.masked_hrnet` (its simulated path is the test oracle), for
the ``copy``, ``zeros`` and ``rbf`` fills, with :mod:`mmseg_cbt.ops`:

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
import warnings
import weakref
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn
from torch import Tensor

from mmseg.models.backbones.resnet import BasicBlock
from mmseg.models.utils import resize

from mmseg_cbt.ops import (PackedConv, SparseIndex, add_weighted_rows_, gather_rows, new_padded_buffer, padded_interior,
                           padded_row_index, scatter_rows, sparse_conv_rows, to_padded_nhwc)
from .masked_hrnet import MaskContext, rbf_kernel

__all__ = ['sparse_stage', 'sparse_head']

_PACKED: 'weakref.WeakKeyDictionary[nn.Module, Tuple[tuple, PackedConv]]' = weakref.WeakKeyDictionary()


def _version(t: Tensor) -> int:
    # inference-mode tensors have no version counter; they cannot be changed in place outside inference mode
    return -1 if t.is_inference() else t._version


def _packed(conv: nn.Conv2d, bn: Optional[nn.Module]) -> PackedConv:
    """BN-folded GEMM form of a conv, cached until any of the tensors it was made from changes.

    ``bn`` may be ``nn.Identity`` (a model whose BNs were already fused into the convs, e.g. by
    :func:`mmseg_cbt.utils.optimize_for_inference`).
    """
    if isinstance(bn, nn.Identity):
        bn = None
    elif bn is not None and not isinstance(bn, nn.modules.batchnorm._BatchNorm):
        raise NotImplementedError(f'sparse masked inference folds BatchNorm only, got {type(bn).__name__}')
    tensors = [conv.weight] + ([conv.bias] if conv.bias is not None else [])
    if bn is not None:
        tensors += [bn.weight, bn.bias, bn.running_mean, bn.running_var]
    key = tuple((id(t), t.data_ptr(), _version(t), t.device, t.dtype) for t in tensors if t is not None)
    hit = _PACKED.get(conv)
    if hit is not None and hit[0] == key:
        return hit[1]
    packed = PackedConv.from_conv(conv, bn=bn)
    _PACKED[conv] = (key, packed)
    return packed


class _SparseContext:
    """Masks and sparse indices per resolution for one exit, plus the fill rule."""

    def __init__(self, active: Tensor, fill: str) -> None:
        if fill not in ('copy', 'zeros', 'rbf'):
            raise ValueError(f"fill must be 'copy', 'zeros' or 'rbf', got {fill!r}")
        self.masks = MaskContext(active, fill)
        self.fill = fill
        self._idx: Dict[Tuple[int, int], SparseIndex] = {}
        self._taps: Dict[tuple, Tuple[Tensor, Tensor]] = {}
        self._rbf: Dict[Tuple[int, int], Tuple[Optional[Tensor], Tensor, Tensor]] = {}
        # buffers whose stopped positions beyond the rbf support hold 0: id -> weak reference (an id can be reused
        # once its tensor is freed, the weak reference tells)
        self._clean: Dict[int, 'weakref.ref'] = {}

    def index(self, hw) -> SparseIndex:
        key = (int(hw[0]), int(hw[1]))
        idx = self._idx.get(key)
        if idx is None:
            idx = SparseIndex.build(self.masks.mask(key)[:, 0].contiguous())
            self._idx[key] = idx
        return idx

    def bilinear_taps(self, hw_out, hw_in, scale: float) -> Tuple[Tensor, Tensor]:
        """Source rows (M, 4) into a padded (border 1) buffer at ``hw_in`` and weights (M, 4) of x``scale`` bilinear
        upsampling (align_corners=False, PyTorch's source-index rule) at the active positions of ``hw_out``."""
        key = (tuple(hw_out), tuple(hw_in))
        hit = self._taps.get(key)
        if hit is not None:
            return hit
        idx = self.index(hw_out)
        h_in, w_in = hw_in
        inv = 1.0 / scale

        def axis(dst: Tensor, size_in: int):
            src = ((dst.to(torch.float32) + 0.5) * inv - 0.5).clamp_(min=0)
            i0 = src.floor().to(torch.int64)
            i1 = torch.where(i0 < size_in - 1, i0 + 1, i0)
            l1 = src - i0.to(torch.float32)
            return i0, i1, 1 - l1, l1

        y0, y1, wy0, wy1 = axis(idx.y, h_in)
        x0, x1, wx0, wx1 = axis(idx.x, w_in)
        rows = torch.stack([padded_row_index(idx.n, ty, tx, h_in, w_in) for ty, tx in ((y0, x0), (y0, x1), (y1, x0),
                                                                                       (y1, x1))], dim=1).contiguous()
        weights = torch.stack([wy0 * wx0, wy0 * wx1, wy1 * wx0, wy1 * wx1], dim=1).contiguous()
        self._taps[key] = (rows, weights)
        return rows, weights

    def rbf_tables(self, hw) -> Tuple[Optional[Tensor], Tensor, Tensor]:
        """The ``rbf`` fill at resolution ``hw`` as a sparse matrix over the active rows, cached.

        ADP-C's fill at a stopped position q is ``sum_d K(d) y(q + d) m(q + d)`` over the 7x7 window (K normalised
        by its full sum, so positions with no active pixel within 3 hold exactly 0). Only the stopped positions
        within Chebyshev distance 3 of an active one (the *support*) can be non-zero; the ring that active 3x3
        windows read (distance 1) is part of it. Returns ``(W, support_rows, far_rows)``: ``W`` a CSR matrix
        (support x M) holding ``K(d)`` for each (support position, active tap) pair (None when there is none),
        the padded-buffer rows of the support and of the other stopped positions.
        """
        key = (int(hw[0]), int(hw[1]))
        hit = self._rbf.get(key)
        if hit is not None:
            return hit
        idx = self.index(key)
        mask = idx.mask
        _, h, w = mask.shape
        dev = mask.device
        k = rbf_kernel(device=dev)
        r = torch.arange(-3, 4, device=dev)
        dy, dx = (t.reshape(-1) for t in torch.meshgrid(r, r, indexing='ij'))
        keep = (dy != 0) | (dx != 0)
        dy, dx = dy[keep], dx[keep]
        wt = k[dy + 3, dx + 3]
        # pairs (stopped q = p - d, active p): q reads p through the kernel tap at offset d
        qy = idx.y[:, None] - dy[None, :]
        qx = idx.x[:, None] - dx[None, :]
        img = idx.n[:, None].expand_as(qy)
        inside = (qy >= 0) & (qy < h) & (qx >= 0) & (qx < w)  # F.conv2d's zero padding: no tap outside the map
        qy, qx = qy.clamp(0, h - 1), qx.clamp(0, w - 1)
        sel = inside & ~mask[img, qy, qx]
        grid = (img * h + qy) * w + qx
        cols = torch.arange(idx.num_active, device=dev)[:, None].expand_as(qy)
        g, c, v = grid[sel], cols[sel], wt[None, :].expand_as(qy)[sel]
        support, row = torch.unique(g, return_inverse=True)
        order = torch.argsort(row, stable=True)
        row, c, v = row[order], c[order], v[order]
        crow = torch.zeros(support.numel() + 1, dtype=torch.int64, device=dev)
        crow[1:] = torch.cumsum(torch.bincount(row, minlength=support.numel()), 0)
        mat = None
        if support.numel():
            with warnings.catch_warnings():  # "sparse CSR support is in beta": the CSR x dense product is all we use
                warnings.simplefilter('ignore')
                mat = torch.sparse_csr_tensor(crow, c, v, size=(support.numel(), idx.num_active))

        # support (sorted grid ids = raster order, the CSR's row order) and the other stopped positions as rows
        in_support = torch.zeros_like(mask)
        in_support.view(-1)[support] = True
        far = ~mask & ~in_support
        out = (mat, padded_row_index(*in_support.nonzero(as_tuple=True), h, w),
               padded_row_index(*far.nonzero(as_tuple=True), h, w))
        self._rbf[key] = out
        return out

    def mark_clean(self, buf: Tensor) -> Tensor:
        """Declares that the stopped positions of a (fresh, zero) buffer outside the rbf support hold 0."""
        self._clean[id(buf)] = weakref.ref(buf)
        return buf

    def _is_clean(self, buf: Tensor) -> bool:
        ref = self._clean.get(id(buf))
        return ref is not None and ref() is buf

    def finish(self, buf: Tensor) -> Tensor:
        """After a masked conv wrote the active positions of ``buf``: with ``rbf``, write ADP-C's interpolation of
        the active values at the stopped positions of its support (sparse matrix x active rows) and make sure the
        stopped positions beyond it hold 0, once per buffer; the other fills need no work here. Every position then
        equals the simulated path's ``torch.where(m, y, rbf_fill(y, m))``."""
        if self.fill == 'rbf':
            hw = (buf.shape[1] - 2, buf.shape[2] - 2)
            mat, support_rows, far_rows = self.rbf_tables(hw)
            flat = buf.view(-1, buf.shape[-1])
            if mat is not None:
                active = gather_rows(buf, self.index(hw))
                flat.index_copy_(0, support_rows, torch.sparse.mm(mat, active))
            if not self._is_clean(buf):
                flat.index_fill_(0, far_rows, 0)
                self.mark_clean(buf)
        return buf

    def zero_stopped(self, buf: Tensor) -> None:
        """Writes 0 at the stopped positions of a padded buffer (the ``zeros`` fill of a same-shape layer)."""
        hw = (buf.shape[1] - 2, buf.shape[2] - 2)
        stopped = ~self.masks.mask(hw)[:, 0]
        if stopped.any():
            padded_interior(buf).permute(0, 2, 3, 1)[stopped] = 0


def _units(seq: nn.Sequential) -> List[Tuple[nn.Conv2d, Optional[nn.Module], bool]]:
    """(conv, bn, relu) triples of a transition / fuse-downsample Sequential (possibly nested)."""
    mods = list(seq)
    if mods and all(isinstance(m, nn.Sequential) for m in mods):
        return [u for sub in mods for u in _units(sub)]
    conv = next(m for m in mods if isinstance(m, nn.Conv2d))
    bn = next((m for m in mods if isinstance(m, nn.modules.batchnorm._BatchNorm)), None)
    return [(conv, bn, any(isinstance(m, nn.ReLU) for m in mods))]


def _out_hw(buf: Tensor, conv: nn.Conv2d) -> Tuple[int, int]:
    h, w = buf.shape[1] - 2, buf.shape[2] - 2
    k, s, p = conv.kernel_size[0], conv.stride[0], conv.padding[0]
    return (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1


def _run_units(ctx: _SparseContext, seq: nn.Sequential, buf: Tensor) -> Tensor:
    """A chain of shape-changing conv units; stopped positions of every output are 0 (fresh zero buffers)."""
    for conv, bn, relu in _units(seq):
        hw = _out_hw(buf, conv)
        out = ctx.mark_clean(new_padded_buffer(buf.shape[0], conv.out_channels, hw[0], hw[1], dtype=buf.dtype,
                                               device=buf.device))
        _packed(conv, bn).apply(buf, ctx.index(hw), out, relu=relu)
        buf = ctx.finish(out)
    return buf


def _block(ctx: _SparseContext, block: nn.Module, x: Tensor, h: Tensor, first: bool) -> None:
    """A BasicBlock in place: ``x <- relu(bn2(conv2(relu(bn1(conv1 x)))) + x)`` at the active positions.

    ``h`` is the branch's scratch buffer; its stopped positions hold the fill (copy: the stage's branch input,
    which no layer changes at stopped positions; zeros: 0).
    """
    if not isinstance(block, BasicBlock) or block.downsample is not None:
        raise NotImplementedError('sparse masked stages support BasicBlocks without downsample (HRNet stages 2-4)')
    idx = ctx.index((x.shape[1] - 2, x.shape[2] - 2))
    ctx.finish(_packed(block.conv1, block.norm1).apply(x, idx, h, relu=True))
    # conv2 reads h (never x), the residual row is read before it is overwritten: safe in place
    ctx.finish(_packed(block.conv2, block.norm2).apply(h, idx, x, residual=x, relu=True))
    if first and ctx.fill == 'zeros':
        ctx.zero_stopped(x)  # the block input's own stopped values were read by conv1; from now on they are 0


def _fuse(ctx: _SparseContext, module: nn.Module, bufs: List[Tensor]) -> List[Tensor]:
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
                t = ctx.mark_clean(new_padded_buffer(bufs[j].shape[0], conv.out_channels, *sizes[j],
                                                     dtype=acc.dtype, device=acc.device))
                ctx.finish(_packed(conv, bn).apply(bufs[j], ctx.index(sizes[j]), t))
                scale = float(upsample.scale_factor)
                if all(int(sj * scale) == si for sj, si in zip(sizes[j], sizes[i])) and not upsample.align_corners:
                    # bilinear upsampling evaluated at the active rows only (4 taps each) instead of the full map
                    rows, weights = ctx.bilinear_taps(sizes[i], sizes[j], scale)
                    add_weighted_rows_(acc, t.view(-1, t.shape[-1]), rows, weights)
                else:  # sizes that the scale factor does not reach exactly: mmseg's two-step resize, densely
                    up = resize(upsample(padded_interior(t)), size=sizes[i], mode='bilinear', align_corners=False)
                    acc += up.permute(0, 2, 3, 1)[ctx.masks.mask(sizes[i])[:, 0]]
            else:
                units = _units(layer)
                src = bufs[j]
                for conv, bn, relu in units[:-1]:
                    hw = _out_hw(src, conv)
                    out = ctx.mark_clean(new_padded_buffer(src.shape[0], conv.out_channels, *hw, dtype=src.dtype,
                                                           device=src.device))
                    _packed(conv, bn).apply(src, ctx.index(hw), out, relu=relu)
                    src = ctx.finish(out)
                conv, bn, relu = units[-1]
                p = _packed(conv, bn)
                acc += sparse_conv_rows(src, idx_i, p.wmat, p.bias, stride=p.stride, padding=p.padding, relu=relu,
                                        dense_weight=p.weight)
        results.append(acc.relu_())
    outs = bufs[:len(results)]
    for i, rows in enumerate(results):
        # all outputs are computed before any buffer is overwritten: every fuse reads the blocks' outputs
        ctx.finish(scatter_rows(outs[i], ctx.index(sizes[i]), rows))
    return outs


@torch.no_grad()
def sparse_stage(backbone: nn.Module, stage: int, feats: List[Tensor], active: Tensor, fill: str = 'copy'
                 ) -> List[Tensor]:
    """Transition ``stage - 1`` and stage ``stage`` computed at the active pixels only.

    Args:
        backbone (EarlyExitHRNet): The backbone (eval mode: BN folded with its running statistics).
        stage (int): 2, 3 or 4.
        feats (list[Tensor]): Previous stage's branch outputs (NCHW).
        active (Tensor): (B, H/4, W/4) bool, True = still computing.
        fill (str): ``'copy'`` or ``'zeros'``.

    Returns:
        list[Tensor]: Branch outputs, NCHW views (channels-last strides) of the stage's buffers.
    """
    if stage not in (2, 3, 4):
        raise ValueError(f'masked stages are 2, 3 and 4 (stem, stage 1 and exit 1 are dense), got {stage}')
    if backbone.training:
        raise RuntimeError("feature_mask='sparse' is inference-only: call model.eval() (training with masks uses "
                           "the simulated path, train_cfg.masked_training)")
    ctx = _SparseContext(active, fill)
    converted: Dict[int, Tensor] = {}

    def buffer_of(t: Tensor) -> Tensor:
        if id(t) not in converted:
            converted[id(t)] = to_padded_nhwc(t)
        return converted[id(t)]

    # every transition reads its source before any block writes a branch buffer in place
    bufs = [buffer_of(src) if layer is None else _run_units(ctx, layer, buffer_of(src))
            for layer, src in backbone.transition_inputs(stage, feats)]
    scratch = [b.clone() if fill == 'copy' else ctx.mark_clean(torch.zeros_like(b)) for b in bufs]
    first = True
    for module in getattr(backbone, f'stage{stage}'):
        for i, branch in enumerate(module.branches):
            for k, block in enumerate(branch):
                _block(ctx, block, bufs[i], scratch[i], first and k == 0)
        first = False
        bufs = _fuse(ctx, module, bufs)
    return [padded_interior(b) for b in bufs]


def _masked_pointwise(conv: nn.Conv2d, bn: Optional[nn.Module], relu: bool, x: Tensor, mask: Tensor) -> Tensor:
    """A 1x1 conv (+BN, ReLU) evaluated on the active pixels' rows only; 0 elsewhere (shape-changing fill)."""
    if conv.kernel_size != (1, 1) or conv.stride != (1, 1):
        raise NotImplementedError('sparse exit heads support 1x1 convs only')
    p = _packed(conv, bn)
    n, _, h, w = x.shape
    out = x.new_zeros((n, h, w, conv.out_channels))
    m = mask[:, 0]
    rows = x.permute(0, 2, 3, 1)[m]
    y = torch.addmm(p.bias, rows, p.wmat) if p.bias is not None else rows @ p.wmat
    out[m] = y.relu_() if relu else y
    return out.permute(0, 3, 1, 2)


@torch.no_grad()
def sparse_head(head: nn.Module, feats: List[Tensor], active: Tensor, fill: str = 'copy') -> Tensor:
    """An exit head with its (1x1) convs computed on the active pixels only (RH exit, mmseg FCNHead with 1x1
    convs); the resizes, the concatenation and the pooling stay dense. Other heads run densely.

    Returns:
        Tensor: Logits; only the active positions are meaningful (the segmentor copies the rest).
    """
    from mmseg.models.decode_heads import FCNHead

    from ..decode_heads import EarlyExitRHHead
    ctx = _SparseContext(active, fill)
    masks = ctx.masks

    def done(y):  # stopped positions: 0 (shape-changing layers under copy/zeros) or the rbf interpolation
        if fill != 'rbf':
            return y
        # as in the stages: the interpolation only on its support (a sparse support x active matrix times the
        # active rows), 0 beyond it; y holds 0 at every stopped position already
        return padded_interior(ctx.finish(ctx.mark_clean(to_padded_nhwc(y))))

    def cm(mod, x):  # ConvModule: conv + bn + activation
        return done(_masked_pointwise(mod.conv, getattr(mod, 'bn', None), mod.with_activation, x,
                                      masks.mask(x.shape[-2:])))

    def seg(x):
        return done(_masked_pointwise(head.conv_seg, None, False, x, masks.mask(x.shape[-2:])))

    if isinstance(head, EarlyExitRHHead):
        x = head._transform_inputs(feats)
        sizes = [x.shape[2:]]
        for conv in head.down_convs:
            x = cm(conv, head.pool(x))
            sizes.append(x.shape[2:])
        for i, conv in enumerate(head.up_convs):
            x = cm(conv, resize(x, size=sizes[-2 - i], mode='bilinear', align_corners=head.align_corners))
        return seg(resize(x, size=sizes[0], mode='bilinear', align_corners=head.align_corners))
    if isinstance(head, FCNHead) and not head.concat_input and all(c.conv.kernel_size == (1, 1)
                                                                   for c in head.convs):
        x = head._transform_inputs(feats)
        for conv in head.convs:
            x = cm(conv, x)
        return seg(x)
    return head(feats)
