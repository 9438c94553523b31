"""When the sparse path is worth it: the one place that decides, for single convs and for whole masked stages.

* Per conv, :func:`~mmseg_cbt.ops.dense_crossover` gives the active fraction above which the dense conv is faster
  (measured tables of the CPU paths; docs/masked_inference.md names the runs).
* Per stage or exit, :func:`default_max_active` is the default of ``test_cfg.sparse_max_active``: above that active
  fraction the segmentor takes the simulated path (dense, then masked), which is as fast or faster there.
* Which of the compiled CPU kernel's float32 algorithms runs: :func:`set_cpu_algorithm` / :func:`cpu_algorithm`,
  or the environment variable ``MMSEG_CBT_CPU_ALGO`` (``auto``, ``gemm``, ``direct``) read at import.
"""
import contextlib
import os
from typing import Iterator

import torch

from . import sparse_conv as _sc
from .sparse_conv_cpu import cpu_ext_available

__all__ = ['CPU_ALGORITHMS', 'cpu_algorithm', 'default_max_active', 'get_cpu_algorithm', 'set_cpu_algorithm']

#: ``auto``: the kernel chooses (direct algorithm for thin float32 convs where built, gather + GEMM otherwise).
CPU_ALGORITHMS = {'auto': -1, 'gemm': 0, 'direct': 1}


def set_cpu_algorithm(name: str) -> None:
    """Selects the compiled CPU kernel's algorithm for every later masked conv (process-wide).

    Args:
        name (str): One of :data:`CPU_ALGORITHMS`.
    """
    if name not in CPU_ALGORITHMS:
        raise ValueError(f'CPU algorithm must be one of {tuple(CPU_ALGORITHMS)}, got {name!r}')
    _sc._CPU_DIRECT = CPU_ALGORITHMS[name]


def get_cpu_algorithm() -> str:
    """The algorithm selected by :func:`set_cpu_algorithm` (``auto`` by default)."""
    return {v: k for k, v in CPU_ALGORITHMS.items()}[_sc._CPU_DIRECT]


@contextlib.contextmanager
def cpu_algorithm(name: str) -> Iterator[None]:
    """Context manager form of :func:`set_cpu_algorithm`; the previous choice is restored on exit."""
    old = get_cpu_algorithm()
    set_cpu_algorithm(name)
    try:
        yield
    finally:
        set_cpu_algorithm(old)


def default_max_active(device: torch.device, dtype: torch.dtype = torch.float32) -> float:
    """Default ``test_cfg.sparse_max_active``: the active fraction up to which whole masked stages run sparse.

    Measured crossovers of the whole stages 2-4 (``benchmark_masked.py --sections paths``): 0.9 with the compiled
    CPU kernel's direct algorithm, 0.8 with its GEMM algorithm only, 0.6 with the PyTorch path and on CUDA (not yet
    measured on a GPU).

    Args:
        device (torch.device): Where the features live.
        dtype (torch.dtype): Their dtype.

    Returns:
        float: The fraction in [0, 1].
    """
    if torch.device(device).type != 'cpu' or not cpu_ext_available():
        return 0.6
    return 0.9 if _sc.cpu_kernel_direct(18, dtype) else 0.8


_env = os.environ.get('MMSEG_CBT_CPU_ALGO', 'auto')
if _env not in CPU_ALGORITHMS:
    raise ValueError(f'MMSEG_CBT_CPU_ALGO must be one of {tuple(CPU_ALGORITHMS)}, got {_env!r}')
set_cpu_algorithm(_env)
