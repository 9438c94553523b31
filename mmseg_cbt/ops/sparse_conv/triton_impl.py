"""Triton kernel for masked convolution: fused neighbour gather + implicit GEMM + epilogue + scatter (CUDA).

Why Triton rather than a CUDA C++ extension: the development machines have a CPU-only torch, so a CUDA extension
could be neither built nor tested there and would need a build per torch/CUDA version; a Triton kernel is plain
Python, JIT-compiled on the GPU machine for its GPU, and ``TRITON_INTERPRET=1`` runs the very same kernel on CPU
tensors, so its parity with the PyTorch path is tested on the CPU machines too (``requirements/optional.txt`` pins
the triton of those tests). ``tl.dot`` maps onto tensor cores for fp16/bf16 (and tf32 if allowed).

Kernel design ("one owner per output row", no atomics, no im2col buffer in memory): a program owns ``BLOCK_M``
active output positions x ``BLOCK_N`` output channels. For each of the ``k*k`` taps it loads the ``BLOCK_M`` input
rows at ``top_left + ky * row_width + kx`` of the zero-bordered channels-last input buffer (contiguous ``Cin``
vectors, so the gather is coalesced along channels), multiplies them with the matching ``(BLOCK_K, BLOCK_N)`` slice
of the ``(k*k*Cin, Cout)`` weight matrix, accumulates in fp32, then applies bias, residual and ReLU in registers and
stores straight into the active rows of the output buffer.

Testing without a GPU: set ``TRITON_INTERPRET=1`` *before* triton is imported (triton decides between compiling and
interpreting when ``@triton.jit`` functions are defined, its own library included), then call with CPU tensors and
``backend='triton'``; ``tests/test_ops/test_sparse_conv_triton.py`` does this in a subprocess. Block sizes are plain
heuristics and the GPU dense-vs-sparse crossover is unmeasured, so by default only full masks go to the dense conv.

triton is optional: CPU users do not have it and this module then only reports ``HAS_TRITON = False``.
"""
import os
from typing import Optional

import torch
from torch import Tensor

try:  # optional dependency
    import triton
    import triton.language as tl
    HAS_TRITON = True
except ImportError:  # pragma: no cover - depends on the environment
    triton = None
    tl = None
    HAS_TRITON = False

__all__ = ['HAS_TRITON', 'triton_interpret_enabled', 'sparse_conv_rows_triton']


def triton_interpret_enabled() -> bool:
    """Whether ``TRITON_INTERPRET=1`` is set (Triton kernels then run on CPU tensors).

    The variable must be set before ``triton`` is first imported in the process: triton decides
    between compiling and interpreting when its (and our) ``@triton.jit`` functions are defined.
    """
    return os.environ.get('TRITON_INTERPRET', '0') not in ('', '0')


if HAS_TRITON:  # the body uses tl.* names, also in its annotations

    @triton.jit
    def _sparse_conv_kernel(x_ptr, w_ptr, b_ptr, res_ptr, out_ptr, tl_ptr, res_rows_ptr, out_rows_ptr, M, CIN, COUT,
                            ROW_W, KS: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr,
                            RES_INDEXED: tl.constexpr, OUT_INDEXED: tl.constexpr, RELU: tl.constexpr,
                            IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """Fused gather + implicit GEMM + bias/residual/ReLU epilogue + scatter (one program per block).

        x: (rows_in, CIN) flat padded input buffer; w: (KS*KS*CIN, COUT); tl_ptr: (M,) int64 top-left row
        of each window; res/out: flat (rows, COUT) tensors, addressed through res_rows/out_rows when
        *_INDEXED else by the active-row number.
        """
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        m_ok = offs_m < M
        base = tl.load(tl_ptr + offs_m, mask=m_ok, other=0).to(tl.int64)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < COUT
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for tap in tl.static_range(KS * KS):
            row = base + (tap // KS) * ROW_W + (tap % KS)
            for c0 in range(0, CIN, BLOCK_K):
                offs_k = c0 + tl.arange(0, BLOCK_K)
                k_ok = offs_k < CIN
                a = tl.load(x_ptr + row[:, None] * CIN + offs_k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
                w_row = tap * CIN + offs_k
                b = tl.load(
                    w_ptr + w_row[:, None].to(tl.int64) * COUT + offs_n[None, :],
                    mask=k_ok[:, None] & n_ok[None, :],
                    other=0.0)
                if IEEE:
                    acc = tl.dot(a, b, acc, input_precision='ieee')
                else:
                    acc = tl.dot(a, b, acc)
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        ok = m_ok[:, None] & n_ok[None, :]
        if HAS_RES:
            if RES_INDEXED:
                r_row = tl.load(res_rows_ptr + offs_m, mask=m_ok, other=0).to(tl.int64)
            else:
                r_row = offs_m.to(tl.int64)
            acc += tl.load(res_ptr + r_row[:, None] * COUT + offs_n[None, :], mask=ok, other=0.0).to(tl.float32)
        if RELU:
            # NaN propagates as in torch.relu (the default NaN handling of tl.maximum is unspecified)
            acc = tl.maximum(acc, 0.0, propagate_nan=tl.PropagateNan.ALL)
        if OUT_INDEXED:
            o_row = tl.load(out_rows_ptr + offs_m, mask=m_ok, other=0).to(tl.int64)
        else:
            o_row = offs_m.to(tl.int64)
        tl.store(out_ptr + o_row[:, None] * COUT + offs_n[None, :], acc.to(out_ptr.dtype.element_ty), mask=ok)


def _next_pow2(v: int) -> int:
    return 1 << max(0, (int(v) - 1).bit_length())


def sparse_conv_rows_triton(buf: Tensor,
                            top_left: Tensor,
                            wmat: Tensor,
                            bias: Optional[Tensor],
                            *,
                            in_row_width: int,
                            kernel_size: int,
                            residual: Optional[Tensor] = None,
                            residual_rows: Optional[Tensor] = None,
                            relu: bool = False,
                            out: Tensor,
                            out_rows: Optional[Tensor] = None,
                            allow_tf32: bool = False,
                            block_m: Optional[int] = None) -> Tensor:
    """Launches the fused masked-conv kernel.

    Usually called through :func:`mmseg_cbt.ops.sparse_conv_rows` / :func:`~mmseg_cbt.ops.sparse_conv_buffer`
    (``backend='auto'`` on CUDA tensors, or ``backend='triton'``), which build the index tables.

    Args:
        buf: Contiguous padded input buffer ``(N, Hp, Wp, Cin)``.
        top_left: int64 ``(M,)`` flat row of each window's top-left tap in ``buf``.
        wmat: ``(k*k*Cin, Cout)`` weight matrix.
        bias: ``(Cout,)`` or None.
        in_row_width: Row width ``Wp`` of the input buffer (tap ``(ky, kx)`` is at
            ``top_left + ky * Wp + kx``).
        kernel_size: 1 or 3.
        residual: Flat ``(rows, Cout)`` source added before the ReLU: compact rows (row ``i`` for
            active position ``i``) or a padded buffer addressed through ``residual_rows``.
        residual_rows: int64 ``(M,)`` rows of ``residual``, or None for compact rows.
        relu: Apply ReLU.
        out: Destination, flat ``(rows, Cout)`` view (compact ``(M, Cout)`` or an output buffer).
        out_rows: int64 ``(M,)`` rows of ``out`` to write (scatter fused in the kernel), or None.
        allow_tf32: For fp32 inputs, use tf32 tensor cores (faster, ~1e-3 relative error). Default:
            exact fp32 (``input_precision='ieee'``).
        block_m: Active rows per program (power of two >= 16); default 64.

    Returns:
        ``out``.

    Raises:
        RuntimeError: If triton is missing, or CPU tensors are given without ``TRITON_INTERPRET=1``.
    """
    if not HAS_TRITON:
        raise RuntimeError('triton is not installed')
    if not buf.is_cuda and not triton_interpret_enabled():
        raise RuntimeError('the Triton sparse conv needs CUDA tensors, or TRITON_INTERPRET=1 on CPU')
    m = int(top_left.numel())
    cin = buf.shape[-1]
    cout = wmat.shape[1]
    out2 = out.view(-1, cout)
    if m == 0:
        return out
    wmat = wmat.contiguous()
    if wmat.dtype != buf.dtype:
        wmat = wmat.to(buf.dtype)
    block_m = block_m or 64
    block_n = min(64, max(16, _next_pow2(cout)))
    block_k = min(64 if buf.element_size() <= 2 else 32, max(16, _next_pow2(cin)))
    dummy = out2
    grid = (triton.cdiv(m, block_m), triton.cdiv(cout, block_n))
    _sparse_conv_kernel[grid](
        buf,
        wmat,
        bias if bias is not None else dummy,
        residual if residual is not None else dummy,
        out2,
        top_left,
        residual_rows if residual_rows is not None else top_left,
        out_rows if out_rows is not None else top_left,
        m,
        cin,
        cout,
        int(in_row_width),
        KS=int(kernel_size),
        HAS_BIAS=bias is not None,
        HAS_RES=residual is not None,
        RES_INDEXED=residual_rows is not None,
        OUT_INDEXED=out_rows is not None,
        RELU=bool(relu),
        IEEE=buf.dtype == torch.float32 and not allow_tf32,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k)
    return out
