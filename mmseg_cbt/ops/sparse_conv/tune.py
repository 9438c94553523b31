"""Per-CPU choice of the compiled kernel's float32 algorithm (direct or gather + GEMM), measured on this machine.

Which algorithm is faster for a conv width depends on the CPU (MKL's sgemm is fast on Intel CPUs and takes slower
code paths elsewhere; core counts and caches differ), so a table measured on one machine is wrong on another. This
module times both algorithms through the stage API on one 3x3 conv per HRNet branch width at half of the positions
active (blob masks, as stop masks are) and stores the faster one per width in a JSON file per CPU:
``$MMSEG_CBT_CACHE_DIR`` (default ``~/.cache/mmseg_cbt``) ``/tune/<cpu>.json``, keyed by the CPU model, the kernel's
instruction set and the torch thread count. The policy's ``auto`` reads it when it exists (the nearest tuned width
decides) and falls back to its vendor rule otherwise; ``MMSEG_CBT_CPU_ALGO=tune`` measures on first use when no file
exists. Re-tune with ``python tools/analysis_tools/tune_sparse_conv.py --force`` (or delete the file).
"""
import hashlib
import json
import math
import os
import os.path as osp
import time
from typing import Dict, Optional, Sequence, Tuple

import torch

from ...utils.cpuinfo import cpu_model_name
from ...utils.io import write_json_atomic
from ..ext_loader import load_cpu_ext

__all__ = ['TUNE_SHAPES', 'tune_key', 'tune_path', 'measure_algorithms', 'load_tuned', 'tuned_direct', 'clear_tuned']

#: (output channels, H, W) of the tuned convs: one 3x3 conv per HRNet-W18-small / W48 branch at a 512x1024 input.
TUNE_SHAPES: Tuple[Tuple[int, int, int], ...] = ((18, 128, 256), (36, 64, 128), (48, 128, 256), (72, 32, 64),
                                                 (96, 64, 128), (144, 16, 32), (192, 32, 64), (384, 16, 32))

_STATE: Dict[str, object] = {}  # 'key' -> (threads, cache dir) read for, 'table' -> {cout: direct} (None: no file)


def tune_key() -> Dict[str, object]:
    """What a tuning result is valid for: the CPU model, the kernel's instruction set, the torch thread count."""
    ext = load_cpu_ext()
    return dict(cpu=cpu_model_name(), isa=ext.isa() if ext is not None else 'none', threads=torch.get_num_threads())


def tune_path(key: Optional[Dict[str, object]] = None) -> str:
    """The JSON file holding the tuning result for ``key`` (default: this machine's)."""
    key = tune_key() if key is None else key
    root = os.environ.get('MMSEG_CBT_CACHE_DIR', osp.join(osp.expanduser('~'), '.cache', 'mmseg_cbt'))
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    return osp.join(root, 'tune', f'{digest}.json')


def _time_algorithms(cout: int, h: int, w: int, active: float, repeats: int) -> Tuple[float, float]:
    """Best-of-``repeats`` ms of one masked 3x3 conv (cin = cout) through the stage API: (direct, gemm)."""
    from mmseg_cbt.ops.policy import cpu_algorithm
    from mmseg_cbt.utils.benchmark import blob_mask
    from .dispatch import sparse_conv_buffer
    from .index import SparseIndex
    from .layout import to_padded_nhwc
    from .packing import conv_weight_matrix
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, cout, h, w, generator=gen)
    weight = torch.randn(cout, cout, 3, 3, generator=gen) * 0.05
    bias = torch.zeros(cout)
    buf, out = to_padded_nhwc(x), to_padded_nhwc(x)
    idx = SparseIndex.build(blob_mask(1, h, w, active, seed=0))
    wmat = conv_weight_matrix(weight)
    best = {'direct': math.inf, 'gemm': math.inf}
    with torch.no_grad():
        for r in range(repeats + 1):
            for algo in best:  # interleaved, so that a noisy moment hits both
                with cpu_algorithm(algo):
                    t0 = time.perf_counter()
                    sparse_conv_buffer(buf, idx, wmat, bias, out, stride=1, padding=1, dense_threshold=float('inf'))
                    dt = (time.perf_counter() - t0) * 1e3
                if r > 0:  # the first round warms caches and the kernel's buffers
                    best[algo] = min(best[algo], dt)
    return best['direct'], best['gemm']


def measure_algorithms(shapes: Sequence[Tuple[int, int, int]] = TUNE_SHAPES,
                       active: float = 0.5,
                       repeats: int = 5,
                       save: bool = True) -> dict:
    """Times the direct and the GEMM algorithm per conv width and (``save``) stores the result for this machine.

    Args:
        shapes (Sequence[tuple[int, int, int]]): (channels, H, W) per tuned conv.
        active (float): Active fraction of the blob masks, in (0, 1).
        repeats (int): Timed rounds per algorithm (best of).
        save (bool): Write the result to :func:`tune_path` (atomically) and use it from now on.

    Returns:
        dict: ``key`` (:func:`tune_key`), ``active``, ``widths``: per channel count ``direct_ms``, ``gemm_ms``,
        ``direct`` (bool: the direct algorithm is faster).

    Raises:
        RuntimeError: The compiled kernel or its direct algorithm is not available.
        ValueError: ``active`` outside (0, 1) or ``repeats`` < 1.
    """
    ext = load_cpu_ext()
    if ext is None or not ext.has_direct():
        raise RuntimeError('tuning needs the compiled CPU kernel with its direct algorithm (AVX-512 or AVX2 + FMA); '
                           'there is nothing to choose otherwise')
    if not 0.0 < active < 1.0:
        raise ValueError(f'active must be in (0, 1), got {active}')
    if repeats < 1:
        raise ValueError(f'repeats must be >= 1, got {repeats}')
    widths = {}
    for cout, h, w in shapes:
        d, g = _time_algorithms(cout, h, w, active, repeats)
        widths[str(cout)] = dict(shape=[h, w], direct_ms=round(d, 4), gemm_ms=round(g, 4), direct=d <= g)
    result = dict(key=tune_key(), active=active, widths=widths)
    if save:
        path = tune_path(result['key'])
        os.makedirs(osp.dirname(path), exist_ok=True)
        write_json_atomic(result, path)  # a reader sees the old file or the new one, never half of one
        clear_tuned()
    return result


def load_tuned(measure_missing: bool = False) -> Optional[Dict[int, bool]]:
    """This machine's tuned table {channels: direct is faster}, read once per process and thread count (None: not
    tuned). Called for every masked conv, so the check is two cheap lookups once the file was read.

    Args:
        measure_missing (bool): Measure and save it now when there is no file (``MMSEG_CBT_CPU_ALGO=tune``).
    """
    state_key = (torch.get_num_threads(), os.environ.get('MMSEG_CBT_CACHE_DIR'))
    if _STATE.get('key') == state_key and not (measure_missing and _STATE['table'] is None):
        return _STATE['table']  # type: ignore[return-value]
    path = tune_path()
    table = None
    if osp.exists(path):
        try:
            with open(path) as f:
                data = json.load(f)
            table = {int(k): bool(v['direct']) for k, v in data['widths'].items()}
        except (OSError, ValueError, KeyError, TypeError):
            table = None  # a damaged file is ignored (re-tune to replace it)
    if table is None and measure_missing:
        table = {int(k): bool(v['direct']) for k, v in measure_algorithms()['widths'].items()}
    _STATE.update(key=state_key, table=table)
    return table


def tuned_direct(cout: int, measure_missing: bool = False) -> Optional[bool]:
    """Whether the tuned table sends a conv with ``cout`` output channels to the direct algorithm (the nearest
    tuned width on a log scale decides); None when this machine is not tuned."""
    table = load_tuned(measure_missing)
    if not table:
        return None
    nearest = min(table, key=lambda c: (abs(math.log(c) - math.log(max(cout, 1))), c))
    return table[nearest]


def clear_tuned() -> None:
    """Forgets the table read by :func:`load_tuned` (the next call reads the file again)."""
    _STATE.clear()
