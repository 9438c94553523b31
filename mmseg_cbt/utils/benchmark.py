"""Helpers of the masked-inference benchmarks (``tools/analysis_tools/benchmark_masked*.py``): timing on a shared
machine, with the clock passed in, and realistic stop masks.

Every timing function takes a :class:`Timer` (which clock, how to wait for the device): the command line's
``--clock`` builds one and every section receives it, so no section can fall back to another clock.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Tuple

import torch
import torch.nn.functional as F

__all__ = ['CLOCKS', 'ForeignLoad', 'Timer', 'blob_mask', 'time_interleaved', 'timed_quiet']

#: The clocks ``--clock`` names: wall time, or the CPU time of the calling thread (robust against other processes,
#: meaningful with one torch thread only).
CLOCKS: Dict[str, Callable[[], float]] = {'wall': time.perf_counter, 'thread': time.thread_time}


def _no_sync() -> None:
    pass


@dataclass
class Timer:
    """The clock of a benchmark run and the wait for queued device work before it is read.

    Attributes:
        clock (callable): Returns seconds (default wall time).
        sync (callable): Called before every clock reading (``torch.cuda.synchronize`` for CUDA work).
    """

    clock: Callable[[], float] = time.perf_counter
    sync: Callable[[], None] = field(default=_no_sync)

    @classmethod
    def from_name(cls, name: str, device: str = 'cpu') -> 'Timer':
        """The timer of ``--clock name`` (one of :data:`CLOCKS`) for work on ``device``."""
        if name not in CLOCKS:
            raise ValueError(f'clock must be one of {tuple(CLOCKS)}, got {name!r}')
        return cls(CLOCKS[name], torch.cuda.synchronize if device == 'cuda' else _no_sync)

    def now(self) -> float:
        """Waits for the device, then reads the clock (seconds)."""
        self.sync()
        return self.clock()

    def time_ms(self, fn: Callable[[], object], calls: int = 1) -> float:
        """Milliseconds per call of ``calls`` back-to-back calls of ``fn``."""
        t0 = self.now()
        for _ in range(calls):
            fn()
        return 1e3 * (self.now() - t0) / calls


def blob_mask(n: int, h: int, w: int, active: float, seed: int = 0, blob: int = 16) -> torch.Tensor:
    """Realistic stop mask: thresholded smoothed noise (connected blobs, not salt-and-pepper).

    Args:
        n (int): Batch size.
        h (int): Height.
        w (int): Width.
        active (float): Target fraction of True (active, still computing) positions.
        seed (int): RNG seed.
        blob (int): Typical blob size in pixels (noise is drawn at ``1/blob`` resolution and upsampled).

    Returns:
        Tensor: Bool ``(n, h, w)`` with ``round(active * h * w)`` True positions per image (ties aside).
    """
    if active >= 1.0:
        return torch.ones(n, h, w, dtype=torch.bool)
    if active <= 0.0:
        return torch.zeros(n, h, w, dtype=torch.bool)
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 1, max(2, h // blob), max(2, w // blob), generator=g)
    noise = F.interpolate(low, size=(h, w), mode='bicubic', align_corners=False)
    noise = noise + 1e-3 * torch.rand(n, 1, h, w, generator=g)  # break ties
    flat = noise.view(n, -1)
    k = max(1, int(round(active * h * w)))
    thr = flat.topk(k, dim=1).values[:, -1:]
    return (flat >= thr).view(n, h, w)


def time_interleaved(fns: Dict[str, Callable[[], object]],
                     repeats: int,
                     timer: Timer,
                     min_sample_s: float = 0.01) -> Dict[str, float]:
    """Best-of-``repeats`` time in ms of each function, the functions timed round-robin.

    Each sample runs a function ``inner`` times (calibrated so one sample takes ``min_sample_s``), so that
    sub-millisecond ops are not dominated by timer and scheduler noise.

    Args:
        fns (dict): Name -> zero-argument callable.
        repeats (int): Rounds.
        timer (Timer): The clock.
        min_sample_s (float): Minimum duration of one sample.

    Returns:
        dict: Name -> best time per call in ms.
    """
    inner = {}
    for name, fn in fns.items():
        fn()  # warm-up (allocator, oneDNN primitive cache)
        dt = timer.time_ms(fn) / 1e3
        inner[name] = max(1, int(math.ceil(min_sample_s / max(dt, 1e-7))))
    best = {name: float('inf') for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            best[name] = min(best[name], timer.time_ms(fn, inner[name]))
    return best


class ForeignLoad:
    """Measures the CPU time other processes used while a block ran (Linux ``/proc/stat``).

    ``fraction`` = (busy CPU time of the whole machine - this process's CPU time) / (wall x cores), so 0.0 means the
    cores were ours alone and 0.5 means other jobs took half of them: such timings are not comparable.
    """

    def __init__(self) -> None:
        self.fraction: float = float('nan')

    @staticmethod
    def _machine_busy_s() -> float:
        with open('/proc/stat') as f:
            fields = [int(v) for v in f.readline().split()[1:]]
        busy = sum(fields[:8]) - fields[3] - fields[4]  # all but idle and iowait
        return busy / os.sysconf('SC_CLK_TCK')

    def __enter__(self) -> 'ForeignLoad':
        try:
            self._m0 = self._machine_busy_s()
        except (OSError, ValueError, IndexError):
            self._m0 = None
        self._p0, self._w0 = sum(os.times()[:2]), time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        if self._m0 is None:
            return
        wall = time.perf_counter() - self._w0
        other = (self._machine_busy_s() - self._m0) - (sum(os.times()[:2]) - self._p0)
        self.fraction = max(0.0, other / max(wall * (os.cpu_count() or 1), 1e-9))


def timed_quiet(fns: Dict[str, Callable[[], object]],
                repeats: int,
                timer: Timer,
                max_foreign: float,
                retries: int,
                retry_wait: float = 2.0) -> Tuple[Dict[str, float], float]:
    """:func:`time_interleaved`, repeated (up to ``retries`` times, keeping the per-function best) while other
    processes used more than ``max_foreign`` of the cores.

    Returns:
        tuple: ``(times in ms, foreign load fraction of the last attempt)``.
    """
    best: Dict[str, float] = {}
    load = float('nan')
    for _ in range(1 + max(0, retries)):
        with ForeignLoad() as fl:
            t = time_interleaved(fns, repeats, timer)
        load = fl.fraction
        best = {k: min(v, best.get(k, float('inf'))) for k, v in t.items()}
        if not load > max_foreign:  # also stops when unknown (nan)
            break
        time.sleep(retry_wait)
    return best, load
