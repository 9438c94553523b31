"""Per-exit state of sparse masked execution: sparse indices per resolution, the fill, BN-folded conv cache.

Shared by every sparse path (HRNet stages, exit heads): one :class:`~mmseg_cbt.ops.SparseIndex` per resolution and
exit, the bilinear taps and the ``rbf`` fill tables computed once, and convs folded with their BN
(:class:`~mmseg_cbt.ops.PackedConv`) cached per module until any of their tensors changes.
"""
import warnings
import weakref
from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn
from torch import Tensor

from mmseg_cbt.ops import PackedConv, SparseIndex, gather_rows, padded_interior, padded_row_index, to_padded_nhwc
from .semantics import MaskContext, rbf_kernel

__all__ = ['SparseContext', 'packed_conv']

_PACKED: 'weakref.WeakKeyDictionary[nn.Module, Tuple[tuple, PackedConv]]' = weakref.WeakKeyDictionary()


def _version(t: Tensor) -> int:
    # inference-mode tensors have no version counter; they cannot be changed in place outside inference mode
    return -1 if t.is_inference() else t._version


def packed_conv(conv: nn.Conv2d, bn: Optional[nn.Module]) -> PackedConv:
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


class SparseContext:
    """Masks and sparse indices per resolution for one exit, plus the fill rule."""

    def __init__(self, active: Tensor, fill: str) -> None:
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
        rows = torch.stack(
            [padded_row_index(idx.n, ty, tx, h_in, w_in) for ty, tx in ((y0, x0), (y0, x1), (y1, x0), (y1, x1))],
            dim=1).contiguous()
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
        out = (mat, padded_row_index(*in_support.nonzero(as_tuple=True), h,
                                     w), padded_row_index(*far.nonzero(as_tuple=True), h, w))
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

    def pointwise(self, conv: nn.Conv2d, bn: Optional[nn.Module], relu: bool, x: Tensor) -> Tensor:
        """A 1x1 conv (+BN, ReLU) at the active positions of ``x`` (NCHW) only; stopped positions hold the fill
        of a shape-changing layer (0, or the rbf interpolation on its support)."""
        if conv.kernel_size != (1, 1) or conv.stride != (1, 1):
            raise NotImplementedError('sparse exit heads support 1x1 convs only')
        p = packed_conv(conv, bn)
        n, _, h, w = x.shape
        out = x.new_zeros((n, h, w, conv.out_channels))
        m = self.masks.mask((h, w))[:, 0]
        rows = x.permute(0, 2, 3, 1)[m]
        y = torch.addmm(p.bias, rows, p.wmat) if p.bias is not None else rows @ p.wmat
        out[m] = y.relu_() if relu else y
        y = out.permute(0, 3, 1, 2)
        if self.fill != 'rbf':
            return y
        # as in the stages: the interpolation only on its support, 0 beyond it (y holds 0 at stopped positions)
        return padded_interior(self.finish(self.mark_clean(to_padded_nhwc(y))))
