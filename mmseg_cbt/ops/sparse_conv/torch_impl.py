"""The masked conv as PyTorch ops (any device, any float dtype): chunked gather -> GEMM -> epilogue -> scatter.

The reference of the compiled CPU kernel (same tables, same algorithm) and its fallback where it is not built.
"""
from __future__ import annotations

import threading
from typing import List, Optional

import torch
from torch import Tensor

from .index import SparseIndex

__all__ = ['chunk_rows_for', 'torch_sparse']

# Gathered rows x k*k*Cin values per chunk, by torch thread count. One thread: ~1 MiB keeps the block in the 2 MiB
# L2 while the GEMM reads it; more threads: every op of a chunk is an OpenMP fork/join, so chunks grow to ~4 MiB.
_CHUNK_BYTES_1T, _MIN_CHUNK_ROWS_1T = 1 << 20, 256
_CHUNK_BYTES_MT, _MIN_CHUNK_ROWS_MT = 4 << 20, 1024
_MAX_CHUNK_ROWS = 4096

_TLS = threading.local()


def chunk_rows_for(k: int, cin: int, chunk_rows: Optional[int] = None) -> int:
    """Active rows per chunk of the PyTorch path (``chunk_rows`` if given)."""
    if chunk_rows is not None:
        return max(1, int(chunk_rows))
    if torch.get_num_threads() > 1:
        target, low = _CHUNK_BYTES_MT, _MIN_CHUNK_ROWS_MT
    else:
        target, low = _CHUNK_BYTES_1T, _MIN_CHUNK_ROWS_1T
    return max(low, min(_MAX_CHUNK_ROWS, target // max(1, 4 * k * k * cin)))


def _scratch(name: str, numel: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """Per-thread reusable 1-D scratch tensor of at least ``numel`` elements (saves two allocations and their page
    faults per conv; per thread so concurrent callers never share one)."""
    cache = getattr(_TLS, 'scratch', None)
    if cache is None:
        cache = _TLS.scratch = {}
    key = (name, dtype, device)
    t = cache.get(key)
    if t is None or t.numel() < numel:
        # a normal (not inference-mode) tensor: usable both inside and outside torch.inference_mode
        with torch.inference_mode(False):
            t = cache[key] = torch.empty(numel, dtype=dtype, device=device)
    return t[:numel]


def _run_chunks(src: Tensor, k: int, wmat: Tensor, bias: Optional[Tensor], res_src: Optional[Tensor], relu: bool,
                dst: Tensor, step: int, strip_chunks: List[Tensor], dst_chunks: Optional[List[Tensor]],
                res_chunks: Optional[List[Tensor]]) -> None:
    """Every chunk: gather -> GEMM -> epilogue (-> scatter), while the chunk is in cache."""
    cout = wmat.shape[1]
    kkc = wmat.shape[0]
    scatter = dst_chunks is not None
    a_buf = _scratch('a', step * kkc, src.dtype, src.device).view(-1, src.shape[1])
    o_buf = _scratch('o', step * cout, src.dtype, src.device).view(step, cout) if scatter else None
    for i, st in enumerate(strip_chunks):
        s = i * step
        n = st.shape[0] // k
        a = a_buf[:n * k]
        torch.index_select(src, 0, st, out=a)
        a = a.view(n, kkc)
        o = o_buf[:n] if scatter else dst[s:s + n]
        # mm + add_ rather than addmm: addmm broadcasts the bias first and runs the GEMM with beta=1, slower for
        # thin GEMMs
        torch.mm(a, wmat, out=o)
        if bias is not None:
            o.add_(bias)
        if res_src is not None:
            o.add_(res_src[s:s + n] if res_chunks is None else torch.index_select(res_src, 0, res_chunks[i]))
        if relu:
            o.relu_()
        if scatter:
            dst.index_copy_(0, dst_chunks[i], o)


def torch_sparse(buf: Tensor, idx: SparseIndex, strips: Tensor, k: int, wmat: Tensor, bias: Optional[Tensor],
                 res_src: Optional[Tensor], res_rows: Optional[Tensor], relu: bool, dst: Tensor,
                 dst_rows: Optional[Tensor], chunk_rows: Optional[int]) -> None:
    """Computes ``relu(window @ wmat + bias + residual)`` at the active positions of ``idx``.

    Args:
        buf (Tensor): Padded input buffer ``(N, Hp, Wp, Cin)``.
        idx (SparseIndex): The output index (caches the chunk views).
        strips (Tensor): Its window strip table for this conv (:meth:`SparseIndex.windows`).
        k (int): Kernel size.
        wmat (Tensor): ``(k*k*Cin, Cout)``.
        bias (Tensor, optional): ``(Cout,)``.
        res_src (Tensor, optional): Residual: compact ``(M, Cout)`` rows, or flat buffer rows read at ``res_rows``.
        res_rows (Tensor, optional): int64 ``(M,)`` rows of ``res_src``, or None for compact rows.
        relu (bool): Apply ReLU last.
        dst (Tensor): Compact ``(M, Cout)`` rows if ``dst_rows`` is None, else flat ``(rows, Cout)`` buffer rows
            that each chunk is scattered into.
        dst_rows (Tensor, optional): int64 ``(M,)`` rows of ``dst``.
        chunk_rows (int, optional): Rows per chunk (default :func:`chunk_rows_for`).
    """
    cin = buf.shape[-1]
    flat = buf.view(-1, cin)
    # overlapping "strip" view: row r holds the k*cin contiguous values of pixels r .. r+k-1 (one window row), so
    # k strips are gathered per window instead of k*k pixel rows (fewer, longer row copies)
    src = flat if k == 1 else flat.as_strided((flat.shape[0] - k + 1, k * cin), (cin, 1))
    step = min(idx.num_active, chunk_rows_for(k, cin, chunk_rows))
    # chunk views are cached on the index (slicing costs ~1 us per tensor per call)
    strip_chunks = idx.chunks(strips, k, step)
    dst_chunks = idx.chunks(dst_rows, 1, step) if dst_rows is not None else None
    res_chunks = idx.chunks(res_rows, 1, step) if res_rows is not None else None
    _run_chunks(src, k, wmat, bias, res_src, relu, dst, step, strip_chunks, dst_chunks, res_chunks)
