"""CPU inference settings shared by dense and masked inference (torch only; mmcv imported lazily).

Two things made the dense *and* the masked HRNet much faster on the 2-core CPU machines this project is
measured on, so the benchmarks apply them to both sides before comparing:

* :func:`tune_malloc` - glibc serves every allocation above its mmap threshold (at most 32 MiB) with a fresh
  ``mmap``, and its pages are faulted in on first touch on every call. An HRNet stage-1 feature map at a
  512x1024 input (256 x 128 x 256 fp32) is 33.5 MiB, so those layers paid thousands of page faults per call.
  Keeping freed memory in the heap removes that: the dense W18s backbone at 512x1024 went from 493 to 336 ms,
  W48 from 1834 to 1480 ms (``tools/analysis_tools/benchmark_masked.py --sections b --stopped 0`` with and
  without ``--no-tune-malloc``).
* :func:`optimize_for_inference` - BatchNorm folded into the preceding convs and channels-last weights: oneDNN's
  convolutions then run without layout conversions and without a separate BN pass.
"""
import ctypes
import ctypes.util
import sys
from typing import Optional

import torch
import torch.nn as nn

__all__ = ['tune_malloc', 'optimize_for_inference']

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_TUNED: Optional[bool] = None


def tune_malloc() -> bool:
    """Makes glibc keep large freed blocks in the heap instead of returning them with ``munmap``.

    Sets ``M_MMAP_MAX = 0`` (no mmap'ed chunks) and a 2 GiB ``M_TRIM_THRESHOLD`` via ``mallopt``, as the
    environment variables ``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=2147483647`` would. Process-wide and
    irreversible; the price is that a process's resident memory does not shrink after a peak. Call it once at
    the start of an inference or benchmark process. A no-op returning False where glibc's ``mallopt`` is not
    available (macOS, Windows, musl).

    Returns:
        bool: Whether the settings are in effect.
    """
    global _TUNED
    if _TUNED is not None:
        return _TUNED
    _TUNED = False
    if not sys.platform.startswith('linux'):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library('c') or 'libc.so.6')
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    # mallopt's value is an int: 2^31 - 1 bytes is the largest trim threshold it takes (2 GiB, far above any
    # feature map here)
    ok = mallopt(_M_MMAP_MAX, 0) == 1 and mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1
    _TUNED = bool(ok)
    return _TUNED


def optimize_for_inference(model: nn.Module, fuse_bn: bool = True, channels_last: bool = True) -> nn.Module:
    """Prepares a model for CPU inference in place: BN folded into convs, channels-last weights.

    The model must be in eval mode (folding uses the running statistics). The masked (sparse) path accepts such
    a model: it treats the ``nn.Identity`` left in place of each BN as "already folded".

    Args:
        model: The model (e.g. an early-exit segmentor or its backbone).
        fuse_bn: Fold every BatchNorm that directly follows a conv (``mmcv.cnn.fuse_conv_bn``).
        channels_last: Convert parameters to channels-last memory format.

    Returns:
        The same model.

    Raises:
        RuntimeError: If the model is in training mode.
    """
    if model.training:
        raise RuntimeError('optimize_for_inference needs model.eval() first (BN folding uses running statistics)')
    if fuse_bn:
        from mmcv.cnn import fuse_conv_bn
        fuse_conv_bn(model)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    return model
