"""mIoU versus GFLOPs per exit for several early-exit settings (dense, ADP-C, CBT, CBT-ns) on a config's test set.

Example (the demo's report)::

    python tools/analysis_tools/miou_vs_gflops.py CONFIG CKPT --out-dir work_dirs/report \
        --settings dense adpc:0.998 cbt:0.9,0.998 cbtns:0.9,0.998

Settings: ``dense`` (no pixel stops), ``adpc:T`` (ADP-C, one global threshold T on the max softmax), ``dtop:T,K``
(DToP's rule for plain ViTs: threshold T with the K most confident positions of every predicted class kept; K
defaults to 5), ``cbt:A,B``
(class based thresholds mapped into [A, B]) and ``cbtns:A,B`` (CBT without sharing between exits). CBT settings
re-map the class statistics stored in the checkpoint by ``CBTCalibrationHook`` / ``tools/calibrate.py``, so no
training data is read. GFLOPs are multiply-adds of conv and linear layers, counted at the positions each conv
computes under the masks the model used (the papers' convention), per-image mean, cumulative per exit, printed in
2^30 units (ADP-C / HRNet papers) with 1e9 in the JSON/CSV. Wall time is the measured per-image inference time
of the same setting on this machine.
"""
import argparse
import copy
import csv
import os.path as osp
import sys
import time
from typing import Dict, List, Tuple

import torch
from mmengine.config import Config, DictAction

sys.path.insert(0, osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__)))))
from mmseg_cbt.utils.cli import positive_int  # noqa: E402


def _unit_number(text: str, what: str) -> float:
    """``text`` as a number in [0, 1] (the range of the model's thresholds), else an error naming ``what``."""
    from mmseg_cbt.models.segmentors.options import OPTION_RANGES
    _, lo, hi = OPTION_RANGES['global_threshold']
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'{what}: {text!r} is not a number (expected one in [{lo:g}, {hi:g}])') \
            from None
    if not lo <= value <= hi:  # NaN fails too
        raise argparse.ArgumentTypeError(f'{what}: {text!r} is outside [{lo:g}, {hi:g}]')
    return value


def parse_setting(text: str) -> Tuple[str, str, dict]:
    """``'cbt:0.9,0.998'`` -> (label, exit_mode, params); every value range-checked (an argparse type)."""
    kind, _, arg = text.partition(':')
    kind = kind.lower()
    if kind == 'dense':
        if arg:
            raise argparse.ArgumentTypeError(f'{text!r}: dense takes no value')
        return 'dense', 'dense', {}
    if kind in ('adpc', 'global'):
        t = _unit_number(arg, f'{text!r} (the ADP-C threshold T of {kind}:T)') if arg else 0.998
        return f'ADP-C t={t:g}', 'global', dict(threshold=t)
    if kind in ('cbt', 'cbtns'):
        values = arg.split(',')
        if len(values) != 2:
            raise argparse.ArgumentTypeError(f'{text!r}: expected {kind}:ALPHA,BETA with 0 < ALPHA <= BETA <= 1')
        a, b = (_unit_number(v, f'{text!r} ({name} of {kind}:ALPHA,BETA)') for v, name in zip(values, 'AB'))
        if not 0 < a <= b:
            raise argparse.ArgumentTypeError(f'{text!r}: expected 0 < ALPHA <= BETA <= 1 (ALPHA goes to the easiest '
                                             'class, BETA to the hardest)')
        label = ('CBT' if kind == 'cbt' else 'CBT-ns') + f' [{a:g}, {b:g}]'
        return label, 'cbt', dict(alpha=a, beta=b, share=kind == 'cbt')
    if kind == 'dtop':
        values = arg.split(',') if arg else ['0.9']
        if len(values) > 2:
            raise argparse.ArgumentTypeError(f'{text!r}: expected dtop:T or dtop:T,K (K >= 0 positions kept per class)')
        t = _unit_number(values[0], f'{text!r} (the DToP threshold T of dtop:T,K)')
        try:
            k = int(values[1]) if len(values) == 2 else 5
        except ValueError:
            k = -1
        if k < 0:
            raise argparse.ArgumentTypeError(f'{text!r}: K of dtop:T,K must be an integer >= 0')
        return f'DToP t={t:g} k={k}', 'dtop', dict(threshold=t, topk=k)
    raise argparse.ArgumentTypeError(f'unknown setting {text!r} (dense, adpc:T, dtop:T,K, cbt:A,B, cbtns:A,B)')


def parse_args(argv=None):
    p = argparse.ArgumentParser(description='mIoU vs GFLOPs per exit of an early-exit segmentor')
    p.add_argument('config')
    p.add_argument('checkpoint')
    p.add_argument(
        '--settings',
        nargs='+',
        default=None,
        type=parse_setting,
        help='dense | adpc:T | dtop:T,K | cbt:A,B | cbtns:A,B (default: dense, adpc:beta, cbt:alpha,beta, '
        'cbtns:alpha,beta with the checkpoint\'s calibration range)')
    p.add_argument('--out-dir', default=None, help='where JSON, CSV and PNG go (default: next to the checkpoint)')
    p.add_argument(
        '--feature-mask',
        default=None,
        choices=['none', 'simulate', 'sparse'],
        help='how stopped pixels are treated in the timed pass (default: the config\'s test_cfg)')
    p.add_argument('--max-images', type=positive_int, default=None, help='evaluate on the first N test images')
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument(
        '--optimize',
        action='store_true',
        help='CPU inference settings before timing: mmseg_cbt.utils.tune_malloc() and '
        'optimize_for_inference(model) (BN folded into the convs, channels-last); same predictions')
    p.add_argument('--cfg-options', nargs='+', action=DictAction)
    args = p.parse_args(argv)
    if not osp.isfile(args.config):
        p.error(f'config not found: {args.config}')
    if '://' not in args.checkpoint and not osp.isfile(args.checkpoint):
        p.error(f'checkpoint not found: {args.checkpoint}')
    return args


def evaluate_setting(model, loader, evaluator, max_images=None, feature_mask=None) -> Tuple[Dict[str, float], float]:
    """Runs predict over the loader; returns the metrics and the mean wall time per image (seconds)."""
    from mmengine.utils import ProgressBar
    n_img, t_total = 0, 0.0
    total = len(loader.dataset) if max_images is None else min(max_images, len(loader.dataset))
    bar = ProgressBar(total)
    old_fm = model.test_cfg.get('feature_mask', 'none')
    if feature_mask is not None:
        model.test_cfg.feature_mask = feature_mask
    try:
        with torch.no_grad():
            for data in loader:
                if max_images is not None and n_img >= max_images:
                    break
                t0 = time.perf_counter()
                data = model.data_preprocessor(data, False)
                outputs = model.predict(data['inputs'], data['data_samples'])
                t_total += time.perf_counter() - t0
                evaluator.process(data_samples=outputs, data_batch=data)
                n_img += len(outputs)
                for _ in outputs:
                    bar.update()
    finally:
        model.test_cfg.feature_mask = old_fm
    print()
    return evaluator.evaluate(n_img), t_total / max(n_img, 1)


def main(argv=None) -> dict:
    args = parse_args(argv)
    from mmengine.evaluator import Evaluator
    from mmengine.runner import Runner

    from mmseg.registry import MODELS
    from mmseg.utils import register_all_modules

    import mmseg_cbt  # noqa: F401
    from mmseg_cbt.analysis import average_flops
    from mmseg_cbt.calibration.calibrate import apply_calibration
    from mmseg_cbt.utils.checkpoint import load_checkpoint_strict
    from mmseg_cbt.utils.io import atomic_file_set, write_json

    register_all_modules()
    cfg = Config.fromfile(args.config)
    if args.cfg_options:
        cfg.merge_from_dict(args.cfg_options)
    cfg.model.pretrained = None
    model = MODELS.build(cfg.model)
    load_checkpoint_strict(model, args.checkpoint, config=args.config, logger=None)
    model.to(args.device).eval()
    if args.optimize:
        from mmseg_cbt.utils.inference import optimize_for_inference, tune_malloc
        tune_malloc()
        optimize_for_inference(model)
    calibrated = model.is_calibrated and int(model.cbt_class_counts.sum()) > 0
    alpha, beta = (float(v) for v in model.cbt_range) if calibrated else (0.9, 0.998)
    parsed = args.settings or [
        parse_setting(s) for s in (['dense', f'adpc:{beta}', f'cbt:{alpha},{beta}', f'cbtns:{alpha},{beta}']
                                   if calibrated else ['dense', f'adpc:{beta}'])
    ]
    if any(mode == 'cbt' for _, mode, _ in parsed) and not calibrated:
        raise RuntimeError(f'{args.checkpoint} holds no CBT statistics: train with CBTCalibrationHook or run '
                           'tools/calibrate.py first (or leave out the cbt settings)')
    mean_probs, counts = model.cbt_class_mean_probs.clone(), model.cbt_class_counts.clone()
    loader = Runner.build_dataloader(copy.deepcopy(cfg.test_dataloader))
    if len(loader.dataset) == 0:
        raise ValueError('the test dataloader is empty')
    class_names = list(loader.dataset.metainfo['classes'])
    if len(class_names) != model.num_classes:
        raise ValueError(f'num_classes mismatch: the test dataset of {args.config} has {len(class_names)} classes, '
                         f'the model {model.num_classes}')
    # created only when the results are written: a failed run leaves no empty folder
    out_dir = args.out_dir or osp.join(osp.dirname(osp.abspath(args.checkpoint)), 'miou_vs_gflops')

    rows: List[dict] = []
    for label, mode, params in parsed:
        print(f'\n== {label}')
        model.test_cfg.exit_mode = mode
        if mode == 'global':
            model.test_cfg.global_threshold = params['threshold']
        if mode == 'dtop':
            model.test_cfg.dtop_threshold, model.test_cfg.dtop_topk = params['threshold'], params['topk']
        if mode == 'cbt':
            apply_calibration(model, mean_probs, counts, params['alpha'], params['beta'], params['share'], class_names)
        evaluator = Evaluator(copy.deepcopy(cfg.test_evaluator))
        evaluator.dataset_meta = loader.dataset.metainfo
        metrics, sec_per_img = evaluate_setting(model, loader, evaluator, args.max_images, args.feature_mask)
        # the same masks as the timed pass: feature masking changes later exits' predictions and so their masks
        flops = average_flops(model, loader, feature_mask=args.feature_mask, max_images=args.max_images)
        exits = []
        for n, ef in enumerate(flops.exits, start=1):
            exits.append(
                dict(
                    exit=n, mIoU=float(metrics[f'exit{n}.mIoU']), gflops_2_30=ef.gflops_2_30, gflops_1e9=ef.gflops_1e9))
        rows.append(
            dict(
                setting=label,
                exit_mode=mode,
                params=params,
                sec_per_image=sec_per_img,
                exits=exits,
                feature_mask=args.feature_mask or model.test_cfg.get('feature_mask', 'none')))

    n_exits = len(rows[0]['exits'])
    head = f'{"setting":<22s}' + ''.join(f' | e{n} mIoU  e{n} GFLOPs' for n in range(1, n_exits + 1)) + ' | ms/img'
    lines = [head, '-' * len(head)]
    for r in rows:
        lines.append(f'{r["setting"]:<22s}' + ''.join(f' | {e["mIoU"]:7.2f}  {e["gflops_2_30"]:9.4f}'
                                                      for e in r['exits']) + f' | {1e3 * r["sec_per_image"]:6.1f}')
    table = '\n'.join(lines)
    img_shape = tuple(loader.dataset[0]['inputs'].shape[1:])
    note = (f'GFLOPs: multiply-adds of conv/linear layers / 2^30, cumulative per exit, per-image mean at the test '
            f'pipeline size {img_shape[0]}x{img_shape[1]}; mIoU in %; ms/img measured on {args.device}' +
            (' (tune_malloc + optimize_for_inference)' if args.optimize else ''))
    print('\n' + table + '\n' + note)
    report = dict(config=args.config, checkpoint=args.checkpoint, note=note, optimized=bool(args.optimize), rows=rows)
    names = {ext: osp.join(out_dir, f'miou_vs_gflops.{ext}') for ext in ('json', 'csv', 'txt', 'png')}
    # the four files are replaced as one set, after all of them are complete (an interrupt keeps the old set)
    with atomic_file_set(list(names.values())) as tmp:
        write_json(report, tmp[names['json']])
        with open(tmp[names['csv']], 'w', newline='') as f:
            w = csv.writer(f)
            w.writerow(['setting', 'exit', 'mIoU', 'gflops_2_30', 'gflops_1e9', 'ms_per_image'])
            for r in rows:
                for e in r['exits']:
                    w.writerow([
                        r['setting'], e['exit'], f'{e["mIoU"]:.2f}', f'{e["gflops_2_30"]:.6f}',
                        f'{e["gflops_1e9"]:.6f}', f'{1e3 * r["sec_per_image"]:.2f}'
                    ])
        with open(tmp[names['txt']], 'w') as f:
            f.write(table + '\n' + note + '\n')
        plot(rows, tmp[names['png']], img_shape)
    print(f'\nwrote {out_dir}/miou_vs_gflops.{{json,csv,txt,png}}')
    return report


def plot(rows: List[dict], path: str, img_shape) -> None:
    """mIoU versus cumulative GFLOPs: one curve per setting, one point per exit (CBT paper, Figure 1)."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    markers = 'osD^v<>'
    for i, r in enumerate(rows):
        xs = [e['gflops_2_30'] for e in r['exits']]
        ys = [e['mIoU'] for e in r['exits']]
        ax.plot(xs, ys, marker=markers[i % len(markers)], label=r['setting'])
        for e in r['exits']:
            ax.annotate(
                f'{e["exit"]}', (e['gflops_2_30'], e['mIoU']), textcoords='offset points', xytext=(4, -10), fontsize=7)
    ax.set_xlabel(f'GFLOPs per image (2^30 MACs, conv+linear, {img_shape[0]}x{img_shape[1]})')
    ax.set_ylabel('mIoU (%)')
    ax.set_title('mIoU vs GFLOPs per exit (numbers = exit)')
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, format='png')
    plt.close(fig)


if __name__ == '__main__':
    main()
