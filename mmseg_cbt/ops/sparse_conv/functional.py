"""``sparse_conv2d``: the masked conv as a drop-in functional op on NCHW tensors (one conv, one mask)."""
from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..policy import direct_flag
from .cache import cached_all, cached_index, cached_weight_matrix, cached_wide_pack
from .cpp_impl import cpu_ext_for, ext_band_rows, ext_chunk_rows
from .dispatch import resolve_threshold, sparse_conv_buffer, sparse_conv_rows, use_triton
from .index import SparseIndex, check_mask
from .layout import check_geometry, conv_output_size, zero_border

__all__ = ['sparse_conv2d']

# per thread, the padded input buffers of the last few input shapes: reused from call to call (a fresh 6 MB buffer
# per call costs its allocation and first touch, and made the op's time vary by 1.2-1.5x between runs)
_WORKSPACES = threading.local()
_MAX_WORKSPACES = 4


def _workspace(shape: Tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """This thread's reusable buffer of ``shape`` (contents undefined: every call writes what it reads)."""
    bufs = getattr(_WORKSPACES, 'bufs', None)
    if bufs is None:
        bufs = _WORKSPACES.bufs = OrderedDict()
    key = (shape, dtype, device)
    buf = bufs.get(key)
    if buf is None:
        buf = bufs[key] = torch.empty(shape, dtype=dtype, device=device)
        while len(bufs) > _MAX_WORKSPACES:
            bufs.popitem(last=False)
    bufs.move_to_end(key)
    return buf


def _check_args(input: Tensor, weight: Tensor, bias: Optional[Tensor], mask: Tensor, stride: int, padding: int,
                out: Optional[Tensor]) -> None:
    if not isinstance(input, Tensor) or input.dim() != 4:
        raise ValueError(f'input must be (N, C, H, W), got '
                         f'{tuple(input.shape) if isinstance(input, Tensor) else type(input).__name__}')
    if not input.is_floating_point():
        raise TypeError(f'input must be floating point, got {input.dtype}')
    if weight.dim() != 4 or weight.shape[2] != weight.shape[3]:
        raise ValueError(f'weight must be (Cout, Cin, k, k), got {tuple(weight.shape)}')
    if weight.dtype != input.dtype or (bias is not None and bias.dtype != input.dtype):
        raise TypeError(f'dtype mismatch: input {input.dtype}, weight {weight.dtype}, '
                        f'bias {None if bias is None else bias.dtype}')
    if weight.device != input.device or mask.device != input.device:
        raise TypeError('input, weight and mask must be on the same device')
    n, c, h, w = input.shape
    cout, cin, k, _ = weight.shape
    if cin != c:
        raise ValueError(f'weight expects {cin} input channels, input has {c}')
    check_geometry(k, stride, padding)
    if bias is not None and tuple(bias.shape) != (cout, ):
        raise ValueError(f'bias must be ({cout},), got {tuple(bias.shape)}')
    ho, wo = conv_output_size(h, k, stride, padding), conv_output_size(w, k, stride, padding)
    if ho <= 0 or wo <= 0:
        raise ValueError(f'input {(h, w)} too small for kernel {k} with padding {padding}')
    check_mask(mask)
    if mask.shape[0] != n:
        raise ValueError(f'batch mismatch: input has {n} images, mask has {mask.shape[0]}')
    if tuple(mask.shape[1:]) != (ho, wo):
        raise ValueError(f'mask spatial shape {tuple(mask.shape[1:])} does not match the conv output '
                         f'{(ho, wo)} (input {(h, w)}, kernel {k}, stride {stride}, padding {padding})')
    if out is not None:
        if tuple(out.shape) != (n, cout, ho, wo):
            raise ValueError(f'out must have the output shape {(n, cout, ho, wo)}, got {tuple(out.shape)}')
        if out.dtype != input.dtype or out.device != input.device:
            raise TypeError('out must have the dtype and device of input')


def sparse_conv2d(input: Tensor,
                  weight: Tensor,
                  bias: Optional[Tensor],
                  mask: Tensor,
                  stride: int = 1,
                  padding: int = 0,
                  out: Optional[Tensor] = None,
                  *,
                  dense_threshold: Optional[float] = None,
                  backend: str = 'auto') -> Tensor:
    """Masked 2-D convolution: the dense conv's values at active output positions only.

    Every window reads the full input (including positions the caller considers stopped, which hold whatever value
    the caller put there); zero padding at the border as in :func:`torch.nn.functional.conv2d`.

    * Active positions (``mask == True``) hold exactly ``F.conv2d(input, weight, bias, stride, padding)`` (up to
      fp32 summation order).
    * Stopped positions hold 0 - or, if ``out`` is given, the op writes the active positions into ``out`` in place
      and leaves its stopped positions untouched (how a caller gets "copy" fill at zero cost).
    * An empty mask computes nothing (zeros, or ``out`` untouched); above the dense threshold (default the
      policy's, :func:`~mmseg_cbt.ops.dense_crossover` on CPU) the dense conv is run and masked; a full mask is the
      dense conv.

    With autograd active (an input, the weight or the bias requires grad and grad mode is on) it computes the dense
    conv and masks it, so it stays differentiable; the fast paths are inference-only.

    This is the per-call convenience API. On the compiled CPU kernel each thread transposes the input rows that its
    active windows read, a band of output rows at a time, into a small padded channels-last buffer of its own (the
    other paths copy them into one padded buffer of the whole map); the mask's index and the weight's GEMM matrix
    are cached on the mask and weight tensors (:mod:`~mmseg_cbt.ops.sparse_conv.cache`: reused while the same tensor
    is alive and unchanged), and the result is written straight into the output. A network running many convs on
    one mask keeps its features in the padded layout through a stage instead: :class:`~mmseg_cbt.ops.SparseIndex` and
    :func:`~mmseg_cbt.ops.sparse_conv_buffer` / :func:`~mmseg_cbt.ops.sparse_conv_rows`.

    Args:
        input (Tensor): ``(N, C, H, W)`` floating tensor.
        weight (Tensor): ``(Cout, C, k, k)``, k in {1, 3}.
        bias (Tensor, optional): ``(Cout,)``.
        mask (Tensor): Bool ``(N, H_out, W_out)``, True = compute; each image has its own mask.
        stride (int): 1 or 2.
        padding (int): Zero padding.
        out (Tensor, optional): ``(N, Cout, H_out, W_out)`` tensor written in place at active positions.
        dense_threshold (float, optional): Active fraction above which the dense conv is used.
        backend (str): ``'auto'``, ``'torch'``, ``'cpp'`` or ``'triton'`` (see
            :func:`~mmseg_cbt.ops.sparse_conv_rows`).

    Returns:
        Tensor: ``(N, Cout, H_out, W_out)`` (``out`` if given). A freshly allocated result may be in channels-last
        memory format.

    Raises:
        TypeError: Non-bool mask, non-floating input, dtype or device mismatches.
        ValueError: Unsupported kernel size or stride, bad shapes, batch or mask/output size mismatch.
    """
    _check_args(input, weight, bias, mask, stride, padding, out)
    n = input.shape[0]
    cout, cin, k, _ = weight.shape
    ho, wo = mask.shape[1:]
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (input, weight, bias)):
        # the sparse kernels write into preallocated buffers (no autograd): the same values densely, then masked
        y = F.conv2d(input, weight, bias, stride=stride, padding=padding)
        keep = mask[:, None]
        return torch.where(keep, y, 0.0) if out is None else out.copy_(torch.where(keep, y, out))
    if cached_all(mask):
        # nothing stopped: the dense conv, without building an index (a full nonzero() costs ~0.7x a thin conv)
        y = F.conv2d(input, weight, bias, stride=stride, padding=padding)
        return y if out is None else out.copy_(y)
    idx = cached_index(mask)
    m = idx.num_active
    if m == 0:
        return out if out is not None else input.new_zeros(n, cout, ho, wo)
    if idx.active_fraction > resolve_threshold(dense_threshold, backend, input, k, cin, cout):
        y = F.conv2d(input, weight, bias, stride=stride, padding=padding)
        keep = mask[:, None]
        if out is None:
            return y.masked_fill_(~keep, 0)
        return out.copy_(torch.where(keep, y, out))
    ext = cpu_ext_for(backend, input)
    if ext is not None:
        return _sparse_conv_nchw(ext, input, weight, bias, mask, idx, stride, padding, out)
    buf = _read_rows_buffer(input, idx, k, stride, padding)
    kwargs = dict(
        stride=stride,
        padding=padding,
        in_pad=padding,
        dense_threshold=float('inf'),
        backend='triton' if use_triton(backend, input) else backend)
    wmat = cached_weight_matrix(weight)
    if out is None or out.is_contiguous(memory_format=torch.channels_last):
        # rows straight into the channels-last output (stopped positions zero, or out's own values)
        dst = out.permute(0, 2, 3, 1) if out is not None else input.new_zeros(n, ho, wo, cout)
        sparse_conv_buffer(buf, idx, wmat, bias, dst, out_pad=0, **kwargs)
        return dst.permute(0, 3, 1, 2) if out is None else out
    rows = sparse_conv_rows(buf, idx, wmat, bias, **kwargs)
    out.permute(0, 2, 3, 1).index_put_((idx.n, idx.y, idx.x), rows)
    return out


def _sparse_conv_nchw(ext, input: Tensor, weight: Tensor, bias: Optional[Tensor], mask: Tensor, idx: SparseIndex,
                      stride: int, padding: int, out: Optional[Tensor]) -> Tensor:
    """The compiled kernel's path: the NCHW input read through per-thread bands of padded rows (no padded copy of
    the whole map), the rows written straight into the channels-last output (or compact, then put into ``out``)."""
    n, c, h, w = input.shape
    cout, _, k, _ = weight.shape
    ho, wo = mask.shape[1:]
    _, strips = idx.windows((h, w), k, stride, padding, padding)
    itemsize = input.element_size()
    wmat = cached_weight_matrix(weight)
    direct = direct_flag(ext, cout, input.dtype)
    args = (input, idx.input_reads(
        (h, w), k, stride, padding), strips, k, stride, padding, wmat, None if bias is None else bias.contiguous())
    tail = (ext_band_rows(w + 2 * padding, c, itemsize, k,
                          stride), ext_chunk_rows(k * k * c, itemsize, idx.num_active,
                                                  threads=1), direct, cached_wide_pack(ext, wmat, direct))
    if out is None or out.is_contiguous(memory_format=torch.channels_last):
        if out is not None:
            dst = out.permute(0, 2, 3, 1)
        else:
            # zeros at the stopped pixels only (the kernel writes the others): half the writes of a zeroed output
            dst = ext.zero_stopped(input.new_empty(n, ho, wo, cout), mask.contiguous())
        ext.sparse_conv_nchw(*args, dst.view(-1, cout), idx.rows(0), ho, wo, False, *tail)
        return dst.permute(0, 3, 1, 2) if out is None else out
    rows = input.new_empty(idx.num_active, cout)
    ext.sparse_conv_nchw(*args, rows, idx.rows(0), ho, wo, True, *tail)
    out.permute(0, 2, 3, 1).index_put_((idx.n, idx.y, idx.x), rows)
    return out


def _read_rows_buffer(input: Tensor, idx: SparseIndex, k: int, stride: int, padding: int) -> Tensor:
    """The padded channels-last buffer of ``input`` for the PyTorch and Triton paths: its border zeroed and the input
    rows the active windows read (``y * stride - padding`` to ``... + k - 1`` of their output rows ``y``) copied in;
    the other rows are never read and stay as they were."""
    n, c, h, w = input.shape
    buf = _workspace((n, h + 2 * padding, w + 2 * padding, c), input.dtype, input.device)
    y_lo, y_hi = idx.row_span()
    r0 = max(0, y_lo * stride - padding)
    r1 = min(h, y_hi * stride - padding + k)
    zero_border(buf, padding)
    buf[:, padding + r0:padding + r1, padding:padding + w].copy_(input[:, :, r0:r1].permute(0, 2, 3, 1))
    return buf
