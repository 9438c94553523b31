"""Builds and loads the compiled CPU kernel of the masked convolution (``csrc/*.cpp``) on first use.

The kernel fuses the PyTorch path's per-chunk ops (gather -> GEMM -> bias / residual / ReLU -> scatter) into one C++
call in which each thread owns whole chunks, and has a direct algorithm for float32 convs that reads each window in
place and needs no BLAS (which one runs: :mod:`mmseg_cbt.ops.policy`). Both compute what the PyTorch path
(:mod:`mmseg_cbt.ops.sparse_conv.torch_impl`) computes, from the same index tables, and are tested against it.

The direct algorithm is written once over a small vector abstraction (``csrc/simd.h``) whose instruction set is
chosen when compiling, from the build's flags: AVX-512F (16 lanes), else AVX2 + FMA (8 lanes), else none (the gather
+ GEMM only). ``MMSEG_CBT_CPU_ISA`` chooses the build: ``native`` (default; ``-march=native``), ``avx2``
(``-march=native -mno-avx512f``: the AVX2 algorithm, e.g. to measure it on an AVX-512 machine) or ``none`` (no direct
algorithm); another value is a ValueError. The loaded module's ``isa()`` says which it has (``'avx512'``, ``'avx2'``
or ``'none'``), ``has_direct()`` whether it has one.

It is compiled with :func:`torch.utils.cpp_extension.load` the first time a CPU masked conv runs (about 40 s on 2
cores; cached under ``$TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``, one entry per CPU, source and
ISA choice, rebuilt only when one of them or torch changes). It needs a C++ compiler and ninja
(``requirements/build.txt``). If the build fails, a warning says why and the PyTorch path is used.
``MMSEG_CBT_CPU_EXT=0`` disables it (PyTorch path only).
"""
from __future__ import annotations

import hashlib
import logging
import os
import os.path as osp
import platform
import shutil
import sys
import threading
import time
import warnings
from types import ModuleType
from typing import Optional

from ..utils.cpuinfo import cpuinfo_lines

__all__ = [
    'cpu_ext_enabled', 'load_cpu_ext', 'cpu_ext_available', 'cpu_isa_choice', 'vector_lanes', 'EXT_ENV', 'ISA_ENV',
    'CPU_ISAS'
]

EXT_ENV = 'MMSEG_CBT_CPU_EXT'
ISA_ENV = 'MMSEG_CBT_CPU_ISA'
#: ``native``: the build machine's instruction set (AVX-512 where it has it, else AVX2 + FMA, else no direct
#: algorithm); ``avx2``: AVX-512 switched off (the AVX2 direct algorithm, e.g. measured on an AVX-512 machine);
#: ``none``: no direct algorithm (gather + GEMM only).
CPU_ISAS = ('native', 'avx2', 'none')
_NAME = 'mmseg_cbt_sparse_conv_cpu'
_CSRC = osp.join(osp.dirname(osp.abspath(__file__)), 'csrc')
_SOURCES = [osp.join(_CSRC, f) for f in ('sparse_conv_cpu.cpp', 'direct_conv.cpp')]
_HEADERS = [osp.join(_CSRC, f) for f in ('direct_conv.h', 'simd.h')]
# -mno-avx512f switches off every AVX-512 subset that depends on it (GCC and clang)
_ISA_FLAGS = {'native': [], 'avx2': ['-mno-avx512f'], 'none': ['-DMMSEG_CBT_NO_DIRECT']}
_LOCK = threading.Lock()
_STATE: dict = {}
_LOGGER = logging.getLogger(__name__)


def cpu_ext_enabled() -> bool:
    """Whether the environment allows the compiled CPU kernel (``MMSEG_CBT_CPU_EXT`` is not ``0``/``false``).

    Returns:
        True unless disabled.
    """
    return os.environ.get(EXT_ENV, '1').strip().lower() not in ('0', 'false', 'no', 'off')


def load_cpu_ext() -> Optional[ModuleType]:
    """Builds (once per process; the compiled library is cached on disk) and returns the CPU kernel module.

    Returns:
        The extension module, or None when disabled by ``MMSEG_CBT_CPU_EXT=0`` or when the build failed (a
        warning with the compiler's message is issued once).
    """
    if not cpu_ext_enabled():
        return None
    if 'module' in _STATE:
        return _STATE['module']
    with _LOCK:
        if 'module' not in _STATE:
            _STATE['module'] = _build()
    return _STATE['module']


def cpu_isa_choice() -> str:
    """The instruction set the kernel is built for, from ``MMSEG_CBT_CPU_ISA`` (default ``native``).

    Returns:
        One of :data:`CPU_ISAS`.

    Raises:
        ValueError: The variable holds another value.
    """
    isa = os.environ.get(ISA_ENV, 'native').strip().lower() or 'native'
    if isa not in CPU_ISAS:
        raise ValueError(f'{ISA_ENV} must be one of {CPU_ISAS}, got {os.environ.get(ISA_ENV)!r}')
    return isa


def vector_lanes(ext: Optional[ModuleType]) -> Optional[int]:
    """float32 lanes of the direct algorithm's vectors in the loaded kernel ``ext`` (16 with AVX-512, 8 with AVX2),
    None without a kernel or without a direct algorithm."""
    return {'avx512': 16, 'avx2': 8}.get(ext.isa() if ext is not None else 'none')


def cpu_ext_available() -> bool:
    """Whether masked convs on CPU tensors run in the compiled kernel (builds it if needed).

    Returns:
        True if :func:`load_cpu_ext` returns a module.
    """
    return load_cpu_ext() is not None


def _cpu_tag() -> str:
    """Short hash of this CPU's model and instruction-set flags (Linux; else the machine name)."""
    info = platform.machine() + ''.join(cpuinfo_lines(('model name', 'flags')))
    return hashlib.sha1(info.encode()).hexdigest()[:10]


def _source_tag() -> str:
    """Short hash of the kernel's sources and headers."""
    h = hashlib.sha1()
    for path in _SOURCES + _HEADERS:
        with open(path, 'rb') as f:
            h.update(f.read())
    return h.hexdigest()[:8]


# A build takes ~35 s; a lock file older than this was left by a build that was killed (Ctrl-C, OOM). torch waits
# for such a lock forever, so every later process would hang at its first masked conv.
_STALE_LOCK_S = 600


def _remove_stale_lock(name: str) -> None:
    try:
        from torch.utils.cpp_extension import _get_build_directory
        lock = osp.join(_get_build_directory(name, verbose=False), 'lock')
        if osp.exists(lock) and time.time() - osp.getmtime(lock) > _STALE_LOCK_S:
            warnings.warn(
                f'mmseg_cbt: removing the stale build lock {lock} (an interrupted build of the CPU kernel)',
                RuntimeWarning,
                stacklevel=4)
            os.remove(lock)
    except (ImportError, OSError):  # private torch helper moved, or a race with another process: nothing to clean
        pass


def _build() -> Optional[ModuleType]:
    isa = cpu_isa_choice()  # a bad value is an error, not a silent fallback
    try:
        from torch.utils.cpp_extension import load

        # torch looks for ninja on PATH; a virtual environment's own ninja (requirements/build.txt) is not there
        # unless the environment is activated (run_tests.sh calls .venv/bin/python directly)
        bindir = osp.dirname(sys.executable)
        if shutil.which('ninja') is None and osp.exists(osp.join(bindir, 'ninja')):
            os.environ['PATH'] = bindir + os.pathsep + os.environ.get('PATH', '')
        _LOGGER.info('mmseg_cbt: building the CPU sparse-conv kernel (once; ~35 s on 2 cores)')
        # -fopenmp: at::parallel_for is an OpenMP region compiled into the kernel. The library then needs
        # libgomp.so.1, which resolves to the copy torch has already loaded (same soname): one thread pool.
        # -march=native: built on the machine that runs it, so row copies and the epilogue use AVX-512 where there is
        # one (and the direct algorithm the widest vectors the ISA choice allows); the CPU tag in the name keeps a
        # build cache shared between different CPUs from loading a foreign build; the source tag keeps two checkouts
        # with different kernel sources (e.g. git worktrees) from rebuilding one shared cache entry under each
        # other's running processes; the ISA tag keeps the builds of the ISA choices side by side.
        flags = ['-O3', '-fopenmp']
        if platform.machine() in ('x86_64', 'AMD64'):  # elsewhere simd.h finds no ISA: no direct algorithm
            flags += ['-march=native'] + _ISA_FLAGS[isa]
        name = f'{_NAME}_{_cpu_tag()}_{_source_tag()}_{isa}'
        _remove_stale_lock(name)
        return load(name, _SOURCES, extra_cflags=flags, extra_ldflags=['-fopenmp'], verbose=False)
    except Exception as e:  # noqa: BLE001 - any build problem means: use the PyTorch path
        warnings.warn(
            f'mmseg_cbt: the CPU sparse-conv kernel could not be built ({type(e).__name__}: '
            f'{str(e)[-500:]}); masked convs use the PyTorch path (same results, slower). Set '
            f'{EXT_ENV}=0 to silence this.',
            RuntimeWarning,
            stacklevel=3)
        return None
