"""When the sparse path is worth it, and which CPU algorithm runs: the one place that decides.

* Per conv, :func:`dense_crossover` gives the active fraction above which the dense conv (plus restoring the stopped
  positions) is faster than the sparse path; :func:`dense_threshold` applies it to one call (Triton, the compiled
  CPU kernel or the PyTorch ops).
* Per stage or exit, :func:`default_max_active` is the default of ``test_cfg.sparse_max_active``: above that active
  fraction the segmentor takes the simulated path (dense, then masked), which is as fast or faster there.
* Which of the compiled CPU kernel's float32 algorithms runs: :func:`set_cpu_algorithm` / :func:`cpu_algorithm`, or
  the environment variable ``MMSEG_CBT_CPU_ALGO`` (one of :data:`CPU_ALGORITHMS`) read at import. The
  kernel has a direct algorithm where it was built for AVX-512 or AVX2 + FMA (``ext.isa()``; ``MMSEG_CBT_CPU_ISA``,
  see :mod:`mmseg_cbt.ops.ext_loader`); it needs no BLAS. ``auto`` follows this CPU's tuning result where one
  exists (:mod:`mmseg_cbt.ops.sparse_conv.tune`: both algorithms timed per conv width on this machine; ``tune``
  measures it on first use); without one it takes the direct algorithm for every float32 conv on CPUs other than
  Intel's (MKL's sgemm, which the GEMM algorithm calls, takes slow code paths there), and on Intel CPUs for convs of
  at most :data:`DIRECT_MAX_COUT` output channels (wider, MKL's GEMM is as fast or faster there); the gather + GEMM
  otherwise (float64, no direct algorithm in the build). The kernel runs what this module tells it; within the direct
  algorithm the thin or the cache-blocked wide variant runs by the width (:data:`WIDE_MIN_VECTORS` on CPUs other
  than Intel's, the kernel's own switch on Intel's).

The numbers below are measured on the 2-core CPU machines; the runs, their commands and their resource files are in
``docs/benchmarks.md``.
"""
import contextlib
import math
import os
from types import ModuleType
from typing import Dict, Iterator, Optional, Tuple

import torch

from ..utils.cpuinfo import cpu_vendor
from .ext_loader import load_cpu_ext, vector_lanes

__all__ = [
    'CPU_ALGORITHMS', 'DIRECT_MAX_COUT', 'DIRECT_VARIANTS', 'cpu_algorithm', 'cpu_kernel_direct', 'default_max_active',
    'dense_crossover', 'dense_threshold', 'direct_flag', 'get_cpu_algorithm', 'set_cpu_algorithm', 'WIDE_MIN_VECTORS'
]

#: ``auto``: the direct algorithm for float32 convs where the kernel has it (on Intel CPUs up to
#: :data:`DIRECT_MAX_COUT` output channels), the gather + GEMM otherwise.
#: ``tune``: as ``auto``, measuring this CPU first where it has no tuning result yet (:mod:`.sparse_conv.tune`).
#: ``direct-thin`` / ``direct-wide`` / ``direct-vtail``: one variant of the direct algorithm forced (``direct`` lets
#: the kernel pick thin or wide by the width): per-tile thin blocks, the cache-blocked wide variant, the thin variant
#: computing a short channel tail as one more vector (see :data:`DIRECT_VARIANTS`).
CPU_ALGORITHMS = ('auto', 'gemm', 'direct', 'direct-thin', 'direct-wide', 'direct-vtail', 'tune')

#: The direct algorithm's variants by name, with the kernel's ``direct`` argument that runs them.
DIRECT_VARIANTS = {'direct': 1, 'direct-thin': 2, 'direct-wide': 3, 'direct-vtail': 4}

#: Widest conv (output channels) that ``auto`` sends to the kernel's direct algorithm on Intel CPUs: at 144-384
#: channels MKL's GEMM is as fast as the direct algorithm's wide variant or up to 1.2x faster there
#: (docs/benchmarks.md). Other CPUs have no limit.
DIRECT_MAX_COUT = 100

#: Output vectors (16 channels with AVX-512, 8 with AVX2, a partial one counted) from which ``auto`` takes the
#: direct algorithm's wide variant on CPUs other than Intel's, where it measured faster than the thin one from 3
#: vectors on (36 channels with AVX-512 on AMD Zen 4 and Zen 5; 18 with AVX2 on Zen 4); on Intel CPUs the kernel's
#: own switch (5 vectors with AVX-512, 13 with AVX2) stands.
WIDE_MIN_VECTORS = 3

_STATE = {'algorithm': 'auto'}

#: Whether ``auto`` limits the direct algorithm to :data:`DIRECT_MAX_COUT` channels (an Intel CPU: MKL's home).
_GEMM_WIDE = cpu_vendor() == 'GenuineIntel'


def set_cpu_algorithm(name: str) -> None:
    """Selects the compiled CPU kernel's algorithm for every later masked conv (process-wide).

    Args:
        name (str): One of :data:`CPU_ALGORITHMS`.
    """
    if name not in CPU_ALGORITHMS:
        raise ValueError(f'CPU algorithm must be one of {CPU_ALGORITHMS}, got {name!r}')
    _STATE['algorithm'] = name


def get_cpu_algorithm() -> str:
    """The algorithm selected by :func:`set_cpu_algorithm` (``auto`` by default)."""
    return _STATE['algorithm']


@contextlib.contextmanager
def cpu_algorithm(name: str) -> Iterator[None]:
    """Context manager form of :func:`set_cpu_algorithm`; the previous choice is restored on exit."""
    old = get_cpu_algorithm()
    set_cpu_algorithm(name)
    try:
        yield
    finally:
        set_cpu_algorithm(old)


def _direct_choice(ext: Optional[ModuleType], cout: int, dtype: torch.dtype) -> Optional[str]:
    """A name of :data:`DIRECT_VARIANTS` or None (the gather + GEMM) for one conv, forced or by the table / vendor
    rule."""
    if ext is None or dtype != torch.float32 or not ext.has_direct():
        return None
    algo = get_cpu_algorithm()
    if algo == 'gemm':
        return None
    if algo in DIRECT_VARIANTS:
        return algo
    from .sparse_conv.tune import tuned_algorithm  # late: tune times the kernel through the dispatch, which needs us
    tuned = tuned_algorithm(cout, measure_missing=algo == 'tune')
    if tuned is not None:
        return None if tuned == 'gemm' else tuned
    if _GEMM_WIDE:
        return 'direct' if cout <= DIRECT_MAX_COUT else None
    return 'direct-wide' if -(-cout // vector_lanes(ext)) >= WIDE_MIN_VECTORS else 'direct'


def _runs_direct(ext: Optional[ModuleType], cout: int, dtype: torch.dtype) -> bool:
    return _direct_choice(ext, cout, dtype) is not None


def direct_flag(ext: ModuleType, cout: int, dtype: torch.dtype) -> int:
    """The kernel's ``direct`` argument for one conv: 0 runs the gather + GEMM, the others a variant of the direct
    algorithm (:data:`DIRECT_VARIANTS`; the vector tail only where the conv has a short tail, see
    :func:`~.sparse_conv.tune.has_short_tail`, else the plain thin variant, which is then the same computation).

    Raises:
        RuntimeError: ``direct`` or a variant is forced where the kernel cannot run it (not float32, or no direct
            algorithm in the build), instead of silently running the GEMM.
    """
    algo = get_cpu_algorithm()
    if algo in DIRECT_VARIANTS and (dtype != torch.float32 or not ext.has_direct()):
        raise RuntimeError(f'CPU algorithm {algo!r} (MMSEG_CBT_CPU_ALGO / set_cpu_algorithm) is forced, but the direct '
                           f'kernel runs float32 on an AVX-512 or AVX2 build only: got {dtype}, build isa '
                           f'{ext.isa()!r}; use auto or gemm')
    choice = algo if algo in DIRECT_VARIANTS else _direct_choice(ext, cout, dtype)
    if choice is None:
        return 0
    if choice == 'direct-vtail':
        from .sparse_conv.tune import has_short_tail
        return DIRECT_VARIANTS['direct-vtail' if has_short_tail(ext, cout) else 'direct-thin']
    return DIRECT_VARIANTS[choice]


def cpu_kernel_direct(cout: int, dtype: torch.dtype = torch.float32) -> bool:
    """Whether masked convs with ``cout`` output channels run the compiled CPU kernel's direct algorithm.

    Args:
        cout (int): Output channels.
        dtype (torch.dtype): Tensor dtype.

    Returns:
        bool: True if the kernel is available and runs (chosen or forced) its direct algorithm for this conv.
    """
    return _runs_direct(load_cpu_ext(), cout, dtype)


# Active fraction above which the dense fallback beats gather + GEMM + scatter, against log2 of the conv's MACs per
# output position (k*k*Cin*Cout): the sparse path's gather / scatter is a fixed cost per position, so thin convs
# cross over earlier, and the fallback itself costs 1.1-3x the bare dense conv (it must keep the stopped positions).
# Points: the 2-thread runs of ``benchmark_masked.py --sections crossover``, rounded down.
_Table = Dict[int, Tuple[Tuple[int, float], ...]]
#: The PyTorch ops.
_CROSSOVER_TORCH: _Table = {
    3: ((1458, 0.62), (20736, 0.66), (82944, 0.66), (331776, 0.75)),
    1: ((324, 0.55), (2304, 0.58), (5184, 0.65), (36864, 0.72), (147456, 0.75)),
}
#: The compiled kernel's gather + GEMM (float64, wide convs, CPUs without AVX-512).
_CROSSOVER_KERNEL: _Table = {
    3: ((1458, 0.72), (20736, 0.76), (46656, 0.9)),
    1: ((324, 0.72), (2304, 0.8), (20736, 0.85), (36864, 0.9)),
}
#: The compiled kernel's direct algorithm (float32, at most DIRECT_MAX_COUT output channels, AVX-512).
_CROSSOVER_DIRECT: _Table = {
    3: ((1458, 0.9), ),
    1: ((324, 0.8), (1296, 0.8), (2304, 0.9)),
}

#: Triton (GPU) default: only a full mask goes to the dense conv, as the GPU crossover is not measured yet.
TRITON_DENSE_THRESHOLD = 1.0 - 1e-9


def dense_crossover(kernel_size: int, cin: int, cout: int, compiled: bool = False, direct: bool = False) -> float:
    """Measured active fraction above which the dense conv beats the sparse path on CPU.

    Piecewise-linear in log2(MACs per output position) between the measured points, clamped at the ends.

    Args:
        kernel_size (int): 1 or 3.
        cin (int): Input channels.
        cout (int): Output channels.
        compiled (bool): The sparse path is the compiled CPU kernel (its table) rather than the PyTorch ops.
        direct (bool): With ``compiled``: the kernel runs its direct algorithm for this conv.

    Returns:
        float: Threshold in [0, 1].
    """
    table = (_CROSSOVER_DIRECT if direct else _CROSSOVER_KERNEL) if compiled else _CROSSOVER_TORCH
    pts = table[3 if kernel_size != 1 else 1]
    x = math.log2(max(1, kernel_size * kernel_size * cin * cout))
    if x <= math.log2(pts[0][0]):
        return pts[0][1]
    for (m0, f0), (m1, f1) in zip(pts, pts[1:]):
        x0, x1 = math.log2(m0), math.log2(m1)
        if x <= x1:
            return f0 + (f1 - f0) * (x - x0) / (x1 - x0)
    return pts[-1][1]


def dense_threshold(kernel_size: int, cin: int, cout: int, dtype: torch.dtype, *, triton: bool,
                    ext: Optional[ModuleType]) -> float:
    """Default active fraction above which one masked conv call runs densely.

    Args:
        kernel_size (int): 1 or 3.
        cin (int): Input channels.
        cout (int): Output channels.
        dtype (torch.dtype): Tensor dtype.
        triton (bool): The call runs the Triton kernel.
        ext (module, optional): The compiled CPU kernel the call runs, or None for the PyTorch ops.

    Returns:
        float: :data:`TRITON_DENSE_THRESHOLD` for Triton, else :func:`dense_crossover` of the CPU path.
    """
    if triton:
        return TRITON_DENSE_THRESHOLD
    return dense_crossover(kernel_size, cin, cout, ext is not None, _runs_direct(ext, cout, dtype))


def default_max_active(device: torch.device, dtype: torch.dtype = torch.float32) -> float:
    """Default ``test_cfg.sparse_max_active``: the active fraction up to which whole masked stages run sparse.

    Measured crossovers of whole HRNet stages 2-4 (``benchmark_masked.py --sections paths``): 0.9 where the
    thinnest branch (18 channels) runs the compiled kernel's direct algorithm (measured with its AVX-512 build), 0.8
    with its GEMM algorithm only, 0.6 with the PyTorch path and on CUDA (not yet measured on a GPU).

    Args:
        device (torch.device): Where the features live.
        dtype (torch.dtype): Their dtype.

    Returns:
        float: The fraction in [0, 1].
    """
    ext = load_cpu_ext() if torch.device(device).type == 'cpu' else None
    if ext is None:
        return 0.6
    return 0.9 if _runs_direct(ext, 18, dtype) else 0.8


_env = os.environ.get('MMSEG_CBT_CPU_ALGO', 'auto')
if _env not in CPU_ALGORITHMS:
    raise ValueError(f'MMSEG_CBT_CPU_ALGO must be one of {CPU_ALGORITHMS}, got {_env!r}')
set_cpu_algorithm(_env)
