"""Wall time of a one-pass stop-rule sweep against a single setting, side by side in one process::

    python tools/analysis_tools/benchmark_sweep.py CONFIG CKPT [--sweep adpc:0.5:0.999:20:log1m] [--single adpc:0.9]
        [--max-images 20] [--rounds 3]

The model is built once and the first ``--max-images`` test images are preprocessed once; then, for every round,
the single-setting evaluator and the sweep evaluator (both with the dense setting, as ``sweep_stop_rules.py`` runs
them) each process all images, alternating, and the best round of each is reported with their ratio (separate
processes started minutes apart differ by more than the effect on these shared VMs).
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
    best = {k: float('inf') for k in runs}
    with torch.no_grad():
        for r in range(args.rounds + 1):
            for name, settings in runs.items():
                evaluator = SweepEvaluator(model, settings)
                t0 = time.perf_counter()
                for data in batches:
                    evaluator.process(data)
                dt = (time.perf_counter() - t0) / len(batches) * 1e3
                if r > 0:  # round 0 warms up (allocator, plans, kernels)
                    best[name] = min(best[name], dt)
    ratio = best['sweep'] / best['single']
    print(f"{len(batches)} images, best of {args.rounds} alternating rounds, {torch.get_num_threads()} threads: "
          f"1 setting {best['single']:.1f} ms/image, {len(args.sweep.settings)} settings {best['sweep']:.1f} "
          f"ms/image (both + dense): ratio {ratio:.2f}")
    return dict(best, ratio=ratio)


if __name__ == '__main__':
    main()
