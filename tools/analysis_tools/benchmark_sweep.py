"""Wall time of a one-pass stop-rule sweep against a single setting, side by side in one process::

    python tools/analysis_tools/benchmark_sweep.py CONFIG CKPT [--sweep adpc:0.5:0.999:20:log1m] [--single adpc:0.9]
        [--max-images 20] [--rounds 3]

The model is built once and the first ``--max-images`` test images are preprocessed once; then, for every round,
the single-setting evaluator and the sweep evaluator (both with the dense setting, as ``sweep_stop_rules.py`` runs
them) process each image back to back, in alternating order; each side's time is the mean over images of each
image's best round, reported with their ratio (separate processes started minutes apart differ by more than the
effect on these shared VMs).
"""
import argparse
import copy
import os.path as osp
import sys
import time
from typing import List, Optional

sys.path.insert(0, osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__)))))
from mmseg_cbt.utils.cli import positive_int  # noqa: E402


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    from mmseg_cbt.analysis.sweep_spec import parse_family
    p = argparse.ArgumentParser(description='one-pass sweep vs one setting, side by side')
    p.add_argument('config')
    p.add_argument('checkpoint')
    p.add_argument('--sweep', type=parse_family, default='adpc:0.5:0.999:20:log1m', help='the swept family')
    p.add_argument('--single', type=parse_family, default='adpc:0.9', help='the single setting (one value)')
    p.add_argument('--max-images', type=positive_int, default=20)
    p.add_argument('--rounds', type=positive_int, default=3)
    args = p.parse_args(argv)
    if len(args.single.settings) != 1:
        p.error(f'argument --single: one setting expected, got {len(args.single.settings)}')
    for name in ('config', 'checkpoint'):
        if not osp.isfile(getattr(args, name)):
            p.error(f'argument {name}: no such file {getattr(args, name)}')
    return args


def main(argv: Optional[List[str]] = None) -> dict:
    args = parse_args(argv)
    import torch
    from mmengine.runner import Runner

    from mmseg_cbt.analysis.sweep import SweepEvaluator, resolve_thresholds
    from mmseg_cbt.analysis.sweep_spec import Setting
    from mmseg_cbt.utils.checkpoint import build_segmentor_strict
    cfg, model = build_segmentor_strict(args.config, args.checkpoint)
    resolve_thresholds(model, [args.sweep, args.single])
    loader = Runner.build_dataloader(copy.deepcopy(cfg.test_dataloader))
    batches = []
    for data in loader:
        if len(batches) >= args.max_images:
            break
        batches.append(model.data_preprocessor(data, False))
    dense = Setting('dense', float('nan'), {}, 'dense')
    runs = {'single': [dense] + args.single.settings, 'sweep': [dense] + args.sweep.settings}
    # per image, the two evaluators back to back (order alternating), each image's best over the rounds: a burst
    # of foreign load on these shared VMs then costs one image of one round, not a whole round of one side
    per_image = {k: [float('inf')] * len(batches) for k in runs}
    with torch.no_grad():
        for r in range(args.rounds + 1):
            evaluators = {name: SweepEvaluator(model, settings) for name, settings in runs.items()}
            for i, data in enumerate(batches):
                for name in (list(runs) if (r + i) % 2 == 0 else list(runs)[::-1]):
                    t0 = time.perf_counter()
                    evaluators[name].process(data)
                    dt = (time.perf_counter() - t0) * 1e3
                    if r > 0:  # round 0 warms up (allocator, plans, kernels)
                        per_image[name][i] = min(per_image[name][i], dt)
    best = {k: sum(v) / len(v) for k, v in per_image.items()}
    ratio = best['sweep'] / best['single']
    print(f"{len(batches)} images, per-image best of {args.rounds} alternating rounds, "
          f"{torch.get_num_threads()} threads: 1 setting {best['single']:.1f} ms/image, "
          f"{len(args.sweep.settings)} settings {best['sweep']:.1f} ms/image (both + dense): ratio {ratio:.2f}")
    return dict(best, ratio=ratio)


if __name__ == '__main__':
    main()
