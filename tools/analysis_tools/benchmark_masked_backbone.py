"""Section (b) of ``benchmark_masked.py``: whole early-exit HRNet backbones, dense versus masked inference.

For each model (W18-small, W48 early-exit configs) at the given input size and each stopped fraction, a blob-shaped
stop mask is applied after exit 1 (stem and stage 1 dense, as in ADP-C); the dense passes run all four stages (mmseg's
module as built, and the same after ``optimize_for_inference``), the masked pass runs stem and stage 1 densely on the
optimized backbone and stages 2-4 through the sparse path (``forward_stage_masked(sparse=True)``). All are timed
interleaved in one process (best of ``--e2e-repeats``, with the command line's clock); ratios are against the
faster dense pass. The MAC ratio is ``mmseg_cbt.analysis``'s count of the backbone's convs with the mask applied
to stages 2-4 (every conv at its output positions that are active under the nearest-resized mask).
"""
import logging
import os.path as osp
from typing import Dict, List, Tuple

import torch
import torch.nn as nn

from mmseg_cbt.utils.benchmark import blob_mask, time_interleaved

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
CONFIGS = {
    'W18s': osp.join(ROOT, 'configs/ee_hrnet/ee-fcn_hr18s_4xb2-80k_cityscapes-512x1024.py'),
    'W48': osp.join(ROOT, 'configs/ee_hrnet/ee-fcn_hr48_4xb2-80k_cityscapes-512x1024.py'),
}


def build_model(name: str) -> nn.Module:
    """The early-exit model in eval mode, BN with non-trivial statistics, SyncBN reverted."""
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
    model.eval()
    return model


def mac_ratios(model: nn.Module, x: torch.Tensor, active: torch.Tensor) -> Tuple[float, float]:
    """Masked / dense backbone MACs with ``active`` (1/4 resolution) applied after exit 1, as counted by
    :func:`mmseg_cbt.analysis.count_flops`: (whole backbone, stages 2-4 only)."""
    from mmseg_cbt.analysis import count_flops
    n = model.num_exits
    dense = count_flops(model, x, actives=[None] * n).exits
    masked = count_flops(model, x, actives=[None] + [active] * (n - 1)).exits

    def backbone(exits, first: int) -> float:
        return sum(float(e.backbone_macs_per_image[0]) for e in exits[first:])

    return backbone(masked, 0) / backbone(dense, 0), backbone(masked, 1) / backbone(dense, 1)


def bench_backbones(args) -> List[dict]:
    """Section (b): the table of wall ratio masked/dense next to the MAC ratio.

    Two dense baselines are timed: mmseg's module as built (NCHW, separate BN) and the same backbone after
    :func:`mmseg_cbt.utils.optimize_for_inference` (BN folded, channels-last); the faster one is the reference
    of the ratios. The masked pass uses the optimized backbone for its dense stem and stage 1 (its sparse stages
    fold BN themselves), so both sides run the same dense code.
    """
    import copy

    from mmseg_cbt.utils.inference import optimize_for_inference
    rows = []
    h, w = args.input_size
    print(f'\n(b) whole early-exit backbones at {h}x{w}, batch 1, fill=copy: dense vs masked (sparse) stages 2-4')
    print('dense: mmseg module as built (stock) and BN-folded channels-last (opt); ratios against the faster one')
    print('columns: whole backbone (stem + stage 1 dense in both) | stages 2-4 alone (what the sparse path runs)')
    print(f'{"model":<6} {"stopped":>7} {"stock ms":>9} {"opt ms":>8} {"masked ms":>9} {"wall ratio":>10} '
          f'{"MAC ratio":>9} {"wall/MAC":>8} | {"2-4 wall":>8} {"2-4 MAC":>8} {"wall/MAC":>8}')
    for name in args.models:
        model = build_model(name)
        bb = model.backbone
        ob = optimize_for_inference(copy.deepcopy(bb))
        x = torch.randn(1, 3, h, w)
        x_cl = x.contiguous(memory_format=torch.channels_last)
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
                }, args.e2e_repeats, args.timer)
            dense_ms = min(t['dense_stock'], t['dense_opt'])
            mr, mr234 = mac_ratios(model, x, active)
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
    to), ``sparse`` (copy fill) and ``sparse_rbf`` (rbf fill on its support). These are the measurements behind the
    defaults of ``sparse_max_active`` (:func:`mmseg_cbt.ops.default_max_active`) and the rbf cost in
    docs/masked_inference.md.
    """
    import copy

    from mmseg_cbt.utils.inference import optimize_for_inference
    rows = []
    h, w = args.input_size
    print(f'\n(paths) stages 2-4 at {h}x{w} (optimized backbone, batch 1): ms per pass')
    names = ('dense', 'simulate', 'sparse', 'sparse_rbf')
    print(f'{"model":<6} {"stopped":>7} ' + ' '.join(f'{n:>15}' for n in names))
    for name in args.models:
        ob = optimize_for_inference(copy.deepcopy(build_model(name).backbone))
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

            t: Dict[str, float] = time_interleaved(
                {
                    'dense': lambda: stages(masked=False),
                    'simulate': lambda: stages(sparse=False),
                    'sparse': stages,
                    'sparse_rbf': lambda: stages(fill='rbf')
                }, args.e2e_repeats, args.timer)
            rows.append(dict(section='paths', model=name, stopped=stopped, **{f'{k}_ms': v for k, v in t.items()}))
            print(f'{name:<6} {stopped:>6.0f}% ' + ' '.join(f'{t[n]:15.1f}' for n in names), flush=True)
    return rows
