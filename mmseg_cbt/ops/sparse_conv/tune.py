"""Per-CPU choice of the compiled kernel's float32 algorithm (direct or gather + GEMM), measured on this machine.

Which algorithm is faster for a conv width depends on the CPU (MKL's sgemm is fast on Intel CPUs and takes slower code
paths elsewhere; core counts, caches and vector datapaths differ), so a table measured on one machine is wrong on
another. This module times the algorithms through the stage API on one 3x3 conv per HRNet branch width at half of the
positions active (blob masks, as stop masks are): the gather + GEMM and the direct algorithm's variants, thin (per-tile
blocks of output vectors), wide (cache-blocked) and, for widths whose last ``cout % L <= 4`` channels the thin variant
computes as dot products (``L`` = 16 lanes on AVX-512, 8 on AVX2), thin with those channels as one more masked vector
(``direct-vtail``). Where the kernel's built-in thin / wide rule and tail rule are best differs by CPU: on an AMD Zen 5
core, with its full-width FMAs, the wide variant is the fastest already at 36 and 48 channels, and the vector tail beats
the dot products at 36 channels but not at 18. The fastest is stored per width in a JSON file per CPU:
``$MMSEG_CBT_CACHE_DIR`` (default ``~/.cache/mmseg_cbt``) ``/tune/<cpu>.json``, keyed by the CPU model (name and family
/ model / stepping), the kernel's instruction set and the torch thread count. The policy's ``auto`` reads it when it
exists (the nearest tuned width decides) and falls back to its vendor rule otherwise; ``MMSEG_CBT_CPU_ALGO=tune``
measures on first use when no file exists. Re-tune with ``python tools/analysis_tools/tune_sparse_conv.py --force`` (or
delete the file).
"""
import hashlib
import json
import math
import os
import os.path as osp
import time
from typing import Dict, Optional, Sequence, Tuple

import torch

from ...utils.cpuinfo import cpu_model_name, cpu_signature
from ...utils.io import write_json_atomic
from ..ext_loader import load_cpu_ext, vector_lanes
from ..policy import DIRECT_VARIANTS

__all__ = [
    'TUNE_SHAPES', 'TUNED_ALGORITHMS', 'tune_key', 'tune_path', 'measure_algorithms', 'load_tuned', 'tuned_algorithm',
    'clear_tuned', 'has_short_tail', 'row_algorithm'
]

#: (output channels, H, W) of the tuned convs: one 3x3 conv per HRNet-W18-small / W48 branch at a 512x1024 input.
TUNE_SHAPES: Tuple[Tuple[int, int, int], ...] = ((18, 128, 256), (36, 64, 128), (48, 128, 256), (72, 32, 64),
                                                 (96, 64, 128), (144, 16, 32), (192, 32, 64), (384, 16, 32))

#: What a tuned width can name: the kernel's algorithms as the policy forces them (``direct``: files of the first
#: version, which timed the kernel's own thin / wide choice only).
TUNED_ALGORITHMS = tuple(DIRECT_VARIANTS) + ('gemm', )

_TIMED_MS = {'direct-thin': 'thin_ms', 'direct-wide': 'wide_ms', 'direct-vtail': 'vtail_ms', 'gemm': 'gemm_ms'}

_STATE: Dict[str, object] = {}  # 'key' -> (threads, cache dir) read for, 'table' -> {cout: algorithm} (None: no file)


def has_short_tail(ext, cout: int) -> bool:
    """Whether the direct algorithm's thin variant computes the last ``cout % L`` (1 to 4) channels of a conv as
    dot products, i.e. whether ``direct-vtail`` is a different computation for it."""
    lanes = vector_lanes(ext)
    return lanes is not None and 0 < cout % lanes <= 4


def tune_key() -> Dict[str, object]:
    """What a tuning result is valid for: the CPU model (name and family / model / stepping), the kernel's
    instruction set, the torch thread count."""
    ext = load_cpu_ext()
    return dict(
        cpu=cpu_model_name(),
        cpu_id=cpu_signature(),
        isa=ext.isa() if ext is not None else 'none',
        threads=torch.get_num_threads())


def tune_path(key: Optional[Dict[str, object]] = None) -> str:
    """The JSON file holding the tuning result for ``key`` (default: this machine's)."""
    key = tune_key() if key is None else key
    root = os.environ.get('MMSEG_CBT_CACHE_DIR', osp.join(osp.expanduser('~'), '.cache', 'mmseg_cbt'))
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    return osp.join(root, 'tune', f'{digest}.json')


def _time_algorithms(cout: int, h: int, w: int, active: float, repeats: int,
                     algorithms: Sequence[str]) -> Dict[str, float]:
    """Best-of-``repeats`` ms of one masked 3x3 conv (cin = cout) through the stage API, per algorithm."""
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
    best = {a: math.inf for a in algorithms}
    with torch.no_grad():
        for r in range(repeats + 1):
            for algo in best:  # interleaved, so that a noisy moment hits both
                with cpu_algorithm(algo):
                    t0 = time.perf_counter()
                    sparse_conv_buffer(buf, idx, wmat, bias, out, stride=1, padding=1, dense_threshold=float('inf'))
                    dt = (time.perf_counter() - t0) * 1e3
                if r > 0:  # the first round warms caches and the kernel's buffers
                    best[algo] = min(best[algo], dt)
    return best


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
        dict: ``key`` (:func:`tune_key`), ``active``, ``widths``: per channel count ``thin_ms``, ``wide_ms``,
        ``vtail_ms`` (widths with a short tail only), ``gemm_ms``, ``direct_ms`` (the fastest direct variant),
        ``algorithm`` (the fastest of all) and ``direct`` (bool: a direct variant is the fastest).

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
        algos = ['direct-thin', 'direct-wide'] + (['direct-vtail'] if has_short_tail(ext, cout) else []) + ['gemm']
        ms = _time_algorithms(cout, h, w, active, repeats, algos)
        fastest = min(algos, key=lambda a: ms[a])  # ties: the first listed
        row = dict(shape=[h, w], **{_TIMED_MS[a]: round(ms[a], 4) for a in algos})
        row['direct_ms'] = round(min(ms[a] for a in algos if a != 'gemm'), 4)
        widths[str(cout)] = dict(row, algorithm=fastest, direct=fastest != 'gemm')
    result = dict(key=tune_key(), active=active, widths=widths)
    if save:
        path = tune_path(result['key'])
        os.makedirs(osp.dirname(path), exist_ok=True)
        write_json_atomic(result, path)  # a reader sees the old file or the new one, never half of one
        clear_tuned()
    return result


def row_algorithm(row: dict) -> str:
    """The algorithm one width's row of a result names (a file of the first version names it by ``direct``)."""
    return row.get('algorithm', 'direct' if row['direct'] else 'gemm')


def _table(widths: dict) -> Dict[int, str]:
    """{channels: algorithm} of a result's ``widths``."""
    table = {}
    for k, v in widths.items():
        algo = row_algorithm(v)
        if algo not in TUNED_ALGORITHMS:
            raise ValueError(f'unknown algorithm {algo!r}')
        table[int(k)] = algo
    return table


def load_tuned(measure_missing: bool = False) -> Optional[Dict[int, str]]:
    """This machine's tuned table {channels: fastest algorithm}, read once per process and thread count (None: not
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
            table = _table(data['widths'])
        except (OSError, ValueError, KeyError, TypeError):
            table = None  # a damaged file is ignored (re-tune to replace it)
    if table is None and measure_missing:
        table = _table(measure_algorithms()['widths'])
    _STATE.update(key=state_key, table=table, nearest={})
    return table


def tuned_algorithm(cout: int, measure_missing: bool = False) -> Optional[str]:
    """The tuned algorithm for a conv with ``cout`` output channels (the nearest tuned width on a log scale
    decides); None when this machine is not tuned."""
    table = load_tuned(measure_missing)
    if not table:
        return None
    memo = _STATE.setdefault('nearest', {})  # per conv call otherwise: ~20 us of Python, 3 % of a W48 pass
    if cout not in memo:
        memo[cout] = table[min(table, key=lambda c: (abs(math.log(c) - math.log(max(cout, 1))), c))]
    return memo[cout]


def clear_tuned() -> None:
    """Forgets the table read by :func:`load_tuned` (the next call reads the file again)."""
    _STATE.clear()
