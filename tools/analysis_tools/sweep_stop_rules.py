"""Stop rules compared at matched cost: threshold sweeps of whole rule families in one pass over the test set.

With features that stay dense (``feature_mask='none'``, the papers' convention) every exit's logits are the same
whatever the stop rule, so the tool computes them once per image (``exit_mode='dense'``) and then, for every setting
of every family, builds the stop masks post hoc exactly as ``EarlyExitEncoderDecoder.forward_exits`` does
(cumulative masks on the exits' 1/4-resolution logits, copy aggregation, the model's own ``_stop_mask_with``),
accumulates a confusion matrix at the label size (the logits resized and restored as ``predict`` does) and counts the
masked MACs with :class:`~mmseg_cbt.analysis.EarlyExitFlopCounter`. The numbers equal those of separate runs per
setting (``tests/test_analysis/test_sweep.py``). Sparse or simulated features change the later exits'
logits: for those, run ``miou_vs_gflops.py`` (one pass per setting).

Example (the toy-city report in ``docs/stop_rules.md``)::

    python tools/analysis_tools/sweep_stop_rules.py CONFIG CKPT --out-dir work_dirs/stop_rules \
        --sweep adpc:0.5:0.999:20:log1m cbt-alpha:0.5:0.99:20@beta=0.998 entropy:0.005:0.5:20:log \
        precision:0.8:0.999:20:log1m@alpha=0.5,beta=0.999

Family syntax: ``FAMILY:VALUES[@KEY=V,KEY=V...]``; ``VALUES`` is ``START:STOP:NUM[:SPACING]`` (``NUM`` values from
``START`` to ``STOP``, both included; ``SPACING`` ``lin`` (default), ``log`` (geometric) or ``log1m`` (geometric in
``1 - v``: dense near 1, where confidence thresholds matter)), a list ``V1,V2,...`` or one value. Families (the
swept value first):

* ``adpc`` (alias ``global``): ADP-C, one threshold ``t`` in [0, 1] on the max softmax.
* ``entropy``: normalised entropy threshold ``t`` in [0, 1] (a pixel stops below it).
* ``cbt-alpha`` / ``cbt-beta`` (``@beta=0.998`` / ``@alpha=0.9``): CBT thresholds mapped into ``[alpha, beta]``
  (``0 < alpha <= beta <= 1``), re-mapped from the checkpoint's stored class statistics, no data pass;
  ``cbtns-alpha`` / ``cbtns-beta``: the same without sharing between exits (CBT-ns).
* ``precision`` (alias ``cbt-precision``, ``@alpha=0.5,beta=0.999``): precision-targeted class thresholds
  (:mod:`mmseg_cbt.calibration.precision`), value = the target precision in (0, 1], thresholds clipped into
  ``[alpha, beta]`` with ``0.5 <= alpha <= beta <= 1``; needs a pass over the training split (``--train-images``)
  or the histograms of an earlier run (``--precision-stats``).
* ``dtop`` (``@topk=5``): DToP's threshold ``t`` in [0, 1] with top-k retention per predicted class.

Every value is range-checked when the arguments are parsed, before any work. Outputs (one set, replaced together):
``<name>.txt`` (tables), ``.json``, ``.csv`` and ``.png`` (final-exit mIoU against mean GFLOPs per image, one curve
per family, points labelled by their value, the dense model as a star). GFLOPs: conv/linear multiply-adds / 2^30
(papers' units; 1e9 in JSON/CSV), per-image mean at the padded input size. mIoU from int64 confusion matrices summed
over the images (mmseg sums float32 areas, the same up to 2^24 pixels per class).
"""
import argparse
import copy
import csv
import json
import os.path as osp
import sys
import time
from typing import Callable, Dict, List, Optional

import torch
from mmengine.config import Config, DictAction

sys.path.insert(0, osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__)))))
from mmseg_cbt.analysis.frontier import frontier, matched_cost  # noqa: E402
from mmseg_cbt.analysis.sweep import SweepEvaluator, resolve_thresholds  # noqa: E402
from mmseg_cbt.analysis.sweep_spec import FAMILIES, Family, Setting, _number, parse_family  # noqa: E402

__all__ = ['gather_precision_stats', 'tables', 'plot', 'write_csv', 'parse_args', 'main']


def gather_precision_stats(model, dataloader, num_bins: int, max_batches=None, progress: bool = True):
    """Precision histograms over the calibration data, in the calibration's own pass
    (:func:`~mmseg_cbt.calibration.gather.gather_exit_stats`: dense exit logits restored to the label size).

    Returns:
        PrecisionStats: The (all-reduced) histograms.
    """
    from mmseg_cbt.calibration import PrecisionStats
    from mmseg_cbt.calibration.gather import gather_exit_stats
    ignore_index = getattr(model.decode_head, 'ignore_index', 255)
    stats = PrecisionStats(model.num_exits, model.num_classes, num_bins, ignore_index)
    gather_exit_stats(model, dataloader, [stats], max_batches, progress=progress)
    return stats


def _fmt(value: Optional[float], oor: str, digits: int, bound: Optional[float] = None) -> str:
    if value is not None:
        return f'{value:.{digits}f}'
    return {'below': '<', 'above': '>'}[oor] + ('' if bound is None else f'{bound:.{digits}f}')


def tables(report: dict) -> str:
    """The text report: one table per family (final exit), then the matched-cost table."""
    lines = []
    dense = report['dense']
    lines.append(f'dense: mIoU {dense["mIoU"]:.2f}  GFLOPs {dense["gflops_2_30"]:.4f}')
    by_family: Dict[str, List[dict]] = {}
    for r in report['rows']:
        by_family.setdefault(r['family_text'], []).append(r)
    for text, rows in by_family.items():
        lines += [
            '', f'== {rows[0]["family_title"]}   [--sweep {text}]',
            f'{"setting":<40s} | mIoU  | GFLOPs (2^30) | saved % | frontier'
        ]
        for r in sorted(rows, key=lambda r: r['gflops_2_30']):
            saved = 100 * (1 - r['gflops_2_30'] / dense['gflops_2_30'])
            lines.append(f'{r["setting"]:<40s} | {r["mIoU"]:5.2f} | {r["gflops_2_30"]:13.4f} | {saved:7.1f} | '
                         f'{"*" if r["on_frontier"] else ""}')
    m = report['matched']
    if m['reference']:
        head = ['rule (frontier)'] + [f'mIoU @ {x["gflops_2_30"]:.3f} GF (ADP-C {x["t"]:g})' for x in m['reference']]
        base = m['reference'][0]
        head += [f'GF @ mIoU {base["mIoU"] - d:.2f} (ADP-C {base["t"]:g} - {d:g})' for d in m['drops']]
        body = []
        for f in m['families']:
            body.append([f['title']] + [_fmt(x['value'], x['out_of_range'], 2) for x in f['miou_at_gflops']] +
                        [_fmt(x['value'], x['out_of_range'], 3) for x in f['gflops_at_miou']])
        widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)]
        lines += [
            '', 'matched cost (linear interpolation on each family\'s frontier; < / > = outside its range)',
            ' | '.join(h.ljust(w) for h, w in zip(head, widths)), '-+-'.join('-' * w for w in widths)
        ]
        lines += [' | '.join(c.ljust(w) for c, w in zip(b, widths)) for b in body]
    lines += ['', report['note']]
    return '\n'.join(lines)


def plot(report: dict, path: str) -> None:
    """Final-exit mIoU against mean GFLOPs: one curve per family, points labelled by their value, dense as a star."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(9, 6), dpi=130)
    markers = 'osD^v<>PX'
    by_family: Dict[str, List[dict]] = {}
    for r in report['rows']:
        by_family.setdefault(r['family_text'], []).append(r)
    for i, rows in enumerate(by_family.values()):
        rows = sorted(rows, key=lambda r: r['gflops_2_30'])
        xs, ys = [r['gflops_2_30'] for r in rows], [r['mIoU'] for r in rows]
        (line, ) = ax.plot(
            xs, ys, marker=markers[i % len(markers)], markersize=4, linewidth=1.2, label=rows[0]['family_title'])
        for j, r in enumerate(rows):
            ax.annotate(
                f'{r["value"]:g}', (r['gflops_2_30'], r['mIoU']),
                textcoords='offset points',
                xytext=(3, 4 if j % 2 else -9),
                fontsize=5.5,
                color=line.get_color())
    d = report['dense']
    ax.plot([d['gflops_2_30']], [d['mIoU']],
            marker='*',
            markersize=13,
            color='black',
            linestyle='none',
            label='dense (no stop)')
    shape = report['input_shape']
    ax.set_xlabel(f'GFLOPs per image (2^30 MACs, conv+linear, {shape[0]}x{shape[1]}), mean over '
                  f'{report["num_images"]} images')
    ax.set_ylabel('final-exit mIoU (%)')
    ax.set_title('Stop rules at matched cost (feature_mask=none; labels = swept value)')
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc='lower right')
    fig.tight_layout()
    fig.savefig(path, format='png')
    plt.close(fig)


def write_csv(report: dict, path: str) -> None:
    with open(path, 'w', newline='') as f:
        w = csv.writer(f)
        w.writerow(['family', 'setting', 'value', 'exit', 'mIoU', 'aAcc', 'gflops_2_30', 'gflops_1e9', 'on_frontier'])
        for r in [dict(report['dense'], family_text='dense', setting='dense', value='', on_frontier='')] + \
                report['rows']:
            for e in r['exits']:
                miou = f'{e["mIoU"]:.4f}' if 'mIoU' in e else ''
                aacc = f'{e["aAcc"]:.4f}' if 'aAcc' in e else ''
                w.writerow([
                    r['family_text'], r['setting'], r['value'], e['exit'], miou, aacc, f'{e["gflops_2_30"]:.6f}',
                    f'{e["gflops_1e9"]:.6f}', r['on_frontier']
                ])


def _write_text(path: str, text: str) -> None:
    with open(path, 'w') as f:
        f.write(text + '\n')


# ---------------------------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------------------------
def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f'{text!r} is not an integer >= 1')
    return value


def _bins(text: str) -> int:
    value = _positive_int(text)
    if value < 2 or value & (value - 1):
        raise argparse.ArgumentTypeError(f'{text!r} is not a power of two >= 2 (bin edges exact in float32)')
    return value


def _unit(text: str) -> float:
    value = _number(text, 'value')
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f'{text!r} is outside [0, 1]')
    return value


def _non_negative(text: str) -> float:
    value = _number(text, 'value')
    if value < 0:
        raise argparse.ArgumentTypeError(f'{text!r} is negative')
    return value


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description='Sweeps of stop-rule families in one dense pass: final-exit mIoU vs GFLOPs frontiers and a '
        'matched-cost table',
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__[__doc__.index('Family syntax'):__doc__.index('Every value')])
    p.add_argument('config')
    p.add_argument('checkpoint')
    p.add_argument(
        '--sweep',
        nargs='+',
        type=parse_family,
        required=True,
        metavar='FAMILY',
        help='FAMILY:VALUES[@KEY=V,...], see below')
    p.add_argument('--out-dir', default=None, help='output folder (default: stop_rule_sweep/ next to the checkpoint)')
    p.add_argument('--name', default='stop_rule_sweep', help='file stem of the outputs')
    p.add_argument('--max-images', type=_positive_int, default=None, help='evaluate on the first N test images')
    p.add_argument('--all-exits', action='store_true', help='also the mIoU of every earlier exit (N x the work)')
    p.add_argument(
        '--match-adpc',
        nargs='+',
        type=_unit,
        default=[0.998, 0.95, 0.9],
        metavar='T',
        help='ADP-C settings whose GFLOPs (and the first one\'s mIoU) the matched-cost table uses; added to '
        'the adpc family (default: 0.998 0.95 0.9)')
    p.add_argument(
        '--match-miou-drop',
        nargs='+',
        type=_non_negative,
        default=[0.5, 1.0],
        metavar='D',
        help='GFLOPs at the mIoU of the first --match-adpc setting minus D (default: 0.5 1.0)')
    p.add_argument(
        '--train-images',
        type=_positive_int,
        default=None,
        help='precision families: bound on the training images (batches of 1) of the histogram pass')
    p.add_argument(
        '--precision-bins',
        type=_bins,
        default=None,
        help='precision families: confidence bins, a power of two (default 4096)')
    p.add_argument(
        '--precision-stats',
        default=None,
        help='precision families: histograms saved by an earlier run (<name>_precision_stats.pth) instead '
        'of a training pass')
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--cfg-options', nargs='+', action=DictAction)
    args = p.parse_args(argv)
    if args.precision_stats is not None and not osp.isfile(args.precision_stats):
        p.error(f'--precision-stats: no such file {args.precision_stats!r}')
    if args.precision_stats is not None and args.precision_bins is not None:
        p.error('--precision-bins and --precision-stats exclude each other (the file fixes the bins)')
    return args


def _ignore_index(cfg) -> int:
    evaluator = cfg.get('test_evaluator', {})
    metrics = evaluator if isinstance(evaluator, (list, tuple)) else [evaluator]
    for m in metrics:
        if 'IoU' in str(m.get('type', '')):
            return int(m.get('ignore_index', 255))
    return 255


def main(argv=None) -> dict:
    args = parse_args(argv)
    from mmengine.runner import Runner
    from mmengine.utils import ProgressBar

    from mmseg.registry import MODELS
    from mmseg.utils import register_all_modules

    import mmseg_cbt  # noqa: F401
    from mmseg_cbt.calibration.precision import DEFAULT_PRECISION_BINS, PrecisionStats
    from mmseg_cbt.utils.checkpoint import load_checkpoint_strict
    from mmseg_cbt.utils.io import atomic_file_set

    t_start = time.perf_counter()
    families: List[Family] = list(args.sweep)
    adpc = next((f for f in families if f.name == 'adpc'), None)
    if adpc is None:
        adpc = parse_family('adpc:' + ','.join(repr(v) for v in args.match_adpc))
        families.insert(0, adpc)
    else:
        have = {s.value for s in adpc.settings}
        adpc.settings += [parse_family(f'adpc:{v!r}').settings[0] for v in args.match_adpc if v not in have]
    needs_cbt = any(FAMILIES[f.name].rule == 'cbt' for f in families)
    needs_precision = any(FAMILIES[f.name].rule == 'precision' for f in families)

    register_all_modules()
    cfg = Config.fromfile(args.config)
    if args.cfg_options:
        cfg.merge_from_dict(args.cfg_options)
    cfg.model.pretrained = None
    if cfg.model.get('test_cfg', {}).get('mode', 'whole') != 'whole':
        raise ValueError('test_cfg.mode must be "whole": the masks of slide inference are per crop (use '
                         'miou_vs_gflops.py)')
    model = MODELS.build(cfg.model)
    load_checkpoint_strict(model, args.checkpoint, config=args.config, logger=None)
    model.to(args.device).eval()
    if needs_cbt and (not model.is_calibrated or int(model.cbt_class_counts.sum()) == 0):
        raise RuntimeError(f'{args.checkpoint} holds no CBT statistics: train with CBTCalibrationHook or run '
                           'tools/calibrate.py first (or leave out the cbt families)')
    loader = Runner.build_dataloader(copy.deepcopy(cfg.test_dataloader))
    if len(loader.dataset) == 0:
        raise ValueError('the test dataloader is empty')
    class_names = [str(c) for c in loader.dataset.metainfo['classes']]
    if len(class_names) != model.num_classes:
        raise ValueError(f'num_classes mismatch: the test set has {len(class_names)} classes, the model '
                         f'{model.num_classes}')
    out_dir = args.out_dir or osp.join(osp.dirname(osp.abspath(args.checkpoint)), 'stop_rule_sweep')

    precision_stats, time_train = None, 0.0
    if needs_precision:
        t0 = time.perf_counter()
        if args.precision_stats is not None:
            precision_stats = PrecisionStats.from_state_dict(torch.load(args.precision_stats, map_location='cpu'))
            if (precision_stats.num_exits, precision_stats.num_classes) != (model.num_exits, model.num_classes):
                raise ValueError(f'--precision-stats {args.precision_stats}: {precision_stats.num_exits} exits / '
                                 f'K={precision_stats.num_classes}, the model has {model.num_exits} / '
                                 f'{model.num_classes}')
        else:
            from mmseg_cbt.calibration.calibrate import build_calibration_dataloader
            train_loader = build_calibration_dataloader(cfg)
            print(f'precision histograms over the training split '
                  f'({args.train_images or len(train_loader.dataset)} images)')
            precision_stats = gather_precision_stats(model, train_loader, args.precision_bins or DEFAULT_PRECISION_BINS,
                                                     args.train_images)
        time_train = time.perf_counter() - t0
    resolve_thresholds(model, families, precision_stats, class_names)

    dense_setting = Setting('dense', float('nan'), {}, 'dense')
    settings = [dense_setting] + [s for f in families for s in f.settings]
    evaluator = SweepEvaluator(model, settings, _ignore_index(cfg), all_exits=args.all_exits)
    total = len(loader.dataset) if args.max_images is None else min(args.max_images, len(loader.dataset))
    print(f'{len(settings) - 1} settings in {len(families)} families (+ dense) on {total} images, one dense pass each')
    bar = ProgressBar(total)
    t0 = time.perf_counter()
    for data in loader:
        if evaluator.num_images >= total:
            break
        data = model.data_preprocessor(data, False)
        keep = total - evaluator.num_images
        if len(data['data_samples']) > keep:
            data = dict(inputs=data['inputs'][:keep], data_samples=data['data_samples'][:keep])
        evaluator.process(data)
        for _ in data['data_samples']:
            bar.update()
    print()
    time_pass = time.perf_counter() - t0

    summaries = [evaluator.summary(i) for i in range(len(settings))]
    dense = dict(summaries[0]['final'], exits=summaries[0]['exits'])
    rows, index = [], 1
    for fam in families:
        pts = [(summaries[index + j]['final']['gflops_2_30'], summaries[index + j]['final']['mIoU'])
               for j in range(len(fam.settings))]
        front = set(frontier(pts))
        for j, s in enumerate(fam.settings):
            sm = summaries[index + j]
            row = dict(
                family=fam.name,
                family_text=fam.text,
                family_title=fam.title,
                setting=s.label,
                value=s.value,
                params=dict(s.params),
                warnings=s.warnings,
                on_frontier=j in front,
                exits=sm['exits'],
                confusion_final=evaluator.results[index + j].confusion[model.num_exits - 1].tolist(),
                **{k: sm['final'][k]
                   for k in ('mIoU', 'mIoU_2dp', 'aAcc', 'macs', 'gflops_2_30', 'gflops_1e9')})
            if s.thresholds is not None:
                row['thresholds'] = s.thresholds.tolist()
            rows.append(row)
        index += len(fam.settings)
    img_shape = tuple(int(v) for v in evaluator.results[0].flops.input_shapes[0])
    n_img = evaluator.num_images
    timing = dict(
        total_s=time.perf_counter() - t_start,
        pass_s=time_pass,
        forward_s=evaluator.time_forward,
        posthoc_s=evaluator.time_posthoc,
        precision_histograms_s=time_train,
        ms_per_image=1e3 * time_pass / n_img,
        settings=len(settings))
    note = (f'{n_img} test images, feature_mask=none, final exit; GFLOPs = conv/linear multiply-adds / 2^30, per-image '
            f'mean at {img_shape[0]}x{img_shape[1]}; mIoU in % from int64 confusion matrices; '
            f'{len(settings)} settings (dense included) from one dense pass per image: {timing["ms_per_image"]:.0f} '
            f'ms/image ({1e3 * evaluator.time_forward / n_img:.0f} forward, '
            f'{1e3 * evaluator.time_posthoc / n_img:.0f} post hoc) on {args.device}')
    report = dict(
        config=args.config,
        checkpoint=args.checkpoint,
        sweep=[f.text for f in families],
        num_images=n_img,
        input_shape=list(img_shape),
        feature_mask='none',
        fill=model.test_cfg.get('fill', 'copy'),
        classes=class_names,
        dense=dense,
        rows=rows,
        timing=timing,
        note=note,
        precision_bins=None if precision_stats is None else precision_stats.num_bins,
        precision_train_pixels=None if precision_stats is None else precision_stats.num_pixels)
    report['matched'] = matched_cost(rows, args.match_adpc, args.match_miou_drop)
    text = tables(report)
    print('\n' + text)

    writers: Dict[str, Callable[[str], None]] = {
        f'{args.name}.json': lambda p: _write_text(p, json.dumps(report, indent=1)),
        f'{args.name}.csv': lambda p: write_csv(report, p),
        f'{args.name}.txt': lambda p: _write_text(p, text),
        f'{args.name}.png': lambda p: plot(report, p),
    }
    if precision_stats is not None and args.precision_stats is None:
        writers[f'{args.name}_precision_stats.pth'] = lambda p: torch.save(precision_stats.state_dict(), p)
    files = [osp.join(out_dir, name) for name in writers]
    with atomic_file_set(files) as tmp:
        for name, write in writers.items():
            write(tmp[osp.join(out_dir, name)])
    print(f'\nwrote {", ".join(files)}')
    return report


if __name__ == '__main__':
    main()
