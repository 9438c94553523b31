"""Wall-clock benchmark of masked (early-exit) inference against dense inference, on CPU.

Sections (each a function returning a list of result rows; ``main`` calls the selected ones):

(a) ``bench_single_convs``: single 3x3 convs at HRNet branch shapes (W18-small and W48 at a 512x1024
    input), dense ``F.conv2d`` vs the masked stage path of ``mmseg_cbt.ops`` (gather + GEMM + epilogue +
    scatter from a persistent padded channels-last buffer, or its dense fallback) at several stopped
    fractions with blob-shaped masks. Index building (once per exit and resolution in a real network)
    is timed separately.
(crossover) ``bench_crossover``: the forced sparse path against the forced dense fallback (both with
    "copy" semantics) from 30 to 90 % active for 3x3 stride-1, 3x3 stride-2 and 1x1 convs at the same
    shapes, and where the sparse path stops winning; these points are the table behind
    ``mmseg_cbt.ops.dense_crossover``.
(b) ``bench_backbones`` (in ``benchmark_masked_backbone.py``): the whole W18-small and W48 early-exit
    backbones, dense (as built, and BN-folded channels-last) versus masked stages 2-4, wall ratio next to
    the MAC ratio (counted by ``mmseg_cbt.analysis``).
(paths) ``bench_paths`` (same file): stages 2-4 timed as dense, simulated, sparse (copy fill) and sparse
    with the rbf fill.
(spconv) ``bench_spconv`` (in ``benchmark_masked_spconv.py``): the section-(a) convs through our stage API, our
    public op and spconv's ``SubMConv2d`` (CPU) side by side, when spconv is installed.

Before anything is timed, ``mmseg_cbt.utils.tune_malloc()`` is applied (process-wide, so to the dense and
the masked side alike; ``--no-tune-malloc`` keeps glibc's defaults): without it every call re-faults the
pages of large fresh tensors on these VMs.

Timing: all variants of one configuration are timed interleaved in one process (round-robin, best of
``--repeats`` rounds), because the 2 CPU cores are shared and absolute times drift. Ratios are what to
read. The CPU time other processes used during each row is measured (``bg%``: share of all cores); a
row is re-measured while it exceeds ``--max-foreign`` (2-thread timings collapse when another job
takes a core: OpenMP regions wait for the descheduled thread). ``--clock`` chooses the clock of every
section (``mmseg_cbt.utils.benchmark.Timer``, passed to each). Results and how to read them: docs/benchmarks.md.

Examples::

    python tools/analysis_tools/benchmark_masked.py --quick
    python tools/analysis_tools/benchmark_masked.py --json work_dirs/bench_masked.json
    python tools/analysis_tools/benchmark_masked.py --sections crossover
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from typing import Callable, Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F

import mmseg_cbt.ops as ops
from mmseg_cbt.utils.benchmark import CLOCKS, Timer, blob_mask, timed_quiet

# Branch widths and the 1/4-resolution size for a 512x1024 input (each branch halves the size).
MODELS: Dict[str, Tuple[int, ...]] = {
    'W18s': (18, 36, 72, 144),
    'W48': (48, 96, 192, 384),
}
# Targets for section (a) on 2 CPU cores: masked/dense wall ratio at a given active fraction.
TARGETS: Dict[float, float] = {1.0: 1.10, 0.5: 0.75, 0.25: 0.40, 0.1: 0.20}
# Targets of the public one-conv op (NCHW in, NCHW out, layout conversion included) at an active fraction.
OP_TARGETS: Dict[float, float] = {0.5: 0.85, 0.25: 0.50, 0.1: 0.30}


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------
def _timed(fns: Dict[str, Callable[[], object]], args: argparse.Namespace) -> Tuple[Dict[str, float], float]:
    """:func:`mmseg_cbt.utils.benchmark.timed_quiet` with the command line's clock, rounds and retry settings."""
    return timed_quiet(fns, args.repeats, args.timer, args.max_foreign, args.retries, args.retry_wait)


def branch_shapes(models: Sequence[str], input_hw: Tuple[int, int]) -> List[Tuple[str, int, int, int]]:
    """``(model, C, H, W)`` of every HRNet branch (1/4, 1/8, 1/16, 1/32 of the input)."""
    out = []
    for model in models:
        for i, c in enumerate(MODELS[model]):
            s = 4 * 2**i
            out.append((model, c, input_hw[0] // s, input_hw[1] // s))
    return out


def _conv_case(c_in: int,
               c_out: int,
               h: int,
               w: int,
               kernel_size: int = 3,
               stride: int = 1,
               seed: int = 0) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random input (at the conv's input resolution), weight and bias for an output of ``h x w``."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, c_in, h * stride, w * stride, generator=g)
    weight = torch.randn(
        c_out, c_in, kernel_size, kernel_size, generator=g) / math.sqrt(kernel_size * kernel_size * c_in)
    return x, weight, torch.randn(c_out, generator=g)


def _masked_runner(x: torch.Tensor,
                   weight: torch.Tensor,
                   bias: torch.Tensor,
                   mask: torch.Tensor,
                   timer: Timer,
                   stride: int = 1,
                   dense_threshold: float = None,
                   backend: str = 'auto') -> Tuple[Dict[str, Callable[[], object]], float, str]:
    """Prepares the stage-API call for one conv; returns (runners, index build ms, path).

    The input is converted to the padded channels-last buffer once, outside the timing, as a masked
    network keeps its features in that layout through a stage. ``runners`` is ``{'masked': fn}``, or for a
    full mask ``{'masked_nchw': fn, 'masked_cl': fn}`` (both formats, timed in the same rounds as the dense
    ones; the faster one is the masked time, as the faster dense format is the dense time).
    """
    n, _, h_in, w_in = x.shape
    k = weight.shape[-1]
    buf = ops.to_padded_nhwc(x.contiguous(memory_format=torch.channels_last))
    out_buf = ops.new_padded_buffer(n, weight.shape[0], mask.shape[1], mask.shape[2])
    conv = ops.PackedConv.from_weight(weight, bias, stride=stride)
    build_ms = float('inf')
    for _ in range(3):  # best of 3 fresh builds (tables for this conv's geometry included)
        t0 = timer.now()
        idx = ops.SparseIndex.build(mask)
        idx.windows((h_in, w_in), k, stride, k // 2)
        idx.rows(1)
        build_ms = min(build_ms, 1e3 * (timer.now() - t0))
    compiled = x.device.type == 'cpu' and backend != 'torch' and ops.cpu_ext_available()
    direct = compiled and ops.cpu_kernel_direct(weight.shape[0], x.dtype)
    thr = (
        ops.dense_crossover(k, weight.shape[1], weight.shape[0], compiled, direct)
        if dense_threshold is None else dense_threshold)
    path = 'skip' if idx.num_active == 0 else ('dense' if idx.active_fraction > thr else 'sparse')

    if not bool(mask.all()):
        return {
            'masked': lambda: conv.apply(buf, idx, out_buf, dense_threshold=dense_threshold, backend=backend)
        }, build_ms, path
    # nothing stopped: what the library does then (sparse_conv2d's full-mask path, the masked HRNet's dense
    # stage) is the plain dense conv on the input's own memory format, not a dense conv into a stage buffer.
    x_c, x_cl = x.contiguous(), x.contiguous(memory_format=torch.channels_last)
    return {
        'masked_nchw': lambda: ops.sparse_conv2d(x_c, weight, bias, mask, stride=stride, padding=k // 2),
        'masked_cl': lambda: ops.sparse_conv2d(x_cl, weight, bias, mask, stride=stride, padding=k // 2),
    }, build_ms, 'full'


def _dense_runners(x: torch.Tensor,
                   weight: torch.Tensor,
                   bias: torch.Tensor,
                   stride: int = 1) -> Dict[str, Callable[[], object]]:
    """Dense baselines: NCHW-contiguous and channels-last input (the faster one is the reference)."""
    x_c = x.contiguous()
    x_cl = x.contiguous(memory_format=torch.channels_last)
    p = weight.shape[-1] // 2
    return {
        'dense_nchw': lambda: F.conv2d(x_c, weight, bias, stride, p),
        'dense_cl': lambda: F.conv2d(x_cl, weight, bias, stride, p),
    }


def _op_runners(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                mask: torch.Tensor) -> Dict[str, Callable[[], object]]:
    """The public op as a user calls it: NCHW in and out, the same mask and weight tensors on every call.

    ``op``: under ``torch.no_grad`` (mmseg's test loop), so the mask's index and the weight's matrix are cached;
    ``op_inference``: with inference tensors (``torch.inference_mode``), which are never cached.
    """

    def normal(t: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode(False):
            return t.clone()

    xs, ws, bs, ms = (normal(t) for t in (x.contiguous(), weight, bias, mask))

    def op() -> object:
        with torch.inference_mode(False), torch.no_grad():
            return ops.sparse_conv2d(xs, ws, bs, ms, padding=1)

    x_inf = x.contiguous()
    return {'op': op, 'op_inference': lambda: ops.sparse_conv2d(x_inf, weight, bias, mask, padding=1)}


# --------------------------------------------------------------------------------------------------
# section (a): single convs
# --------------------------------------------------------------------------------------------------
def bench_single_convs(args: argparse.Namespace) -> List[dict]:
    """Section (a): one 3x3 stride-1 conv per HRNet branch shape, dense vs masked.

    Args:
        args: Parsed command line (``models``, ``input_size``, ``stopped``, ``repeats``).

    Returns:
        One dict per (shape, stopped fraction).
    """
    rows = []
    cpu_kernel = args.device == 'cpu' and ops.cpu_ext_available()
    print(f'\n(a) single 3x3 convs, batch 1, fp32, {torch.get_num_threads()} threads, '
          f'best of {args.repeats} interleaved rounds; crossover per shape from ops.dense_crossover')
    if cpu_kernel:
        print('masked = the default CPU path (the compiled kernel); "torch" = the same algorithm as pure-PyTorch ops')
        print('op = the public sparse_conv2d (NCHW in and out, layout conversion included, mask index and weight '
              'matrix cached) over the dense conv (the faster layout; the verdict); op/stg = op over the stage API '
              '(masked); op_inf = op with inference tensors (nothing cached); op/nchw = op over the dense conv on the '
              'same NCHW tensors (what a user with NCHW features runs instead)')
    hdr = (f'{"model":5} {"C":>4} {"HxW":>8} {"stop%":>5} {"act%":>5} {"path":>6} {"dense ms":>9} '
           f'{"(fmt)":>6} {"masked ms":>9} {"ratio":>6} {"MACs":>5} {"target":>6} {"torch":>6} {"idx ms":>7} '
           f'{"bg%":>4} {"op":>6} {"op/stg":>6} {"op_inf":>6} {"op/nchw":>7}')
    print(hdr)
    print('-' * len(hdr))
    for model, c, h, w in branch_shapes(args.models, tuple(args.input_size)):
        x, weight, bias = (t.to(args.device) for t in _conv_case(c, c, h, w))
        dense = _dense_runners(x, weight, bias)
        for stopped in args.stopped:
            active = 1.0 - stopped / 100.0
            mask = blob_mask(1, h, w, active, seed=c + int(stopped)).to(args.device)
            runners, build_ms, path = _masked_runner(x, weight, bias, mask, args.timer)
            fns = {**dense, **runners}
            if cpu_kernel and path == 'sparse':
                fns['masked_torch'] = _masked_runner(x, weight, bias, mask, args.timer, backend='torch')[0]['masked']
            if path == 'sparse':
                fns.update(_op_runners(x, weight, bias, mask))
            t, foreign = _timed(fns, args)
            if 'masked' not in t:
                t['masked'] = min(t['masked_nchw'], t['masked_cl'])
            fmt = min(dense, key=lambda k: t[k])
            d_ms = t[fmt]
            act = float(mask.float().mean())
            ratio = t['masked'] / d_ms
            target = TARGETS.get(round(active, 2))
            row = dict(
                section='a',
                model=model,
                channels=c,
                height=h,
                width=w,
                stopped_pct=stopped,
                active_frac=act,
                path=path,
                dense_ms=d_ms,
                dense_format=fmt,
                dense_nchw_ms=t['dense_nchw'],
                dense_cl_ms=t['dense_cl'],
                masked_ms=t['masked'],
                ratio=ratio,
                mac_ratio=act if path == 'sparse' else (0.0 if path == 'skip' else 1.0),
                target=target,
                index_build_ms=build_ms,
                meets_target=None if target is None else ratio <= target,
                foreign_load=foreign,
                cpu_kernel=cpu_kernel,
                masked_torch_ms=t.get('masked_torch'),
                ratio_torch=t['masked_torch'] / d_ms if 'masked_torch' in t else None,
                op_ms=t.get('op'),
                op_inference_ratio=t['op_inference'] / d_ms if 'op_inference' in t else None,
                op_ratio=t['op'] / d_ms if 'op' in t else None,
                op_nchw_ratio=t['op'] / t['dense_nchw'] if 'op' in t else None,
                op_target=OP_TARGETS.get(round(active, 2)) if 'op' in t else None)
            row['op_meets_target'] = None if row['op_target'] is None else row['op_ratio'] <= row['op_target']
            rows.append(row)
            flag = '' if target is None else (' ok' if ratio <= target else ' MISS')
            torch_col = '' if row['ratio_torch'] is None else f'{row["ratio_torch"]:.3f}'
            op_col = ''
            if row['op_ratio'] is not None:
                op_flag = '' if row['op_target'] is None else (' ok' if row['op_meets_target'] else ' MISS')
                op_col = (f' {row["op_ratio"]:6.3f} {t["op"] / t["masked"]:6.2f} '
                          f'{row["op_inference_ratio"]:6.3f} {row["op_nchw_ratio"]:7.3f}{op_flag}')
            print(
                f'{model:5} {c:4d} {h:>3}x{w:<4} {stopped:5.0f} {100 * act:5.1f} {path:>6} '
                f'{d_ms:9.3f} {fmt[6:]:>6} {t["masked"]:9.3f} {ratio:6.3f} {row["mac_ratio"]:5.2f} '
                f'{"" if target is None else f"{target:.2f}":>6} '
                f'{torch_col:>6} {build_ms:7.3f} '
                f'{100 * foreign:4.0f}{flag}{op_col}',
                flush=True)
    return rows


# --------------------------------------------------------------------------------------------------
# crossover
# --------------------------------------------------------------------------------------------------
def bench_crossover(args: argparse.Namespace) -> List[dict]:
    """Sparse path vs dense fallback from 30 to 90 % active, and where the sparse path stops winning.

    Both are timed through ``sparse_conv_buffer`` (forced with ``dense_threshold``), i.e. what the op
    actually chooses between: the dense fallback of a partial mask costs the dense conv plus writing only
    the active positions (stopped ones keep their values). Ratios are printed relative to the best plain
    dense conv. Three conv kinds per branch shape: 3x3 stride 1 (C -> C), 3x3 stride 2 (C/2 at 2x
    resolution -> C, as in HRNet transitions / fuse downsampling) and 1x1 (C -> C).

    Args:
        args: Parsed command line.

    Returns:
        One dict per (kind, shape) with the ratios and the interpolated crossover.
    """
    rows = []
    actives = [0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9] if not args.quick else [0.3, 0.5, 0.7, 0.9]
    print(f'\n(crossover) sparse path / best dense conv (and dense fallback / best dense), best of '
          f'{args.repeats}; crossover = active fraction where sparse == fallback')
    print(f'{"kind":5} {"Cin":>4} {"Cout":>4} {"HxW":>8} {"MAC/px":>7} ' + ' '.join(f'{int(100 * a):>9}%'
                                                                                    for a in actives) + '  crossover')
    kinds = [kd for kd in (('3x3', 3, 1), ('3x3s2', 3, 2), ('1x1', 1, 1)) if kd[0] in args.kinds]
    for name, k, stride in kinds:
        for _, c, h, w in branch_shapes(args.models, tuple(args.input_size)):
            c_in = c // 2 if stride == 2 else c
            x, weight, bias = _conv_case(c_in, c, h, w, k, stride)
            dense = _dense_runners(x, weight, bias, stride)
            sp, fb = [], []
            for a in actives:
                mask = blob_mask(1, h, w, a, seed=c)
                run_sp = _masked_runner(x, weight, bias, mask, args.timer, stride, dense_threshold=float('inf'))[0]
                run_fb = _masked_runner(x, weight, bias, mask, args.timer, stride, dense_threshold=-1.0)[0]
                t, _ = _timed({**dense, 'sparse': run_sp['masked'], 'fallback': run_fb['masked']}, args)
                d = min(t['dense_nchw'], t['dense_cl'])
                sp.append(t['sparse'] / d)
                fb.append(t['fallback'] / d)
            diff = [s_ - f_ for s_, f_ in zip(sp, fb)]
            cross = 0.0 if diff[0] > 0 else 1.0
            for (a0, d0), (a1, d1) in zip(zip(actives, diff), zip(actives[1:], diff[1:])):
                if d0 <= 0 < d1:
                    cross = a0 + -d0 * (a1 - a0) / (d1 - d0)
                    break
            macs = k * k * c_in * c
            table = ops.dense_crossover(k, c_in, c, ops.cpu_ext_available(), ops.cpu_kernel_direct(c))
            rows.append(
                dict(
                    section='crossover',
                    kind=name,
                    c_in=c_in,
                    c_out=c,
                    height=h,
                    width=w,
                    macs_per_px=macs,
                    actives=actives,
                    sparse_ratios=sp,
                    fallback_ratios=fb,
                    crossover=cross,
                    table=table))
            txt = (f'<{actives[0]:.2f}' if cross == 0.0 else f'>{actives[-1]:.2f}' if cross == 1.0 else f'{cross:.2f}')
            print(
                f'{name:5} {c_in:4d} {c:4d} {h:>3}x{w:<4} {macs:7d} ' +
                ' '.join(f'{s_:4.2f}/{f_:4.2f}' for s_, f_ in zip(sp, fb)) + f'  {txt:>6} (table {table:.2f})',
                flush=True)
    return rows


def _section_in(module: str, name: str) -> Callable[[argparse.Namespace], List[dict]]:
    """A section implemented in another script next to this one, imported when it runs (it needs mmseg, or
    spconv)."""

    def run(args: argparse.Namespace) -> List[dict]:
        import importlib
        return getattr(importlib.import_module(module), name)(args)

    return run


# Section (b): whole W18-small / W48 early-exit backbones; 'paths': their stages 2-4 by execution path.
bench_backbones = _section_in('benchmark_masked_backbone', 'bench_backbones')
bench_paths = _section_in('benchmark_masked_backbone', 'bench_paths')
# spconv's SubMConv2d beside ours (skipped when spconv is not installed).
bench_spconv = _section_in('benchmark_masked_spconv', 'bench_spconv')


def plot_results(rows: List[dict], out: str) -> str:
    """Draws sections (a) and (b) of a run: wall-time ratio masked/dense against the MAC ratio.

    Left: every single-conv shape (masked/dense wall ratio against the active fraction), the targets as markers and
    the MAC ratio as the diagonal. Right: the whole backbones (wall ratio against the stopped fraction) with their
    MAC ratio and the 1.25 x MAC-ratio target at 75 % stopped. Panels without rows are left out.

    Args:
        rows: Result rows of :func:`main` (rows of other sections are ignored).
        out: PNG path (its folder is created).

    Returns:
        ``out``.

    Raises:
        ValueError: No row of section a or b.
    """
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    a_rows = [r for r in rows if r.get('section') == 'a']
    b_rows = [r for r in rows if r.get('section') == 'b']
    if not a_rows and not b_rows:
        raise ValueError('plot_results needs rows of section a or b')
    panels = [p for p, r in (('a', a_rows), ('b', b_rows)) if r]
    fig, axes = plt.subplots(1, len(panels), figsize=(6.4 * len(panels), 4.8), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        if panel == 'a':
            shapes = sorted({(r['model'], r['channels'], r['height'], r['width'])
                             for r in a_rows},
                            key=lambda t: (t[0], t[1]))
            for model, c, h, w in shapes:
                pts = sorted((r['active_frac'], r['ratio']) for r in a_rows
                             if (r['model'], r['channels'], r['height'], r['width']) == (model, c, h, w))
                ax.plot([p[0] for p in pts], [p[1] for p in pts], 'o-', ms=4, label=f'{model} {c}@{h}x{w}')
            ax.plot([0, 1], [0, 1], 'k--', lw=1, label='MAC ratio')
            tx, ty = zip(*sorted(TARGETS.items()))
            ax.plot(tx, ty, 'rv', ms=9, label='target (at most)')
            ax.set_xlabel('active fraction')
            ax.set_ylabel('wall time masked / dense')
            ax.set_title('(a) single 3x3 convs')
        else:
            for model in sorted({r['model'] for r in b_rows}):
                pts = sorted((r['stopped'], r['wall_ratio'], r['mac_ratio']) for r in b_rows if r['model'] == model)
                line, = ax.plot([p[0] for p in pts], [p[1] for p in pts], 'o-', label=f'{model} wall')
                ax.plot([p[0] for p in pts], [p[2] for p in pts], '--', color=line.get_color(), label=f'{model} MACs')
                tgt = [1.25 * p[2] for p in pts if p[0] == 75]
                if tgt:
                    ax.plot([75], tgt, 'v', color=line.get_color(), ms=9, label=f'{model} target (1.25 x MACs)')
            ax.set_xlabel('stopped after exit 1 (%)')
            ax.set_ylabel('masked / dense (optimized)')
            ax.set_title('(b) whole early-exit backbones')
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(
        f'masked vs dense inference, {torch.get_num_threads()} CPU threads '
        f'({platform.processor() or platform.machine()})',
        fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


SECTIONS: Dict[str, Callable[[argparse.Namespace], List[dict]]] = {
    'a': bench_single_convs,
    'b': bench_backbones,
    'paths': bench_paths,
    'crossover': bench_crossover,
    'spconv': bench_spconv,
}


def parse_args(argv: Sequence[str] = None) -> argparse.Namespace:
    """Command line."""
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument(
        '--sections',
        nargs='+',
        default=['a', 'b'],
        choices=sorted(SECTIONS),
        help='which sections to run (default: a b)')
    p.add_argument('--models', nargs='+', default=list(MODELS), choices=list(MODELS))
    p.add_argument(
        '--input-size',
        nargs=2,
        type=int,
        default=[512, 1024],
        metavar=('H', 'W'),
        help='network input size; branch 1 is at 1/4 of it (default 512 1024)')
    p.add_argument(
        '--kinds',
        nargs='+',
        default=['3x3', '3x3s2', '1x1'],
        choices=['3x3', '3x3s2', '1x1'],
        help='conv kinds of the crossover section')
    p.add_argument(
        '--stopped', nargs='+', type=float, default=[0, 50, 75, 90], help='stopped percentages (default 0 50 75 90)')
    p.add_argument('--repeats', type=int, default=None, help='timing rounds (default 7, quick 3)')
    p.add_argument('--e2e-repeats', type=int, default=3, help='timing rounds of section b (default 3)')
    p.add_argument('--threads', type=int, default=None, help='torch threads (default: torch default)')
    p.add_argument(
        '--clock',
        choices=list(CLOCKS),
        default='wall',
        help="'thread': CPU time of the calling thread (only meaningful with --threads 1; "
        "robust against other processes on a shared machine). Default: wall time")
    p.add_argument(
        '--max-foreign',
        type=float,
        default=0.1,
        help='re-measure a row while other processes used more than this fraction of the '
        'cores (default 0.1; reported as bg%%)')
    p.add_argument('--retries', type=int, default=4, help='re-measurements per row (default 4)')
    p.add_argument('--retry-wait', type=float, default=2.0, help='seconds between them (default 2)')
    p.add_argument('--quick', action='store_true', help='short run: 3 rounds, fewer shapes')
    p.add_argument(
        '--device',
        default='cpu',
        choices=['cpu', 'cuda'],
        help="'cuda': section a on the GPU (the Triton kernel when triton is importable)")
    p.add_argument(
        '--no-tune-malloc',
        action='store_true',
        help="keep glibc's default allocator settings (default: mmseg_cbt.utils.tune_malloc() "
        'before anything is timed, for dense and masked alike)')
    p.add_argument('--json', metavar='OUT', default=None, help='save all result rows as JSON')
    p.add_argument(
        '--plot',
        metavar='PNG',
        default=None,
        help='draw sections a and b (wall ratio against MAC ratio) into this PNG')
    p.add_argument(
        '--plot-from',
        metavar='JSON',
        nargs='+',
        default=None,
        help='only draw --plot from the rows of earlier --json files (nothing is timed); a later file '
        "replaces an earlier one's rows of the same section and model (e.g. a clean re-run)")
    args = p.parse_args(argv)
    if args.repeats is None:
        args.repeats = 3 if args.quick else 7
    if args.quick and args.models == list(MODELS):
        args.models = ['W18s']
    return args


def main(argv: Sequence[str] = None) -> List[dict]:
    """Runs the selected sections, prints their tables and optionally saves JSON."""
    args = parse_args(argv)
    if args.plot_from:
        if not args.plot:
            raise SystemExit('--plot-from needs --plot')
        rows: List[dict] = []
        for path in args.plot_from:
            with open(path) as f:
                new = json.load(f)['results']
            keys = {(r.get('section'), r.get('model')) for r in new}
            rows = [r for r in rows if (r.get('section'), r.get('model')) not in keys] + new
        print(f'saved {plot_results(rows, args.plot)}')
        return rows
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.clock == 'thread' and torch.get_num_threads() != 1:
        raise SystemExit('--clock thread needs --threads 1')
    args.timer = Timer.from_name(args.clock, args.device)
    tuned = False
    if not args.no_tune_malloc:
        from mmseg_cbt.utils.inference import tune_malloc
        tuned = tune_malloc()
    args.malloc_tuned = tuned
    load = os.getloadavg() if hasattr(os, 'getloadavg') else None
    print(f'torch {torch.__version__}, {torch.get_num_threads()} threads, {args.clock} clock, '
          f'malloc tuned: {tuned}, load avg {load}')
    results: List[dict] = []
    with torch.inference_mode():
        for name in args.sections:
            results += SECTIONS[name](args)
    if args.json:
        meta = dict(
            torch=torch.__version__,
            threads=torch.get_num_threads(),
            python=platform.python_version(),
            machine=platform.processor() or platform.machine(),
            loadavg_start=load,
            loadavg_end=os.getloadavg() if hasattr(os, 'getloadavg') else None,
            clock=args.clock,
            args={
                k: v
                for k, v in vars(args).items() if k != 'timer'
            },
            time=time.strftime('%Y-%m-%d %H:%M:%S'))
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, 'w') as f:
            json.dump(dict(meta=meta, results=results), f, indent=1)
        print(f'saved {args.json}')
    if args.plot:
        print(f'saved {plot_results(results, args.plot)}')
    return results


if __name__ == '__main__':
    main()
