"""Dense GFLOPs (conv + linear multiply-adds) of a segmentor, per exit for early-exit models.

Replaces mmseg 1.2.2's ``tools/analysis_tools/get_flops.py``, which is broken with mmengine >= 0.8 (and drops
heads that are not ``decode_head``). Counting follows :mod:`mmseg_cbt.analysis.flops`: multiply-adds of conv and
linear layers only, one MAC = one FLOP, reported both as MACs / 1e9 (mmengine's "G") and MACs / 2**30 (the
ADP-C / HRNet papers' units). Per-exit numbers are cumulative (everything run up to that exit). For a plain mmseg
segmentor only the total is printed (``decode_head`` in tensor mode; ``auxiliary_head`` does not run at
inference and is not counted).

By default the model runs on PyTorch's ``meta`` device: shapes propagate, no arithmetic is done, so even HRNet-W48
at 1024x2048 takes seconds and little memory; the counts are the same integers as a real run (``--device cpu``).

When the model and shape match a published configuration (early-exit HRNet-W48 with RH exits of width 128, or
plain HRNetV2-W48 + FCN head, at 1024x2048) the published figures are printed beside ours with the relative
difference; ``--reference`` gives other figures (2^30 units).

Examples::

    python tools/analysis_tools/get_flops.py configs/ee_hrnet/ee-fcn_hr48_4xb2-80k_cityscapes-512x1024.py \\
        --shape 1024 2048 --per-exit --json work_dirs/flops_ee_hr48.json
    python tools/analysis_tools/get_flops.py mmseg::hrnet/fcn_hr48_4xb2-80k_cityscapes-512x1024.py \\
        --shape 1024 2048
"""
from __future__ import annotations

import argparse
import math
import os.path as osp
import sys
import time
from typing import Any, Dict, Optional, Sequence

import torch

ROOT = osp.abspath(osp.join(osp.dirname(__file__), '..', '..'))
if ROOT not in sys.path:  # run from a source checkout without installation
    sys.path.insert(0, ROOT)

# Published dense figures, 2^30 units (reference, section 4). Keyed by what :func:`_signature` returns.
PUBLISHED: Dict[str, Dict[str, Any]] = {
    'ee_hrnet_w48_rh128@1024x2048':
    dict(
        source='ADP-C (Liu et al., ICLR 2022), EE+RH HRNet-W48, Cityscapes 2048x1024',
        gflops_2_30=[41.9, 105.6, 368.0, 701.3]),
    'hrnetv2_w48_fcn@1024x2048':
    dict(source='HRNetV2-W48 (as quoted by ADP-C), Cityscapes 2048x1024', gflops_2_30=[696.2]),
}


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Command-line arguments."""
    from mmengine.config import DictAction
    parser = argparse.ArgumentParser(description='Dense GFLOPs (conv+linear MACs) of a segmentor, per exit')
    parser.add_argument('config', help='config file, or "mmseg::<path>" for a config shipped with mmseg')
    parser.add_argument(
        '--shape',
        type=int,
        nargs='+',
        default=[1024, 2048],
        help='input size: H W (or one value for a square input); default 1024 2048')
    parser.add_argument(
        '--per-exit', action='store_true', help='also print every exit\'s own (non-cumulative) GFLOPs and parameters')
    parser.add_argument('--json', metavar='OUT.json', help='write the results as JSON (atomically)')
    parser.add_argument(
        '--device',
        default='meta',
        choices=['meta', 'cpu', 'cuda'],
        help='where the counting pass runs; "meta" does no arithmetic (default)')
    parser.add_argument(
        '--reference',
        type=float,
        nargs='+',
        metavar='GFLOPS_2_30',
        help='published cumulative figures (2^30 units) to compare with, one per exit')
    parser.add_argument(
        '--check-mmengine',
        action='store_true',
        help='also count with mmengine\'s FlopAnalyzer (a real traced forward on CPU: slow for '
        'big inputs) and check that its conv+linear MACs equal ours')
    parser.add_argument(
        '--cfg-options',
        nargs='+',
        action=DictAction,
        help='override settings of the config, e.g. model.test_cfg.mode=whole')
    args = parser.parse_args(argv)
    if len(args.shape) == 1:
        args.shape = [args.shape[0], args.shape[0]]
    if len(args.shape) != 2:
        parser.error('--shape takes one or two integers (H W)')
    if min(args.shape) < 1:
        parser.error(f'--shape must be positive (H W >= 1), got {" ".join(map(str, args.shape))}')
    if args.reference and not all(math.isfinite(v) and v > 0 for v in args.reference):
        parser.error(f'--reference values must be positive GFLOPs, got {args.reference}')
    return args


def load_config(path: str):
    """Loads a config file; ``pkg::rel/path.py`` resolves to the configs the package wheel ships under ``.mim``.

    mmengine's ``hub.get_config`` would do the same but tries to pip-install a missing package, which must not
    happen on an offline machine, so the path is resolved here.
    """
    from mmengine.config import Config
    if '::' in path:
        from mmengine.utils import get_installed_path
        package, rel = path.split('::', 1)
        cfg_file = osp.join(get_installed_path(package), '.mim', 'configs', rel)
        if not osp.isfile(cfg_file):
            raise FileNotFoundError(f'{path}: no such config in the installed {package} ({cfg_file})')
        path = cfg_file
    return Config.fromfile(path)


def build_model(cfg) -> torch.nn.Module:
    """Builds ``cfg.model`` without any pretrained weights, SyncBN turned into BN, in eval mode."""
    from mmengine.model import revert_sync_batchnorm
    from mmengine.registry import init_default_scope

    from mmseg.registry import MODELS
    from mmseg.utils import register_all_modules
    register_all_modules(init_default_scope=False)
    import mmseg_cbt  # noqa: F401  (registers the early-exit modules)
    init_default_scope(cfg.get('default_scope', 'mmseg'))
    cfg.model.pretrained = None  # no weights needed to count (and none can be downloaded here)
    cfg.model.pop('init_cfg', None)
    if isinstance(cfg.model.get('backbone'), dict):
        cfg.model.backbone.pop('init_cfg', None)
    cfg.model.train_cfg = None
    model = MODELS.build(cfg.model)
    # SyncBN cannot run outside a process group; its arithmetic is not counted anyway
    model = revert_sync_batchnorm(model)
    return model.eval()


def _signature(model: torch.nn.Module, shape: Sequence[int]) -> Optional[str]:
    """Key of :data:`PUBLISHED` that this model/shape matches, or None."""
    from mmseg_cbt.analysis import is_early_exit_model
    backbone = getattr(model, 'backbone', None)
    extra = getattr(backbone, 'extra', None)
    if not extra or 'stage4' not in extra:
        return None
    if tuple(extra['stage4']['num_channels']) != (48, 96, 192, 384):
        return None
    size = f'@{shape[0]}x{shape[1]}'
    if is_early_exit_model(model):
        widths = [getattr(h, 'channels', None) for h in model.exit_heads]
        if model.num_exits == 4 and widths == [128, 128, 128]:
            return 'ee_hrnet_w48_rh128' + size
        return None
    if type(model.decode_head).__name__ == 'FCNHead':
        return 'hrnetv2_w48_fcn' + size
    return None


def count(model: torch.nn.Module, shape: Sequence[int], device: str):
    """Dense count at ``shape`` on ``device``; returns (FlopsResult, device actually used)."""
    from mmseg_cbt.analysis import count_flops
    try:
        m = model.to(device)
        x = torch.zeros(1, 3, shape[0], shape[1], device=device)
        return count_flops(m, x, exit_mode='dense', fill='copy'), device
    except (NotImplementedError, RuntimeError) as e:
        if device != 'meta':
            raise
        # some custom op without a meta kernel: count for real instead (same integers, more time)
        print(f'[get_flops] meta-device pass failed ({type(e).__name__}: {e}); counting on cpu', file=sys.stderr)
        return count(model.to_empty(device='cpu') if _on_meta(model) else model, shape, 'cpu')


def _on_meta(model: torch.nn.Module) -> bool:
    return any(p.is_meta for p in model.parameters())


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Runs the tool; returns the JSON-ready result dict."""
    args = parse_args(argv)
    cfg = load_config(args.config)
    if args.cfg_options:
        cfg.merge_from_dict(args.cfg_options)
    model = build_model(cfg)
    h, w = args.shape
    if hasattr(model, 'check_input_size'):
        model.check_input_size((h, w))  # the network's minimum input size, named before any counting
    device = 'cpu' if args.check_mmengine else args.device
    t0 = time.time()
    result, device = count(model, (h, w), device)
    elapsed = time.time() - t0

    from mmseg_cbt.analysis import mmengine_exit_macs
    print(f'config: {args.config}')
    print(f'input: 1x3x{h}x{w} (H x W), counted on {device} in {elapsed:.1f} s')
    print(result.table(per_exit=args.per_exit))

    out: Dict[str, Any] = dict(
        config=args.config,
        shape=[h, w],
        early_exit=result.early_exit,
        units=dict(gflops_1e9='conv+linear MACs / 1e9', gflops_2_30='conv+linear MACs / 2**30'),
        exits=[
            dict(
                exit=e.exit,
                macs=int(e.macs),
                gflops_1e9=e.gflops_1e9,
                gflops_2_30=e.gflops_2_30,
                macs_exit_only=int(e.macs_exit_only),
                params=e.params) for e in result.exits
        ] if result.early_exit else [],
        total=dict(
            macs=int(result.total.macs),
            gflops_1e9=result.total.gflops_1e9,
            gflops_2_30=result.total.gflops_2_30,
            params=result.total.params))

    ref = None
    if args.reference:
        ref = dict(source='--reference', gflops_2_30=list(args.reference))
    else:
        ref = PUBLISHED.get(_signature(model, (h, w)) or '')
    if ref is not None:
        ours = [e.gflops_2_30 for e in result.exits]
        pub = ref['gflops_2_30']
        if len(pub) == 1:
            ours = ours[-1:]  # a total
        if len(pub) != len(ours):
            print(f'[get_flops] --reference has {len(pub)} values, the model has {len(ours)} exits: not compared')
        else:
            print(f'\ncompared with {ref["source"]} (GFLOPs = MACs / 2^30):')
            rows = []
            for i, (o, p) in enumerate(zip(ours, pub)):
                label = str(i + 1) if len(pub) > 1 else 'total'
                rows.append(dict(exit=label, ours_gflops_2_30=o, published_gflops_2_30=p, rel_diff=(o - p) / p))
                print(f'  exit {label:>5}: ours {o:9.2f}   published {p:9.2f}   rel. diff {(o - p) / p:+.2%}')
            out['reference'] = dict(source=ref['source'], rows=rows)

    if args.check_mmengine:
        x = torch.zeros(1, 3, h, w)
        t0 = time.time()
        theirs = mmengine_exit_macs(model.to('cpu'), x)
        ours_macs = [e.macs_per_image[0] for e in result.exits]
        ours_macs = ours_macs if result.early_exit else ours_macs[-1:]
        same = [int(a) == int(b) for a, b in zip(ours_macs, theirs)]
        print(f'\nmmengine FlopAnalyzer conv+linear MACs ({time.time() - t0:.1f} s): {theirs}')
        print(f'ours: {[int(m) for m in ours_macs]}  ->  {"EQUAL" if all(same) else "DIFFERENT"}')
        out['mmengine_macs'] = theirs
        out['mmengine_equal'] = all(same)

    if args.json:
        from mmseg_cbt.utils.io import write_json_atomic
        write_json_atomic(out, args.json)
        print(f'written: {args.json}')
    return out


if __name__ == '__main__':
    main()
