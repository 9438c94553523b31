"""The stage-level masked conv entry points and their dispatch: validation, sparse-or-dense, backend.

``sparse_conv_rows`` / ``sparse_conv_buffer`` validate one call (:class:`ConvCall`), ask the policy whether the
active fraction is below the conv's crossover (:func:`resolve_threshold`), and run either the dense fallback
(:mod:`.dense`) or one sparse implementation: Triton on CUDA (:mod:`.triton_impl`), the compiled CPU kernel
(:mod:`.cpp_impl`) or the PyTorch ops (:mod:`.torch_impl`), all from the same index tables.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..policy import dense_threshold as policy_threshold
from .cpp_impl import cpp_sparse, cpu_ext_for
from .dense import dense_conv_buffer, dense_nhwc
from .index import SparseIndex, check_buffer_matches
from .layout import check_buffer
from .packing import dense_weight as dense_weight_of
from .packing import kernel_from_wmat
from .rows import residual_source, rows_epilogue
from .torch_impl import torch_sparse
from .triton_impl import HAS_TRITON, sparse_conv_rows_triton

__all__ = ['ConvCall', 'resolve_threshold', 'sparse_conv_buffer', 'sparse_conv_rows', 'use_triton']

BACKENDS = ('auto', 'torch', 'cpp', 'triton')


class ConvCall:
    """Validated arguments of one masked conv call (shared by the row and buffer entry points)."""

    def __init__(self, buf: Tensor, idx: SparseIndex, wmat: Tensor, bias: Optional[Tensor], stride: int,
                 padding: Optional[int], in_pad: int) -> None:
        check_buffer(buf, 'input buffer')
        self.cin = buf.shape[-1]
        self.k = kernel_from_wmat(wmat, self.cin)
        self.cout = wmat.shape[1]
        self.stride = stride
        self.padding = self.k // 2 if padding is None else padding
        self.in_pad = in_pad
        self.h_in = buf.shape[1] - 2 * in_pad
        self.w_in = buf.shape[2] - 2 * in_pad
        if buf.shape[0] != idx.batch:
            raise ValueError(f'batch mismatch: input buffer has {buf.shape[0]} images, mask has {idx.batch}')
        if wmat.dtype != buf.dtype or (bias is not None and bias.dtype != buf.dtype):
            raise TypeError(f'dtype mismatch: buffer {buf.dtype}, weight {wmat.dtype}, '
                            f'bias {None if bias is None else bias.dtype}')
        if bias is not None and tuple(bias.shape) != (self.cout, ):
            raise ValueError(f'bias must be ({self.cout},), got {tuple(bias.shape)}')
        # validates the geometry against the mask grid (and builds / caches the tables)
        self.top_left, self.strips = idx.windows((self.h_in, self.w_in), self.k, stride, self.padding, in_pad)


def use_triton(backend: str, t: Tensor) -> bool:
    """Whether ``backend`` runs the Triton kernel for tensor ``t`` (``'auto'``: CUDA tensors, triton importable)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be 'auto', 'torch', 'cpp' or 'triton', got {backend!r}")
    if backend == 'triton' and not HAS_TRITON:
        raise RuntimeError("backend='triton' requested but triton is not importable")
    return backend == 'triton' or (backend == 'auto' and t.is_cuda and HAS_TRITON)


def resolve_threshold(dense_threshold: Optional[float], backend: str, t: Tensor, kernel_size: int, cin: int,
                      cout: int) -> float:
    """The active fraction above which a call runs densely: ``dense_threshold`` if given, else the policy's."""
    if dense_threshold is not None:
        return dense_threshold
    triton = use_triton(backend, t)
    return policy_threshold(
        kernel_size, cin, cout, t.dtype, triton=triton, ext=None if triton else cpu_ext_for(backend, t))


def _run_sparse(buf: Tensor, idx: SparseIndex, call: ConvCall, wmat: Tensor, bias: Optional[Tensor],
                res_src: Optional[Tensor], res_rows: Optional[Tensor], relu: bool, dst: Tensor,
                dst_rows: Optional[Tensor], chunk_rows: Optional[int], backend: str) -> None:
    """The sparse path of one validated call, by backend; ``dst`` / ``dst_rows`` as in ``torch_sparse``."""
    if use_triton(backend, buf):
        sparse_conv_rows_triton(
            buf,
            call.top_left,
            wmat,
            bias,
            in_row_width=buf.shape[2],
            kernel_size=call.k,
            residual=res_src,
            residual_rows=res_rows,
            relu=relu,
            out=dst,
            out_rows=dst_rows)
        return
    ext = cpu_ext_for(backend, buf)
    if ext is None:
        torch_sparse(buf, idx, call.strips, call.k, wmat, bias, res_src, res_rows, relu, dst, dst_rows, chunk_rows)
    else:
        cpp_sparse(ext, buf, idx, call.strips, call.k, wmat, bias, res_src, res_rows, relu, dst, dst_rows, chunk_rows)


def sparse_conv_rows(buf: Tensor,
                     idx: SparseIndex,
                     wmat: Tensor,
                     bias: Optional[Tensor] = None,
                     *,
                     stride: int = 1,
                     padding: Optional[int] = None,
                     residual: Optional[Tensor] = None,
                     relu: bool = False,
                     in_pad: int = 1,
                     res_pad: int = 1,
                     out: Optional[Tensor] = None,
                     chunk_rows: Optional[int] = None,
                     dense_weight: Optional[Tensor] = None,
                     dense_threshold: Optional[float] = None,
                     backend: str = 'auto') -> Tensor:
    """Computes a conv (+ bias, residual, ReLU) at the active positions only, as compact rows.

    ``y[i] = relu(window_i(buf) @ wmat + bias + residual[i])`` for the ``M`` active positions of ``idx`` in its row
    order. The input buffer is read in full (stopped positions included).

    Args:
        buf (Tensor): Input buffer ``(N, H_in + 2 in_pad, W_in + 2 in_pad, Cin)``, contiguous, zero border.
            ``H_in = H`` for stride 1; for stride 2 the finer map (e.g. ``2 H``).
        idx (SparseIndex): Index of the output mask ``(N, H, W)``.
        wmat (Tensor): ``(k*k*Cin, Cout)`` from :func:`~mmseg_cbt.ops.conv_weight_matrix` (k = 1 or 3 inferred).
        bias (Tensor, optional): ``(Cout,)`` (BN folded in by the caller).
        stride (int): 1 or 2.
        padding (int, optional): Conv padding, default ``k // 2``; must be ``<= in_pad``.
        residual (Tensor, optional): Added before the ReLU: contiguous compact rows ``(M, Cout)`` or a padded buffer
            ``(N, H + 2 res_pad, W + 2 res_pad, Cout)`` at the output resolution.
        relu (bool): Apply ReLU last.
        in_pad (int): Border width of ``buf``.
        res_pad (int): Border width of a residual buffer.
        out (Tensor, optional): Contiguous ``(M, Cout)`` tensor receiving the rows.
        chunk_rows (int, optional): Active rows per gather / GEMM chunk; default sized to the caches.
        dense_weight (Tensor, optional): ``(Cout, Cin, k, k)`` weight for the dense fallback (derived from
            ``wmat`` if None, at the cost of a reshape copy).
        dense_threshold (float, optional): Active fraction above which the dense conv (+ a row gather) is used;
            default the policy's (:func:`~mmseg_cbt.ops.dense_crossover` on CPU, full masks only with Triton).
            ``float('inf')`` forces the sparse path.
        backend (str): ``'auto'`` (CUDA tensors: Triton when importable, else PyTorch; float32/64 CPU tensors: the
            compiled CPU kernel when built, else PyTorch), ``'torch'`` (pure PyTorch, the reference), ``'cpp'``
            (the compiled CPU kernel, error if unavailable) or ``'triton'`` (also runs on CPU tensors under
            ``TRITON_INTERPRET=1``).

    Returns:
        Tensor: ``(M, Cout)`` rows (``out`` if given).
    """
    call = ConvCall(buf, idx, wmat, bias, stride, padding, in_pad)
    m, cout = idx.num_active, call.cout
    if out is None:
        out = torch.empty(m, cout, dtype=buf.dtype, device=buf.device)
    elif tuple(out.shape) != (m, cout) or not out.is_contiguous():
        raise ValueError(f'out must be a contiguous ({m}, {cout}) tensor, got {tuple(out.shape)}')
    res_src, res_rows = residual_source(residual, idx, res_pad, cout)
    if m == 0:
        return out
    if idx.active_fraction > resolve_threshold(dense_threshold, backend, buf, call.k, call.cin, cout):
        w4 = dense_weight if dense_weight is not None else dense_weight_of(wmat, call.k, call.cin)
        y = dense_nhwc(buf, w4, bias, call.h_in, call.w_in, stride, call.padding, in_pad)
        torch.index_select(y.view(-1, cout), 0, idx.rows(0), out=out)
        return rows_epilogue(out, res_src, res_rows, relu)
    _run_sparse(buf, idx, call, wmat, bias, res_src, res_rows, relu, out, None, chunk_rows, backend)
    return out


def sparse_conv_buffer(buf: Tensor,
                       idx: SparseIndex,
                       wmat: Tensor,
                       bias: Optional[Tensor],
                       out_buf: Tensor,
                       *,
                       stride: int = 1,
                       padding: Optional[int] = None,
                       residual: Optional[Tensor] = None,
                       relu: bool = False,
                       in_pad: int = 1,
                       out_pad: int = 1,
                       res_pad: int = 1,
                       chunk_rows: Optional[int] = None,
                       dense_weight: Optional[Tensor] = None,
                       dense_threshold: Optional[float] = None,
                       backend: str = 'auto') -> Tensor:
    """Masked conv from a padded buffer into a padded buffer: active positions written, others kept.

    The stage-level entry point. Below the dense threshold: per chunk of active rows, gather windows -> GEMM ->
    bias / residual / ReLU -> scatter into ``out_buf`` (Triton on CUDA: all fused in one kernel). Above it: the
    dense conv, then only the active positions are written, so stopped positions keep their value on both paths.

    Args:
        buf (Tensor): Input buffer (see :func:`sparse_conv_rows`).
        idx (SparseIndex): Index of the output mask.
        wmat (Tensor): ``(k*k*Cin, Cout)`` weight matrix.
        bias (Tensor, optional): ``(Cout,)``.
        out_buf (Tensor): Output buffer ``(N, H + 2 out_pad, W + 2 out_pad, Cout)``; must not be ``buf``.
        stride (int): 1 or 2.
        padding (int, optional): Default ``k // 2``.
        residual (Tensor, optional): Compact rows ``(M, Cout)`` or a padded buffer at the output resolution. It may
            be ``out_buf`` itself (each active row is read before it is overwritten).
        relu (bool): Apply ReLU.
        in_pad (int): Border of ``buf``.
        out_pad (int): Border of ``out_buf``.
        res_pad (int): Border of a residual buffer.
        chunk_rows (int, optional): See :func:`sparse_conv_rows`.
        dense_weight (Tensor, optional): ``(Cout, Cin, k, k)`` for the dense fallback (else derived from ``wmat``).
        dense_threshold (float, optional): See :func:`sparse_conv_rows`.
        backend (str): ``'auto'``, ``'torch'``, ``'cpp'`` or ``'triton'`` (see :func:`sparse_conv_rows`).

    Returns:
        Tensor: ``out_buf``.
    """
    call = ConvCall(buf, idx, wmat, bias, stride, padding, in_pad)
    check_buffer(out_buf, 'output buffer')
    check_buffer_matches(out_buf, idx, out_pad, 'output buffer')
    if out_buf.shape[-1] != call.cout:
        raise ValueError(f'output buffer has {out_buf.shape[-1]} channels, conv has {call.cout}')
    if out_buf.data_ptr() == buf.data_ptr():
        raise ValueError('out_buf must not alias the input buffer (windows read neighbours)')
    res_src, res_rows = residual_source(residual, idx, res_pad, call.cout)
    if idx.num_active == 0:
        return out_buf
    if idx.active_fraction > resolve_threshold(dense_threshold, backend, buf, call.k, call.cin, call.cout):
        return dense_conv_buffer(
            buf,
            dense_weight if dense_weight is not None else wmat,
            bias,
            out_buf,
            stride=stride,
            padding=call.padding,
            residual=residual,
            relu=relu,
            idx=idx,
            in_pad=in_pad,
            out_pad=out_pad,
            res_pad=res_pad)
    _run_sparse(buf, idx, call, wmat, bias, res_src, res_rows, relu, out_buf.view(-1, call.cout), idx.rows(out_pad),
                chunk_rows, backend)
    return out_buf
