"""Turns a plain trained mmseg segmentor into an early-exit model with class-mean (E2CM) exits, no training.

The input is a stock mmseg ``EncoderDecoder`` config (HRNet backbone + HRNetV2 ``FCNHead``, e.g. mmseg's own
``fcn_hr18s`` configs) and its checkpoint. The output is a NEW checkpoint and a NEW config (never the inputs),
written together: an ``EarlyExitEncoderDecoder`` whose backbone and final exit hold the original weights (the
final exit predicts exactly what the original model predicts) and whose early exits hold the class means of the
training pixels, gathered in one pass over the training split read with the test pipeline. Then
``tools/calibrate.py``, ``tools/test.py``, ``get_flops.py`` and ``miou_vs_gflops.py`` run on the result.

Examples:
    python tools/e2cm.py configs/e2cm/fcn_hr-tiny_1xb4-1k_toycity-256x512.py work_dirs/plain/iter_1000.pth \
        --out work_dirs/e2cm/e2cm.pth
    # class-mean exits that may stop pixels after stages 2 and 3 only, a fixed temperature
    python tools/e2cm.py CONFIG CKPT --exits 2 3 --temperature 50 --out e2cm.pth --out-config e2cm.py
"""
import argparse
import os.path as osp
import sys
import time

import torch
from mmengine.config import Config, DictAction

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))
from mmseg_cbt.utils.cli import positive_int  # noqa: E402


def temperature_value(text: str):
    """argparse type: ``fit`` or a finite number > 0."""
    if text == 'fit':
        return text
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'{text!r} is neither "fit" nor a number') from None
    if not 0 < value < float('inf'):
        raise argparse.ArgumentTypeError(f'{text!r} is not a finite number > 0')
    return value


def parse_args(argv=None):
    p = argparse.ArgumentParser(description='E2CM: early exits from class means for a plain mmseg segmentor')
    p.add_argument('config', help='the plain mmseg config (EncoderDecoder + HRNet + FCNHead) with its data')
    p.add_argument('checkpoint', help='its trained checkpoint (read only)')
    p.add_argument('--out', required=True, help='the new checkpoint')
    p.add_argument('--out-config', help='the new config (default: --out with .py)')
    p.add_argument(
        '--exits',
        type=int,
        nargs='+',
        default=None,
        help='stages (1-based, before the last) whose exits may stop pixels (default: all); the other early '
        'stages get class-mean exits that only report their map')
    p.add_argument(
        '--temperature',
        type=temperature_value,
        default='fit',
        help='"fit" (default: per exit from the training statistics) or a number > 0')
    p.add_argument('--max-batches', type=positive_int, default=None, help='bound on the batches read (>= 1)')
    p.add_argument('--no-progress', action='store_true', help='no progress bar')
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--cfg-options', nargs='+', action=DictAction, help='override settings of the plain config')
    args = p.parse_args(argv)
    args.out_config = args.out_config or osp.splitext(args.out)[0] + '.py'
    inputs = {osp.abspath(args.config), osp.abspath(args.checkpoint)}
    for opt, path in (('--out', args.out), ('--out-config', args.out_config)):
        if osp.abspath(path) in inputs:
            p.error(f'{opt} must differ from the inputs ({path}): they are never overwritten')
    if osp.abspath(args.out) == osp.abspath(args.out_config):
        p.error('--out and --out-config must be different files')
    if not args.out_config.endswith('.py'):
        p.error(f'--out-config must be a .py file, got {args.out_config}')
    if not osp.isfile(args.config):
        p.error(f'config not found: {args.config}')
    if not osp.isfile(args.checkpoint):
        p.error(f'checkpoint not found: {args.checkpoint}')
    return args


def main(argv=None):
    args = parse_args(argv)
    from mmengine.registry import init_default_scope

    from mmseg.registry import MODELS
    from mmseg.utils import register_all_modules

    import mmseg_cbt  # noqa: F401  (registers the modules)
    from mmseg_cbt.calibration.calibrate import build_calibration_dataloader, check_calibration_data
    from mmseg_cbt.calibration.e2cm import (check_plain_segmentor_cfg, e2cm_config, fit_class_mean_exits,
                                            load_plain_weights)
    from mmseg_cbt.utils.checkpoint import load_checkpoint_strict, read_checkpoint
    from mmseg_cbt.utils.io import atomic_file_set

    register_all_modules(init_default_scope=False)
    cfg = Config.fromfile(args.config)
    if args.cfg_options:
        cfg.merge_from_dict(args.cfg_options)
    init_default_scope(cfg.get('default_scope', 'mmseg'))
    # every check before any work: the config, the checkpoint's kind, its fit to the plain model, the exits, data
    check_plain_segmentor_cfg(cfg.model, where=args.config)
    ckpt = read_checkpoint(args.checkpoint)
    state = ckpt.get('state_dict', ckpt)
    if not any(str(k).startswith('backbone.')
               for k in state) or not any(str(k).startswith('decode_head.') for k in state):
        raise ValueError(f'{args.checkpoint} is not an mmseg segmentor checkpoint: its state dict has no backbone.* '
                         f'and decode_head.* keys (first keys: {list(state)[:3]})')
    cfg.model.pretrained = None
    plain = MODELS.build(cfg.model)
    load_checkpoint_strict(plain, args.checkpoint, config=args.config, logger=None)
    new_cfg = e2cm_config(cfg, args.exits)
    model = MODELS.build(new_cfg.model)
    load_plain_weights(model, plain.state_dict(), source=args.checkpoint)
    del plain
    model.to(args.device).eval()
    loader = build_calibration_dataloader(cfg)
    class_names = check_calibration_data(loader, model)

    start = time.perf_counter()
    fit = fit_class_mean_exits(
        model,
        loader,
        temperature=args.temperature,
        class_names=class_names,
        max_batches=args.max_batches,
        progress=not args.no_progress)
    seconds = time.perf_counter() - start
    record = dict(
        source_config=osp.abspath(args.config),
        source_checkpoint=osp.abspath(args.checkpoint),
        exits=fit['exits'],
        stop_exits=[i + 1 for i, h in enumerate(model.exit_heads) if h.stop_pixels],
        temperatures=fit['temperatures'],
        temperature_mode='fit' if args.temperature == 'fit' else 'set',
        images=len(loader.dataset) if args.max_batches is None else min(len(loader.dataset), args.max_batches),
        seconds=round(seconds, 3))
    meta = dict(ckpt.get('meta') or {})
    meta.setdefault('dataset_meta', dict(classes=tuple(class_names)))
    meta['e2cm'] = record
    new_ckpt = dict(meta=meta, state_dict={k: v.detach().cpu() for k, v in model.state_dict().items()})
    with atomic_file_set([args.out, args.out_config]) as tmp:
        torch.save(new_ckpt, tmp[args.out])
        with open(tmp[args.out_config], 'w', encoding='utf-8') as f:
            f.write(new_cfg.pretty_text)
    print(f'E2CM exits after stages {fit["exits"]} (temperatures {[round(t, 4) for t in fit["temperatures"]]}) '
          f'from {record["images"]} training images in {seconds:.1f} s\ncheckpoint: {args.out}\n'
          f'config: {args.out_config}')
    return args.out, args.out_config


if __name__ == '__main__':
    main()
