"""Section ``spconv`` of ``benchmark_masked.py``: our masked conv beside spconv's ``SubMConv2d`` on CPU.

spconv (``pip install -r requirements/benchmark.txt``; an optional benchmark dependency, never a runtime one) is the
established sparse-convolution library. Its submanifold conv computes the outputs at the active sites from the active
sites only: a stopped input reads as zero. Ours computes the same outputs, but a stopped input reads its stored value
(what keeps an early-exit network equal to its dense simulation). Both are timed here on the same blob masks, 3x3
stride-1 convs at the HRNet branch shapes of section (a), in one process, interleaved with the dense conv:

* ``ours``: the stage API (padded channels-last buffer and index built once, as a masked network keeps them),
* ``op``: the public ``sparse_conv2d`` (NCHW in and out, mask index and weight matrix cached on the tensors),
* ``spconv``: a submanifold conv on a ``SparseConvTensor`` of the active rows, its index pairs computed once and
  reused (``indice_key``), as a sparse network reuses them from layer to layer; its CPU path has no fused bias, so
  the bias is added to its output rows in place (a few microseconds). It runs as ``SubMConv3d`` with a (1, 3, 3)
  kernel on a depth-1 grid, because spconv 2.3.8's CPU ``SubMConv2d`` builds no index pairs besides the centre's.

spconv's CPU conv is correct with one torch thread only (with two, rows come out wrong at random positions, a race
in its accumulation), so the comparison is ``--sections spconv --threads 1``; at more threads the rows are marked.

Parity is checked on every row: with the stopped inputs set to zero, ours must equal spconv at the active positions
(``max|diff|`` column); a row where it does not is marked, as its spconv time then measures a wrong computation.
"""
import math
from typing import Callable, Dict, List

import torch
import torch.nn.functional as F

import mmseg_cbt.ops as ops
from mmseg_cbt.utils.benchmark import blob_mask, timed_quiet


def _spconv_runner(spconv, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                   mask: torch.Tensor) -> Callable[[], torch.Tensor]:
    """spconv's submanifold conv with our weights on the active rows of ``x``; returns a callable giving the rows.

    Run as ``SubMConv3d`` with a (1, 3, 3) kernel on a depth-1 grid: spconv 2.3.8's CPU ``SubMConv2d`` builds no
    index pairs but the centre's (it computes one tap of nine), while its 3-D path builds them correctly.
    """
    n, c, _, _ = x.shape
    idx = mask.nonzero().int()  # (M, 3): batch, y, x (row-major, the order of our index)
    idx = torch.cat([idx[:, :1], torch.zeros_like(idx[:, :1]), idx[:, 1:]], 1).contiguous()  # batch, z=0, y, x
    feats = x.permute(0, 2, 3, 1)[mask].contiguous()
    # spconv's CPU path has no fused bias ("cpu don't support act and bias"): added to its output rows in place
    conv = spconv.SubMConv3d(c, weight.shape[0], (1, 3, 3), padding=(0, 1, 1), bias=False, indice_key='bench')
    with torch.no_grad():
        # spconv 2.x keeps the weight as (Cout, kd, kh, kw, Cin)
        conv.weight.copy_(weight.permute(0, 2, 3, 1).reshape(conv.weight.shape))
    conv.eval()
    sp = spconv.SparseConvTensor(feats, idx, [1] + list(mask.shape[1:]), n)
    first = conv(sp)  # computes the index pairs, kept under indice_key in first's indice_dict
    warm = first.replace_feature(feats)

    def run() -> torch.Tensor:
        return conv(warm).features.add_(bias)

    return run


def _probe(spconv) -> str:
    """spconv's 2-D and 3-D submanifold convs on a 6x6 grid with every site active, against ``F.conv2d``: the index
    pairs each builds per kernel offset (the centre is computed apart from the pairs) and the largest difference."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 6, 6, generator=g)
    weight = torch.randn(4, 4, 3, 3, generator=g)
    ref = F.conv2d(x, weight, None, 1, 1).permute(0, 2, 3, 1).reshape(-1, 4)
    feats = x.permute(0, 2, 3, 1).reshape(-1, 4).contiguous()
    idx = torch.ones(1, 6, 6, dtype=torch.bool).nonzero().int()
    parts = []
    for name, conv, ind, shape in (
        ('SubMConv2d', spconv.SubMConv2d(4, 4, 3, padding=1, bias=False, indice_key='p2'), idx, [6, 6]),
        ('SubMConv3d (1, 3, 3)', spconv.SubMConv3d(4, 4, (1, 3, 3), padding=(0, 1, 1), bias=False, indice_key='p3'),
         torch.cat([idx[:, :1], torch.zeros_like(idx[:, :1]), idx[:, 1:]], 1).contiguous(), [1, 6, 6]),
    ):
        conv.weight.copy_(weight.permute(0, 2, 3, 1).reshape(conv.weight.shape))
        out = conv(spconv.SparseConvTensor(feats, ind, shape, 1))
        pairs = out.indice_dict[conv.indice_key].indice_pair_num.tolist()
        parts.append(f'{name} pairs per offset {pairs}, max|diff| {float((out.features - ref).abs().max()):.2g}')
    return '; '.join(parts)


def bench_spconv(args) -> List[dict]:
    """Section ``spconv``: ours (stage API and public op) beside spconv's ``SubMConv2d``, ratios to dense.

    Args:
        args: Parsed command line of ``benchmark_masked.py`` (``models``, ``input_size``, ``stopped``, timing).

    Returns:
        One dict per (shape, stopped fraction); empty when spconv is not installed.
    """
    try:
        import spconv.pytorch as spconv
        from spconv import __version__ as spconv_version
    except ImportError:
        print('\n(spconv) skipped: spconv is not installed (pip install -r requirements/benchmark.txt)')
        return []
    from benchmark_masked import _op_runners, branch_shapes  # section (a)'s shapes and public-op runner

    print(f'\n(spconv) probe, 6x6 grid, all sites active, {torch.get_num_threads()} threads: {_probe(spconv)}')

    print(f'\n(spconv) 3x3 convs, batch 1, fp32, {torch.get_num_threads()} threads: wall time / dense conv; spconv '
          f'{spconv_version} SubMConv3d (1, 3, 3) on a depth-1 grid (stopped inputs read as zero) vs ours (stored '
          f'values)')
    hdr = (f'{"model":5} {"C":>4} {"HxW":>8} {"act%":>5} {"dense ms":>9} {"ours":>6} {"op":>6} {"spconv":>7} '
           f'{"ours/sp":>7} {"max|diff|":>9}')
    print(hdr)
    print('-' * len(hdr))
    rows = []
    for model, c, h, w in branch_shapes(args.models, tuple(args.input_size)):
        g = torch.Generator().manual_seed(c)
        x = torch.randn(1, c, h, w, generator=g)
        weight = torch.randn(c, c, 3, 3, generator=g) / math.sqrt(9 * c)
        bias = torch.randn(c, generator=g)
        x_cl = x.contiguous(memory_format=torch.channels_last)
        for stopped in args.stopped:
            active = 1.0 - stopped / 100.0
            if active >= 1.0 or active <= 0.0:
                continue
            mask = blob_mask(1, h, w, active, seed=c + int(stopped))
            # parity on zeroed stopped inputs (spconv's semantics)
            x0 = x * mask[:, None]
            buf = ops.to_padded_nhwc(x0.contiguous(memory_format=torch.channels_last))
            out_buf = ops.new_padded_buffer(1, c, h, w)
            conv = ops.PackedConv.from_weight(weight, bias)
            idx = ops.SparseIndex.build(mask)
            sp_run = _spconv_runner(spconv, x0, weight, bias, mask)
            ours_rows = conv.rows(buf, idx, dense_threshold=float('inf'))
            diff = float((ours_rows - sp_run()).abs().max())
            valid = diff <= 1e-3 * max(1.0, float(ours_rows.abs().max()))
            fns: Dict[str, Callable[[], object]] = {
                'dense_nchw': lambda: F.conv2d(x, weight, bias, 1, 1),
                'dense_cl': lambda: F.conv2d(x_cl, weight, bias, 1, 1),
                'ours': lambda: conv.apply(buf, idx, out_buf),
                'op': _op_runners(x, weight, bias, mask)['op'],
                'spconv': sp_run,
            }
            t, _ = timed_quiet(fns, args.repeats, args.timer, args.max_foreign, args.retries, args.retry_wait)
            d = min(t['dense_nchw'], t['dense_cl'])
            row = dict(
                section='spconv',
                model=model,
                channels=c,
                height=h,
                width=w,
                stopped_pct=stopped,
                active_frac=float(mask.float().mean()),
                dense_ms=d,
                ours_ratio=t['ours'] / d,
                op_ratio=t['op'] / d,
                spconv_ratio=t['spconv'] / d,
                max_abs_diff=diff,
                spconv_valid=valid)
            rows.append(row)
            print(
                f'{model:5} {c:4d} {h:>3}x{w:<4} {100 * row["active_frac"]:5.1f} {d:9.3f} {row["ours_ratio"]:6.3f} '
                f'{row["op_ratio"]:6.3f} {row["spconv_ratio"]:7.3f} {t["ours"] / t["spconv"]:7.2f} {diff:9.2e}'
                f'{"" if valid else "  spconv WRONG: its time does not count"}',
                flush=True)
    if rows and not all(r['spconv_valid'] for r in rows):
        hint = ' (its CPU conv is correct with --threads 1 only)' if torch.get_num_threads() > 1 else ''
        print('spconv gave wrong results on some rows (with zeroed stopped inputs both compute the same conv); those '
              f'rows compare nothing{hint}')
    return rows
