"""Calibrates CBT thresholds of a trained early-exit model and writes a NEW checkpoint (never the input).

The checkpoint must fit the model built from the config (strict loading; an old checkpoint without the ``cbt_*``
buffers loads as uncalibrated). The new checkpoint, ``<out>_calibration.json`` and ``<out>_thresholds.png`` are
replaced as one set, after all three are complete.

Examples:
    # gather statistics on the training split (test pipeline) and map into [0.99, 0.998]
    python tools/calibrate.py CONFIG CKPT --alpha 0.99 --beta 0.998 --out work_dirs/cbt.pth
    # re-map the statistics stored in an already calibrated checkpoint into another range, no data needed
    python tools/calibrate.py CONFIG CKPT_CALIBRATED --alpha 0.9 --beta 0.998 --from-stats
    # CBT-ns: one threshold vector per exit
    python tools/calibrate.py CONFIG CKPT --alpha 0.99 --beta 0.998 --no-share
    # cbt-precision: per exit and class the lowest threshold whose stopped training pixels are 99 % correct
    python tools/calibrate.py CONFIG CKPT --method cbt-precision --target 0.99 --alpha 0.5 --beta 0.999 --no-share
"""
import argparse
import os.path as osp
import sys

import torch
from mmengine.config import Config, DictAction

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))
from mmseg_cbt.utils.cli import positive_int, threshold_value  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description='CBT calibration of an early-exit segmentor checkpoint')
    p.add_argument('config', help='model/data config')
    p.add_argument('checkpoint', help='trained checkpoint (read only)')
    p.add_argument('--alpha', type=threshold_value, required=True, help='threshold of the easiest class, in (0, 1]')
    p.add_argument('--beta', type=threshold_value, required=True, help='threshold of the hardest class, in [alpha, 1]')
    p.add_argument('--no-share', action='store_true', help='CBT-ns: thresholds per exit instead of shared')
    p.add_argument(
        '--method',
        choices=('cbt', 'cbt-precision'),
        default='cbt',
        help='cbt: min-max map of class margins (default); cbt-precision: lowest threshold whose stopped '
        'training pixels reach --target precision (alpha >= 0.5)')
    p.add_argument(
        '--target',
        type=threshold_value,
        default=None,
        help='cbt-precision: target precision of the stopped pixels, in (0, 1] (default 0.99)')
    p.add_argument('--out', help='output checkpoint (default: <checkpoint>_cbt-a<alpha>-b<beta>[-ns].pth)')
    p.add_argument(
        '--from-stats', action='store_true', help='re-map the statistics stored in the checkpoint (no data pass)')
    p.add_argument('--max-batches', type=positive_int, default=None, help='bound on calibration batches (>= 1)')
    p.add_argument('--no-plot', action='store_true', help='do not write the thresholds bar chart')
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--cfg-options', nargs='+', action=DictAction, help='override config settings (key=value)')
    args = p.parse_args(argv)
    if args.alpha > args.beta:
        p.error(f'--alpha must be <= --beta (alpha goes to the easiest class, beta to the hardest), got '
                f'--alpha {args.alpha} --beta {args.beta}')
    if args.method == 'cbt' and args.target is not None:
        p.error('--target is only used with --method cbt-precision')
    if args.method == 'cbt-precision':
        args.target = 0.99 if args.target is None else args.target
        if args.alpha < 0.5:
            p.error(f'--method cbt-precision needs --alpha >= 0.5 (below, the stop rule can stop a pixel on a '
                    f'class that is not its argmax), got --alpha {args.alpha}')
        if args.from_stats:
            p.error('--method cbt-precision needs a pass over the data (its histograms are not stored): drop '
                    '--from-stats')
    share = not args.no_share
    prefix = '_cbt' if args.method == 'cbt' else f'_prec{args.target:g}'
    tag = f'{prefix}-a{args.alpha:g}-b{args.beta:g}' + ('' if share else '-ns')
    args.out = args.out or osp.splitext(args.checkpoint)[0] + tag + '.pth'
    if osp.abspath(args.out) == osp.abspath(args.checkpoint):
        p.error(f'--out must differ from the input checkpoint ({args.checkpoint}): it is never overwritten')
    if not osp.isfile(args.config):
        p.error(f'config not found: {args.config}')
    if '://' not in args.checkpoint and not osp.isfile(args.checkpoint):
        p.error(f'checkpoint not found: {args.checkpoint}')
    return args


def main(argv=None) -> str:
    args = parse_args(argv)
    from mmseg.registry import MODELS
    from mmseg.utils import register_all_modules

    import mmseg_cbt  # noqa: F401  (registers the modules)
    from mmseg_cbt.calibration.calibrate import build_calibration_dataloader, calibrate_and_report
    from mmseg_cbt.utils.checkpoint import load_checkpoint_strict

    share = not args.no_share
    register_all_modules()
    cfg = Config.fromfile(args.config)
    if args.cfg_options:
        cfg.merge_from_dict(args.cfg_options)
    model = MODELS.build(cfg.model)
    ckpt = load_checkpoint_strict(model, args.checkpoint, config=args.config, logger=None)
    model.to(args.device).eval()
    if args.from_stats and (not model.is_calibrated or int(model.cbt_class_counts.sum()) == 0):
        raise RuntimeError(f'{args.checkpoint} holds no calibration statistics: run without --from-stats '
                           'to gather them from data first')
    class_names = list(ckpt.get('meta', {}).get('dataset_meta', {}).get('classes', []) or []) or None
    # the data is needed to gather statistics, and for the class names when the checkpoint does not carry them
    loader = build_calibration_dataloader(cfg) if not args.from_stats or class_names is None else None

    out = args.out
    base = osp.splitext(out)[0]

    def write_checkpoint(path: str) -> None:
        new_ckpt = dict(ckpt)
        new_ckpt['state_dict'] = {k: v.cpu() for k, v in model.state_dict().items()}
        cbt = dict(
            alpha=args.alpha,
            beta=args.beta,
            share_exits=share,
            source=osp.abspath(args.checkpoint),
            calibration_method=args.method,
            target=args.target)
        new_ckpt['meta'] = dict(ckpt.get('meta', {}), cbt=cbt)
        torch.save(new_ckpt, path)

    calibrate_and_report(
        model,
        loader,
        args.alpha,
        args.beta,
        share,
        class_names,
        args.max_batches,
        from_stats=args.from_stats,
        json_file=base + '_calibration.json',
        plot_file=None if args.no_plot else base + '_thresholds.png',
        extra_report=dict(config=args.config, checkpoint=osp.abspath(args.checkpoint), output=osp.abspath(out)),
        extra_files={out: write_checkpoint},
        logger=None,
        method=args.method,
        target=args.target)
    print(f'calibrated checkpoint: {out}\nstatistics and thresholds: {base}_calibration.json' +
          ('' if args.no_plot else f'\nthresholds chart: {base}_thresholds.png'))
    return out


if __name__ == '__main__':
    main()
