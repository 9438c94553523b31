"""Calibrates CBT thresholds of a trained early-exit model and writes a NEW checkpoint (never the input).

Examples:
    # gather statistics on the training split (test pipeline) and map into [0.99, 0.998]
    python tools/calibrate.py CONFIG CKPT --alpha 0.99 --beta 0.998 --out work_dirs/cbt.pth
    # re-map the statistics stored in an already calibrated checkpoint into another range, no data needed
    python tools/calibrate.py CONFIG CKPT_CALIBRATED --alpha 0.9 --beta 0.998 --from-stats
    # CBT-ns: one threshold vector per exit
    python tools/calibrate.py CONFIG CKPT --alpha 0.99 --beta 0.998 --no-share
"""
import argparse
import os.path as osp
import sys

import torch
from mmengine.config import Config, DictAction

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description='CBT calibration of an early-exit segmentor checkpoint')
    p.add_argument('config', help='model/data config')
    p.add_argument('checkpoint', help='trained checkpoint (read only)')
    p.add_argument('--alpha', type=float, required=True, help='threshold of the easiest class')
    p.add_argument('--beta', type=float, required=True, help='threshold of the hardest class')
    p.add_argument('--no-share', action='store_true', help='CBT-ns: thresholds per exit instead of shared')
    p.add_argument('--out', help='output checkpoint (default: <checkpoint>_cbt-a<alpha>-b<beta>[-ns].pth)')
    p.add_argument('--from-stats', action='store_true',
                   help='re-map the statistics stored in the checkpoint (no data pass)')
    p.add_argument('--max-batches', type=int, default=None, help='bound on calibration batches')
    p.add_argument('--no-plot', action='store_true', help='do not write the thresholds bar chart')
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--cfg-options', nargs='+', action=DictAction, help='override config settings (key=value)')
    return p.parse_args(argv)


def main(argv=None) -> str:
    args = parse_args(argv)
    from mmengine.runner import load_checkpoint
    from mmseg.registry import MODELS
    from mmseg.utils import register_all_modules

    import mmseg_cbt  # noqa: F401  (registers the modules)
    from mmseg_cbt.calibration.calibrate import (apply_calibration, build_calibration_dataloader,
                                                 calibration_report, gather_class_prob_stats)
    from mmseg_cbt.utils.io import atomic_path, write_json_atomic
    from mmseg_cbt.calibration.thresholds import _check_alpha_beta

    _check_alpha_beta(args.alpha, args.beta)  # fail before any work
    share = not args.no_share
    tag = f'_cbt-a{args.alpha:g}-b{args.beta:g}' + ('' if share else '-ns')
    out = args.out or osp.splitext(args.checkpoint)[0] + tag + '.pth'
    if osp.abspath(out) == osp.abspath(args.checkpoint):
        raise ValueError(f'--out must differ from the input checkpoint ({args.checkpoint}): it is never overwritten')
    if not osp.isfile(args.checkpoint):
        raise FileNotFoundError(f'checkpoint not found: {args.checkpoint}')

    register_all_modules()
    cfg = Config.fromfile(args.config)
    if args.cfg_options:
        cfg.merge_from_dict(args.cfg_options)
    model = MODELS.build(cfg.model)
    ckpt = load_checkpoint(model, args.checkpoint, map_location='cpu', strict=False)
    model.to(args.device).eval()
    class_names = list(ckpt.get('meta', {}).get('dataset_meta', {}).get('classes', []) or [])

    if args.from_stats:
        if not model.is_calibrated or int(model.cbt_class_counts.sum()) == 0:
            raise RuntimeError(f'{args.checkpoint} holds no calibration statistics: run without --from-stats '
                               'to gather them from data first')
        mean_probs, counts = model.cbt_class_mean_probs.cpu(), model.cbt_class_counts.cpu()
    else:
        loader = build_calibration_dataloader(cfg)
        if not class_names:
            class_names = list(loader.dataset.metainfo.get('classes', []))
        stats = gather_class_prob_stats(model, loader, args.max_batches)
        mean_probs, counts = stats.class_mean_probs(), stats.counts
    if len(class_names) != model.num_classes:
        class_names = [str(k) for k in range(model.num_classes)]
    thr = apply_calibration(model, mean_probs, counts, args.alpha, args.beta, share, class_names)

    new_ckpt = dict(ckpt)
    new_ckpt['state_dict'] = {k: v.cpu() for k, v in model.state_dict().items()}
    new_ckpt.setdefault('meta', {})
    new_ckpt['meta'] = dict(new_ckpt['meta'], cbt=dict(alpha=args.alpha, beta=args.beta, share_exits=share,
                                                       source=osp.abspath(args.checkpoint)))
    with atomic_path(out) as tmp:  # the input is never touched, the output never half-written
        torch.save(new_ckpt, tmp)
    report = calibration_report(thr, mean_probs, counts, args.alpha, args.beta, class_names)
    base = osp.splitext(out)[0]
    write_json_atomic(report, base + '_calibration.json')
    print(f'{report["method"]} thresholds in [{args.alpha}, {args.beta}], easy -> hard:')
    thr_of = {c['name']: c['threshold'] for c in report['classes']}
    for name in report['class_order_easy_to_hard']:
        t = thr_of[name]
        print(f'  {name:>14s}  ' + (f'{t:.4f}' if isinstance(t, float) else ' '.join(f'{x:.4f}' for x in t)))
    if not args.no_plot:
        from mmseg_cbt.calibration.visualization import plot_thresholds
        plot_thresholds(thr, class_names, base + '_thresholds.png', args.alpha, args.beta)
        print(f'thresholds chart: {base}_thresholds.png')
    print(f'calibrated checkpoint: {out}\nstatistics and thresholds: {base}_calibration.json')
    return out


if __name__ == '__main__':
    main()
