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
    from mmseg_cbt.calibration.calibrate import build_calibration_dataloader
    from mmseg_cbt.calibration.e2cm import check_plain_segmentor_cfg, convert_plain_segmentor, save_e2cm
    from mmseg_cbt.utils.checkpoint import load_checkpoint_strict, read_checkpoint

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
    loader = build_calibration_dataloader(cfg)
    model, new_cfg, record = convert_plain_segmentor(
        cfg,
        plain.state_dict(),
        loader,
        args.exits,
        args.temperature,
        args.max_batches,
        progress=not args.no_progress,
        source=args.checkpoint,
        device=args.device)
    del plain
    record.update(source_config=osp.abspath(args.config), source_checkpoint=osp.abspath(args.checkpoint))
    meta = dict(ckpt.get('meta') or {})
    meta.setdefault('dataset_meta', dict(classes=tuple(record['classes'])))
    meta['e2cm'] = record
    save_e2cm(model, new_cfg, meta, args.out, args.out_config)
    print(f'E2CM exits after stages {record["exits"]} (temperatures {[round(t, 4) for t in record["temperatures"]]}) '
          f'from {record["images"]} training images in {record["seconds"]:.1f} s\ncheckpoint: {args.out}\n'
          f'config: {args.out_config}')
    return args.out, args.out_config


if __name__ == '__main__':
    main()
