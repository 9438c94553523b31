"""Section (b) of ``benchmark_masked.py``: whole early-exit HRNet backbones, dense versus masked inference.

For each model (W18-small, W48 early-exit configs) at the given input size and each stopped fraction, a blob-shaped
stop mask is applied after exit 1 (stem and stage 1 dense, as in ADP-C); the dense passes run all four stages (mmseg's
module as built, and the same after ``optimize_for_inference``), the masked pass runs stem and stage 1 densely on the
optimized backbone and stages 2-4 through the sparse path (``forward_stage_masked(sparse=True)``). All are timed
interleaved in one process (best of ``--e2e-repeats``); ratios are against the faster dense pass. The MAC ratio
counts every conv of the backbone at the positions it computes (its output positions that are active under the
nearest-resized mask).
"""
import logging
import os.path as osp
from typing import Dict, List

import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
CONFIGS = {
    'W18s': osp.join(ROOT, 'configs/ee_hrnet/ee-fcn_hr18s_4xb2-80k_cityscapes-512x1024.py'),
    'W48': osp.join(ROOT, 'configs/ee_hrnet/ee-fcn_hr48_4xb2-80k_cityscapes-512x1024.py'),
}


def build_backbone(name: str) -> nn.Module:
    """The early-exit model's backbone in eval mode, BN with non-trivial statistics, SyncBN reverted."""
    from mmengine.config import Config
    from mmengine.model import revert_sync_batchnorm

    from mmseg.registry import MODELS
    from mmseg.utils import register_all_modules

    import mmseg_cbt  # noqa: F401
    register_all_modules()
    cfg = Config.fromfile(CONFIGS[name])
    cfg.model.pretrained = None
    torch.manual_seed(0)
    model = revert_sync_batchnorm(MODELS.build(cfg.model))
    # mmengine prints one INFO record per parameter from init_weights when its logger has no file (thousands of
    # lines around the benchmark's tables): silenced for this call
    from mmengine.logging import MMLogger
    logger = MMLogger.get_current_instance()
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        model.init_weights()
    finally:
        logger.setLevel(level)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_var.uniform_(0.5, 1.5)
            m.running_mean.normal_(0, 0.1)
    bb = model.backbone
    bb.eval()  # (mmseg's HRNet.train returns None: no chaining)
    return bb


def conv_macs(bb: nn.Module, x: torch.Tensor) -> List[tuple]:
    """(module name, output (h, w), dense MACs) of every conv call of one dense forward."""
    rec = []
    hooks = []
    for name, m in bb.named_modules():
        if isinstance(m, nn.Conv2d):

            def hook(mod, inp, out, name=name):
                k = mod.kernel_size[0] * mod.kernel_size[1] * mod.in_channels // mod.groups
                rec.append((name, tuple(out.shape[-2:]), out.numel() * k))

            hooks.append(m.register_forward_hook(hook))
    with torch.no_grad():
        bb.forward_stages(x)
    for h in hooks:
        h.remove()
    return rec


def mac_ratio(rec: List[tuple], active: torch.Tensor, stages_2_4_only: bool = False) -> float:
    """Masked / dense MACs: convs of transitions and stages 2-4 count their active output positions only."""
    dense = masked = 0.0
    for name, hw, macs in rec:
        if name.startswith(('transition', 'stage')):
            p = (F.interpolate(active[:, None].float(), size=hw, mode='nearest') > 0.5).float().mean().item()
            masked += macs * p
            dense += macs
        elif not stages_2_4_only:
            masked += macs
            dense += macs
    return masked / dense


def bench_backbones(args) -> List[dict]:
    """Section (b): the table of wall ratio masked/dense next to the MAC ratio.

    Two dense baselines are timed: mmseg's module as built (NCHW, separate BN) and the same backbone after
    :func:`mmseg_cbt.utils.optimize_for_inference` (BN folded, channels-last); the faster one is the reference
    of the ratios. The masked pass uses the optimized backbone for its dense stem and stage 1 (its sparse stages
    fold BN themselves), so both sides run the same dense code.
    """
    import copy

    from benchmark_masked import blob_mask, time_interleaved

    from mmseg_cbt.utils.inference import optimize_for_inference
    rows = []
    h, w = args.input_size
    print(f'\n(b) whole early-exit backbones at {h}x{w}, batch 1, fill=copy: dense vs masked (sparse) stages 2-4')
    print('dense: mmseg module as built (stock) and BN-folded channels-last (opt); ratios against the faster one')
    print('columns: whole backbone (stem + stage 1 dense in both) | stages 2-4 alone (what the sparse path runs)')
    print(f'{"model":<6} {"stopped":>7} {"stock ms":>9} {"opt ms":>8} {"masked ms":>9} {"wall ratio":>10} '
          f'{"MAC ratio":>9} {"wall/MAC":>8} | {"2-4 wall":>8} {"2-4 MAC":>8} {"wall/MAC":>8}')
    for name in args.models:
        bb = build_backbone(name)
        ob = optimize_for_inference(copy.deepcopy(bb))
        x = torch.randn(1, 3, h, w)
        x_cl = x.contiguous(memory_format=torch.channels_last)
        rec = conv_macs(bb, x)
        with torch.no_grad():
            f1 = ob.forward_stage(1, [x_cl])

        def dense_stock():
            return bb.forward_stages(x)

        def dense_opt():
            return ob.forward_stages(x_cl)

        def dense_234():
            feats = f1
            for s in (2, 3, 4):
                feats = ob.forward_stage(s, feats)
            return feats

        for stopped in args.stopped:
            active = blob_mask(1, f1[0].shape[-2], f1[0].shape[-1], 1 - stopped / 100, seed=int(stopped))

            def masked(active=active):
                feats = ob.forward_stage(1, [x_cl])
                for s in (2, 3, 4):
                    feats = ob.forward_stage_masked(s, feats, active, sparse=True, fill='copy')
                return feats

            def masked_234(active=active):
                feats = f1
                for s in (2, 3, 4):
                    feats = ob.forward_stage_masked(s, feats, active, sparse=True, fill='copy')
                return feats

            t: Dict[str, float] = time_interleaved(
                {
                    'dense_stock': dense_stock,
                    'dense_opt': dense_opt,
                    'masked': masked,
                    'dense_234': dense_234,
                    'masked_234': masked_234
                }, args.e2e_repeats)
            dense_ms = min(t['dense_stock'], t['dense_opt'])
            mr = mac_ratio(rec, active)
            mr234 = mac_ratio(rec, active, stages_2_4_only=True)
            row = dict(
                section='b',
                model=name,
                stopped=stopped,
                dense_stock_ms=t['dense_stock'],
                dense_opt_ms=t['dense_opt'],
                dense_ms=dense_ms,
                masked_ms=t['masked'],
                wall_ratio=t['masked'] / dense_ms,
                mac_ratio=mr,
                dense_234_ms=t['dense_234'],
                masked_234_ms=t['masked_234'],
                wall_ratio_234=t['masked_234'] / t['dense_234'],
                mac_ratio_234=mr234,
                malloc_tuned=getattr(args, 'malloc_tuned', None))
            row['wall_over_mac'] = row['wall_ratio'] / mr
            row['wall_over_mac_234'] = row['wall_ratio_234'] / mr234
            if stopped == 75:
                row['target'] = 1.25
                row['meets_target'] = row['wall_over_mac'] <= 1.25
            rows.append(row)
            flag = '' if 'target' not in row else (' ok' if row['meets_target'] else ' MISS')
            print(
                f'{name:<6} {stopped:>6.0f}% {t["dense_stock"]:9.1f} {t["dense_opt"]:8.1f} {t["masked"]:9.1f} '
                f'{row["wall_ratio"]:10.3f} {mr:9.3f} {row["wall_over_mac"]:8.3f} | {row["wall_ratio_234"]:8.3f} '
                f'{mr234:8.3f} {row["wall_over_mac_234"]:8.3f}{flag}',
                flush=True)
    return rows


def bench_paths(args) -> List[dict]:
    """Section ``paths``: stages 2-4 of the optimized backbones by execution path, timed interleaved.

    ``dense`` (all pixels), ``simulate`` (dense then mask, copy fill: what ``test_cfg.sparse_max_active`` falls back
    to), ``sparse`` (the default GEMM method, copy fill), ``sparse_segments`` (every 3x3 conv through
    ``method='segments'``) and ``sparse_rbf`` (GEMM, rbf fill on its support). These are the measurements behind
    ``choose_method``'s 'auto' = GEMM, the 0.8 default of ``sparse_max_active`` and the rbf cost in the README.
    """
    import copy
    from unittest import mock

    from benchmark_masked import blob_mask, time_interleaved

    import mmseg_cbt.ops.sparse_conv as sc
    from mmseg_cbt.utils.inference import optimize_for_inference
    rows = []
    h, w = args.input_size
    print(f'\n(paths) stages 2-4 at {h}x{w} (optimized backbone, batch 1): ms per pass')
    names = ('dense', 'simulate', 'sparse', 'sparse_segments', 'sparse_rbf')
    print(f'{"model":<6} {"stopped":>7} ' + ' '.join(f'{n:>15}' for n in names))
    for name in args.models:
        ob = optimize_for_inference(copy.deepcopy(build_backbone(name)))
        with torch.no_grad():
            f1 = ob.forward_stage(1, [torch.randn(1, 3, h, w).contiguous(memory_format=torch.channels_last)])
        for stopped in [s for s in args.stopped if s > 0]:
            active = blob_mask(1, f1[0].shape[-2], f1[0].shape[-1], 1 - stopped / 100, seed=int(stopped))

            def stages(sparse: bool = True, fill: str = 'copy', masked: bool = True, active=active):
                feats = f1
                for s in (2, 3, 4):
                    feats = (
                        ob.forward_stage_masked(s, feats, active, sparse=sparse, fill=fill)
                        if masked else ob.forward_stage(s, feats))
                return feats

            def segments():
                # the network has no method switch (segments are opt-in per call): route every 3x3 conv there
                with mock.patch.object(sc, 'choose_method', lambda m, i, c: 'segments' if c.k == 3 else 'gemm'):
                    return stages()

            t: Dict[str, float] = time_interleaved(
                {
                    'dense': lambda: stages(masked=False),
                    'simulate': lambda: stages(sparse=False),
                    'sparse': stages,
                    'sparse_segments': segments,
                    'sparse_rbf': lambda: stages(fill='rbf')
                }, args.e2e_repeats)
            rows.append(dict(section='paths', model=name, stopped=stopped, **{f'{k}_ms': v for k, v in t.items()}))
            print(f'{name:<6} {stopped:>6.0f}% ' + ' '.join(f'{t[n]:15.1f}' for n in names), flush=True)
    return rows
