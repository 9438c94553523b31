"""The dense fallback of the masked conv: a dense conv between padded buffers that writes only active positions."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .index import SparseIndex, check_buffer_matches
from .layout import check_buffer, check_geometry, zero_border
from .packing import dense_weight, kernel_from_wmat
from .rows import residual_source, rows_epilogue

__all__ = ['dense_conv_buffer', 'dense_nhwc']


def dense_nhwc(buf: Tensor, weight: Tensor, bias: Optional[Tensor], h_in: int, w_in: int, stride: int, padding: int,
               in_pad: int) -> Tensor:
    """Dense conv of a padded buffer; returns the output as a contiguous NHWC tensor."""
    off = in_pad - padding
    # the crop is exactly the conv's zero-padded input and a channels-last NCHW view, which oneDNN reads as it is
    x = buf[:, off:off + h_in + 2 * padding, off:off + w_in + 2 * padding, :].permute(0, 3, 1, 2)
    y = F.conv2d(x, weight, bias, stride=stride)
    # oneDNN returns channels-last output for channels-last input: .contiguous() is then a no-op
    return y.permute(0, 2, 3, 1).contiguous()


def _dense_1x1_buffer(buf: Tensor, weight: Tensor, bias: Optional[Tensor], out_buf: Tensor, residual: Optional[Tensor],
                      relu: bool, idx: Optional[SparseIndex], pad: int) -> Tensor:
    """Dense 1x1 conv between same-geometry buffers as ONE GEMM written straight into ``out_buf``.

    The border rows are computed too and re-zeroed, which saves the input crop and output copy of the generic path
    (as costly as the memory-bound 1x1 conv itself); stopped positions of a partial mask are saved and restored.
    """
    cin, cout = buf.shape[-1], out_buf.shape[-1]
    flat_in, flat_out = buf.view(-1, cin), out_buf.view(-1, cout)
    saved = stopped = None
    if idx is not None and idx.num_stopped:
        check_buffer_matches(out_buf, idx, pad, 'output buffer')
        stopped = idx.stopped_rows(pad)
        saved = flat_out.index_select(0, stopped)
    torch.mm(flat_in, weight.reshape(cout, cin).t(), out=flat_out)
    if bias is not None:  # a separate add: addmm is slower here (see torch_impl)
        flat_out.add_(bias)
    if residual is not None:
        flat_out.add_(residual.view(-1, cout))
    if relu:
        flat_out.relu_()
    zero_border(out_buf, pad)
    if saved is not None:
        flat_out.index_copy_(0, stopped, saved)
    return out_buf


def dense_conv_buffer(buf: Tensor,
                      weight: Tensor,
                      bias: Optional[Tensor],
                      out_buf: Tensor,
                      *,
                      stride: int = 1,
                      padding: Optional[int] = None,
                      residual: Optional[Tensor] = None,
                      relu: bool = False,
                      idx: Optional[SparseIndex] = None,
                      in_pad: int = 1,
                      out_pad: int = 1,
                      res_pad: int = 1) -> Tensor:
    """Dense conv (+ bias, residual, ReLU) from one padded buffer into another.

    The fallback of :func:`~mmseg_cbt.ops.sparse_conv_buffer`, usable on its own for the always-dense parts of a
    network (no NCHW<->NHWC copies: the buffers are viewed as channels-last NCHW).

    Args:
        buf (Tensor): Input buffer ``(N, H_in + 2 in_pad, W_in + 2 in_pad, Cin)``.
        weight (Tensor): ``(Cout, Cin, k, k)`` weight (or a ``(k*k*Cin, Cout)`` matrix, reshaped per call).
        bias (Tensor, optional): ``(Cout,)``.
        out_buf (Tensor): Output buffer ``(N, H + 2 out_pad, W + 2 out_pad, Cout)``.
        stride (int): 1 or 2.
        padding (int, optional): Default ``k // 2``.
        residual (Tensor, optional): Padded buffer ``(N, H + 2 res_pad, W + 2 res_pad, Cout)`` or, with ``idx``,
            compact rows ``(M, Cout)``; added before the ReLU.
        relu (bool): Apply ReLU.
        idx (SparseIndex, optional): Only its active positions of ``out_buf`` are written (the others keep their
            values).
        in_pad (int): Border of ``buf``.
        out_pad (int): Border of ``out_buf``.
        res_pad (int): Border of ``residual``.

    Returns:
        Tensor: ``out_buf``.
    """
    check_buffer(buf, 'input buffer')
    check_buffer(out_buf, 'output buffer')
    cin = buf.shape[-1]
    if weight.dim() == 2:
        k = kernel_from_wmat(weight, cin)
        weight = dense_weight(weight, k, cin)
    k = int(weight.shape[-1])
    padding = k // 2 if padding is None else padding
    check_geometry(k, stride, padding)
    if padding > in_pad:
        raise ValueError(f'conv padding {padding} exceeds the input buffer border {in_pad}')
    h_in, w_in = buf.shape[1] - 2 * in_pad, buf.shape[2] - 2 * in_pad
    if (k == 1 and stride == 1 and padding == 0 and in_pad == out_pad
            and tuple(out_buf.shape[:3]) == tuple(buf.shape[:3])
            and (residual is None or
                 (residual.dim() == 4 and res_pad == out_pad and residual.data_ptr() != out_buf.data_ptr()))):
        return _dense_1x1_buffer(buf, weight, bias, out_buf, residual, relu, idx, out_pad)
    y = dense_nhwc(buf, weight, bias, h_in, w_in, stride, padding, in_pad)
    n, ho, wo, cout = y.shape
    if tuple(out_buf.shape) != (n, ho + 2 * out_pad, wo + 2 * out_pad, cout):
        raise ValueError(f'output buffer {tuple(out_buf.shape)} does not fit the conv output '
                         f'{(n, ho, wo, cout)} with border {out_pad}')
    if idx is not None:
        check_buffer_matches(out_buf, idx, out_pad, 'output buffer')
    full = idx is None or idx.num_active == n * ho * wo
    res_is_rows = residual is not None and residual.dim() != 4
    if res_is_rows and idx is None:
        raise ValueError('a compact-rows residual needs idx')
    dst = out_buf[:, out_pad:out_pad + ho, out_pad:out_pad + wo, :]
    if full or (not res_is_rows and idx.num_active > idx.num_stopped):
        # write every position and restore the (fewer) stopped ones: a plain copy plus a gather / scatter of the
        # stopped rows, much less than writing the many active rows one by one
        if res_is_rows:  # full mask: the index's row order is the map's raster order
            res_src, _ = residual_source(residual, idx, res_pad, cout)
            y.view(-1, cout).add_(res_src)
        elif residual is not None:
            y.add_(residual[:, res_pad:res_pad + ho, res_pad:res_pad + wo, :])
        if relu:
            y.relu_()
        if full:
            dst.copy_(y)
            return out_buf
        stopped = idx.stopped_rows(out_pad)
        flat = out_buf.view(-1, cout)
        saved = flat.index_select(0, stopped)
        dst.copy_(y)
        flat.index_copy_(0, stopped, saved)
        return out_buf
    # few active positions: write only those, epilogue on the gathered active rows only
    rows = y.view(-1, cout).index_select(0, idx.rows(0))
    rows_epilogue(rows, *residual_source(residual, idx, res_pad, cout), relu)
    out_buf.view(-1, cout).index_copy_(0, idx.rows(out_pad), rows)
    return out_buf
