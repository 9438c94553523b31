"""E2CM versus trained exits on the toy-city data, on the same trained dense model (a small-budget study).

1. trains the plain tiny HRNet FCN (``configs/e2cm/fcn_hr-tiny_1xb4-1k_toycity-256x512.py``) for ``--iters``;
2. (a) E2CM: ``tools/e2cm.py`` on its checkpoint (no training, one pass over the training split);
3. (b) RH exits trained for ``--iters`` iterations on top of it (backbone and final exit frozen, default init);
4. (c) RH exits with class-aware initialisation (alpha ``--alpha``) after each of ``--ca-iters`` iterations (same
   freezing; 0 = the initialisation alone);
5. every model is CBT-calibrated on the training split into [0.9, 0.998] and evaluated on the validation split with
   ``tools/analysis_tools/miou_vs_gflops.py`` (dense, ADP-C's global threshold 0.998, CBT [0.9, 0.998]).

Writes ``<out>/e2cm_comparison.{json,md,png}`` (the set together) and the work dirs of every run. Wall times are
measured on this machine and include everything a user runs to build each variant (training or the E2CM pass).

Example:
    python tools/misc/e2cm_comparison.py --out work_dirs/e2cm_comparison --iters 300 --ca-iters 0 50 200
"""
import argparse
import copy
import os
import os.path as osp
import sys
import time

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
sys.path.insert(0, ROOT)
sys.path.insert(0, osp.join(ROOT, 'tools', 'dataset_converters'))
from mmseg_cbt.utils.cli import positive_int  # noqa: E402

PLAIN = osp.join(ROOT, 'configs', 'e2cm', 'fcn_hr-tiny_1xb4-1k_toycity-256x512.py')
FT = osp.join(ROOT, 'configs', 'e2cm', 'ee-fcn_hr-tiny_1xb4-200i-classaware-ft_toycity-256x512.py')


def _tool(rel_path: str):
    import importlib.util
    spec = importlib.util.spec_from_file_location('tool_' + osp.basename(rel_path)[:-3], osp.join(ROOT, rel_path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _shrink(cfg, data_root, work_dir, iters, size):
    cfg = copy.deepcopy(cfg)
    cfg.work_dir = work_dir
    for loader in (cfg.train_dataloader, cfg.val_dataloader, cfg.test_dataloader):
        loader.dataset.data_root = data_root
        loader.num_workers = 0
        loader.persistent_workers = False
    h, w = size
    cfg.train_dataloader.dataset.pipeline[2].scale = (w, h)
    cfg.train_dataloader.dataset.pipeline[3].crop_size = (h, h)
    for loader in (cfg.val_dataloader, cfg.test_dataloader):
        loader.dataset.pipeline[1].scale = (w, h)
    cfg.model.data_preprocessor.size = (h, h)
    cfg.train_cfg.max_iters = max(iters, 1)
    cfg.train_cfg.val_interval = 10**9  # evaluated afterwards, all variants the same way
    cfg.default_hooks.checkpoint.interval = max(iters, 1)
    cfg.default_hooks.checkpoint.max_keep_ckpts = 10
    cfg.default_hooks.logger.interval = 50
    cfg.visualizer.vis_backends = [dict(type='LocalVisBackend')]
    return cfg


def _train(cfg):
    from mmengine.runner import Runner
    start = time.perf_counter()
    Runner.from_cfg(cfg).train()
    return time.perf_counter() - start


def _evaluate(cfg_file, ckpt, out_dir, max_images):
    argv = [
        cfg_file, ckpt, '--out-dir', out_dir, '--settings', 'dense', 'adpc:0.998', 'cbt:0.9,0.998', '--feature-mask',
        'none', '--device', 'cpu'
    ]
    if max_images:
        argv += ['--max-images', str(max_images)]
    return _tool('tools/analysis_tools/miou_vs_gflops.py').main(argv)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--out', required=True)
    p.add_argument('--iters', type=positive_int, default=300, help='iterations of the base model and of (b)')
    p.add_argument('--ca-iters', type=int, nargs='+', default=[0, 50, 200], help='iterations of (c)')
    p.add_argument('--alpha', type=float, default=0.6)
    p.add_argument('--train-images', type=positive_int, default=40)
    p.add_argument('--val-images', type=positive_int, default=10)
    p.add_argument('--size', type=int, nargs=2, default=[128, 256], help='image height and width')
    p.add_argument('--max-images', type=positive_int, default=None)
    args = p.parse_args(argv)
    from mmengine.config import Config

    from mmseg.utils import register_all_modules

    import mmseg_cbt  # noqa: F401
    from mmseg_cbt.utils.io import atomic_file_set, write_json
    register_all_modules(init_default_scope=True)
    out = osp.abspath(args.out)
    data = osp.join(out, 'toy_city')
    if not osp.isdir(data):
        import toy_city_gen
        h, w = args.size
        toy_city_gen.generate_toy_city(
            data, num_train=args.train_images, num_val=args.val_images, height=h, width=w, seed=0, progress=False)
    size = tuple(args.size)
    rows, times = {}, {}

    # the trained dense model
    base_dir = osp.join(out, 'base')
    base_cfg = _shrink(Config.fromfile(PLAIN), data, base_dir, args.iters, size)
    base_ckpt = osp.join(base_dir, f'iter_{args.iters}.pth')
    base_file = osp.join(out, 'base.py')
    base_cfg.dump(base_file)
    times['base'] = _train(base_cfg) if not osp.isfile(base_ckpt) else float('nan')

    # (a) E2CM, then CBT calibration
    e2cm = osp.join(out, 'e2cm', 'e2cm.pth')
    start = time.perf_counter()
    _tool('tools/e2cm.py').main([base_file, base_ckpt, '--out', e2cm, '--no-progress'])
    times['E2CM (tool, all steps)'] = time.perf_counter() - start
    import torch
    times['E2CM (the pass over the training split)'] = float(
        torch.load(e2cm, map_location='cpu', weights_only=False)['meta']['e2cm']['seconds'])
    e2cm_cfg = osp.join(out, 'e2cm', 'e2cm.py')
    cal = osp.join(out, 'e2cm', 'e2cm_cbt.pth')
    _tool('tools/calibrate.py').main([e2cm_cfg, e2cm, '--alpha', '0.9', '--beta', '0.998', '--out', cal, '--no-plot'])
    rows['(a) E2CM, 0 it'] = _evaluate(e2cm_cfg, cal, osp.join(out, 'e2cm', 'eval'), args.max_images)

    # (b) and (c): RH exits on the frozen trained model
    variants = [('(b) RH default init', args.iters, [], [args.iters])]
    ca_hook = dict(type='ClassAwareInitHook', alpha=args.alpha, progress=False)
    ca_max = max(args.ca_iters)
    variants.append((f'(c) RH class-aware a={args.alpha}', max(ca_max, 1), [ca_hook], sorted(set(args.ca_iters))))
    for name, iters, extra, evals in variants:
        work = osp.join(out, 'rh' if not extra else 'rh_ca')
        cfg = _shrink(Config.fromfile(FT), data, work, iters, size)
        cfg.load_from = base_ckpt
        ckpt_iters = [i for i in evals if i > 0]
        every = min(ckpt_iters) if len(ckpt_iters) > 1 else -1  # checkpoints (calibrated) at every evaluated point
        if every > 0:
            cfg.default_hooks.checkpoint.interval = every
        cfg.custom_hooks = [dict(type='EarlyExitFreezeHook', modules=['backbone', 'decode_head'])] + extra + [
            dict(type='CBTCalibrationHook', alpha=0.9, beta=0.998, progress=False, interval=every)
        ]
        cfg_file = osp.join(out, osp.basename(work) + '.py')
        cfg.dump(cfg_file)
        if 0 in evals:  # the initialisation alone: calibrate and evaluate without any iteration
            times[f'{name}, 0 it'] = _zero_iteration(cfg, base_ckpt, osp.join(work, 'iter_0.pth'))
        times[f'{name}, {iters} it'] = _train(cfg)
        for i in evals:
            rows[f'{name}, {i} it'] = _evaluate(cfg_file, osp.join(work, f'iter_{i}.pth'), osp.join(work, f'eval_{i}'),
                                                args.max_images)
    report = dict(
        iters=args.iters,
        ca_iters=args.ca_iters,
        alpha=args.alpha,
        size=list(size),
        train_images=args.train_images,
        val_images=args.val_images,
        build_seconds=times,
        results={
            k: v['rows']
            for k, v in rows.items()
        })
    md = _markdown(report)
    print(md)
    files = [osp.join(out, f'e2cm_comparison.{e}') for e in ('json', 'md', 'png')]
    with atomic_file_set(files) as tmp:
        write_json(report, tmp[files[0]])
        with open(tmp[files[1]], 'w') as f:
            f.write(md)
        _plot(report, tmp[files[2]])
    return report


def _zero_iteration(cfg, base_ckpt, path):
    """The class-aware initialised model without training, calibrated, saved as ``iter_0.pth``."""
    import torch

    from mmseg.registry import MODELS

    from mmseg_cbt.calibration.calibrate import build_calibration_dataloader, calibrate_and_report
    from mmseg_cbt.calibration.class_aware_init import class_aware_init
    from mmseg_cbt.calibration.e2cm import load_plain_weights
    from mmseg_cbt.utils.checkpoint import read_checkpoint
    start = time.perf_counter()
    torch.manual_seed(cfg.get('randomness', {}).get('seed', 0))
    model = MODELS.build(cfg.model)
    model.init_weights()
    load_plain_weights(model, read_checkpoint(base_ckpt)['state_dict'])
    loader = build_calibration_dataloader(cfg)
    hook = next(h for h in cfg.custom_hooks if h['type'] == 'ClassAwareInitHook')
    class_aware_init(model, loader, hook['alpha'], progress=False)
    seconds = time.perf_counter() - start
    calibrate_and_report(model, loader, 0.9, 0.998, progress=False)
    os.makedirs(osp.dirname(path), exist_ok=True)
    torch.save(dict(meta=dict(), state_dict=model.state_dict()), path)
    return seconds


def _markdown(report):
    lines = [
        '| variant | setting | ' + ' | '.join(f'exit {n} mIoU / GFLOPs' for n in range(1, 5)) + ' |',
        '|---|---|' + '---|' * 4
    ]
    for name, rows in report['results'].items():
        for r in rows:
            cells = ' | '.join(f'{e["mIoU"]:.2f} / {e["gflops_2_30"]:.4f}' for e in r['exits'])
            lines.append(f'| {name} | {r["setting"]} | {cells} |')
    lines += ['', '| build step | wall time (s) |', '|---|---|']
    lines += [f'| {k} | {v:.1f} |' for k, v in report['build_seconds'].items()]
    return '\n'.join(lines) + '\n'


def _plot(report, path):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5), sharey=True)
    for ax, setting in zip(axes, ('dense', 'ADP-C 0.998', 'CBT [0.9, 0.998]')):
        for name, rows in report['results'].items():
            row = next((r for r in rows if r['setting'].startswith(setting.split()[0])), None)
            if row is None:
                continue
            ax.plot([e['gflops_2_30'] for e in row['exits']], [e['mIoU'] for e in row['exits']], 'o-', label=name)
        ax.set_title(setting)
        ax.set_xlabel('GFLOPs (2^30 MACs, cumulative, per image)')
        ax.grid(alpha=0.3)
    axes[0].set_ylabel('mIoU (%)')
    axes[-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == '__main__':
    main()
