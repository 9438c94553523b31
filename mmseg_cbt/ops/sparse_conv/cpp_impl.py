"""The compiled CPU kernel's masked conv (``csrc/sparse_conv_cpu.cpp``): which tensors it takes, chunk sizes, call."""
from __future__ import annotations

from types import ModuleType
from typing import Optional

import torch
from torch import Tensor

from ..ext_loader import load_cpu_ext
from ..policy import direct_flag
from .cache import cached_wide_pack
from .index import SparseIndex

__all__ = ['cpp_sparse', 'cpu_ext_for', 'ext_band_rows', 'ext_chunk_rows']

# Each thread gathers into its own block: ~256 KiB stays in a core's L2 next to the GEMM's packed weight panels, and
# at least 128 rows let the GEMM amortise reading the weight.
_EXT_CHUNK_BYTES, _EXT_MIN_CHUNK_ROWS, _EXT_MAX_CHUNK_ROWS = 256 << 10, 128, 1024
# The one-conv op's per-thread band of padded input rows: large enough that the rows consecutive bands share (moved,
# not transposed again) are a small part of it, small enough to stay near the core (docs/benchmarks.md).
_EXT_BAND_BYTES = 1 << 20


def cpu_ext_for(backend: str, t: Tensor) -> Optional[ModuleType]:
    """The compiled CPU kernel module if ``backend`` selects it for tensor ``t``, else None.

    Raises:
        ValueError: ``backend='cpp'`` for a tensor the kernel does not run (not float32/64 on CPU).
        RuntimeError: ``backend='cpp'`` while the kernel is disabled or failed to build.
    """
    if backend in ('torch', 'triton') or t.is_cuda or t.dtype not in (torch.float32, torch.float64):
        if backend == 'cpp':
            raise ValueError(f"backend='cpp' runs float32/float64 CPU tensors, got {t.dtype} on {t.device}")
        return None
    ext = load_cpu_ext()
    if ext is None and backend == 'cpp':
        raise RuntimeError("backend='cpp' requested but the CPU kernel is not available (disabled by "
                           'MMSEG_CBT_CPU_EXT=0, or its build failed: see the warning)')
    return ext


def ext_chunk_rows(kkc: int, itemsize: int, m: int, threads: Optional[int] = None) -> int:
    """Rows per chunk of the compiled kernel for ``m`` active rows of ``kkc`` gathered values.

    The chunk count is rounded up to a multiple of the thread count and the rows spread evenly: OpenMP gives each
    thread a contiguous share of the chunks, so 3 chunks on 2 threads take as long as 4.
    """
    target = max(_EXT_MIN_CHUNK_ROWS, min(_EXT_MAX_CHUNK_ROWS, _EXT_CHUNK_BYTES // max(1, itemsize * kkc)))
    t = max(1, torch.get_num_threads() if threads is None else threads)
    per_thread = -(-m // (t * target))  # chunks per thread (ceil)
    return max(1, -(-m // (t * per_thread)))


def ext_band_rows(padded_width: int, cin: int, itemsize: int, k: int, stride: int) -> int:
    """Output rows per band of :func:`~mmseg_cbt.ops.sparse_conv2d`'s NCHW path (``sparse_conv_nchw``): as many
    as keep the band's ``(rows - 1) * stride + k`` padded input rows within ``_EXT_BAND_BYTES``, at least one."""
    padded_rows = _EXT_BAND_BYTES // max(1, padded_width * cin * itemsize)
    return max(1, (padded_rows - k) // stride + 1)


def cpp_sparse(ext: ModuleType, buf: Tensor, idx: SparseIndex, strips: Tensor, k: int, wmat: Tensor,
               bias: Optional[Tensor], res_src: Optional[Tensor], res_rows: Optional[Tensor], relu: bool, dst: Tensor,
               dst_rows: Optional[Tensor], chunk_rows: Optional[int]) -> None:
    """Runs one masked conv in the compiled kernel ``ext`` (other arguments as :func:`.torch_impl.torch_sparse`'s)."""
    cin, cout = buf.shape[-1], wmat.shape[1]
    step = chunk_rows if chunk_rows is not None else ext_chunk_rows(k * k * cin, buf.element_size(), idx.num_active)
    direct = direct_flag(ext, cout, buf.dtype)
    ext.sparse_conv_gemm(
        buf.view(-1, cin), strips, k, wmat, None if bias is None else bias.contiguous(), res_src, res_rows, relu, dst,
        dst_rows, max(1, int(step)), direct, cached_wide_pack(ext, wmat, direct))
