"""One-pass threshold sweeps: every setting's confusion matrices and masked MACs from one dense pass per image.

With features that stay dense (``feature_mask='none'``, the papers' convention) every exit's logits are the same
whatever the stop rule, so they are computed once per image (``exit_mode='dense'``); for every setting the stop
masks are then built post hoc exactly as ``EarlyExitEncoderDecoder.forward_exits`` builds them (cumulative masks on
the exits' logits, copy aggregation, the model's own ``_stop_mask_with``), a confusion matrix is accumulated at the
label size (labels as ``predict``'s resize and restore give them, through
:class:`~mmseg_cbt.analysis.restore_plan.ExitLabelRestorer`: one real resize per exit and image, exact
recomputation only at the borders between exits, counted per source window rather than per output pixel,
:class:`~mmseg_cbt.analysis.restore_plan.CellConfusion`) and the masked MACs are counted with
:class:`~mmseg_cbt.analysis.EarlyExitFlopCounter`. The numbers equal those of separate runs per setting.
"""
import time
import warnings
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import torch
from torch import Tensor

from mmseg_cbt.models.masked.vit_stop_rules import exit_scores
from .flops import EarlyExitFlopCounter
from .restore_plan import CellConfusion, ExitLabelRestorer
from .sweep_spec import FAMILIES, Family, Setting

__all__ = [
    'resolve_thresholds', 'posthoc_exits', 'argmax_channels', 'SettingResult', 'SweepEvaluator', 'confusion_metrics'
]


def resolve_thresholds(model,
                       families: Sequence[Family],
                       precision_stats=None,
                       class_names: Optional[Sequence[str]] = None) -> None:
    """Fills ``Setting.thresholds`` ((N, K)) of every CBT / precision setting, from the checkpoint's class
    statistics (``cbt_thresholds``, no data pass) and from the precision histograms."""
    from mmseg_cbt.calibration import CBTCalibrationWarning, cbt_thresholds, precision_thresholds
    n, k = model.num_exits, model.num_classes
    for fam in families:
        spec = FAMILIES[fam.name]
        for s in fam.settings:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter('always', CBTCalibrationWarning)
                if spec.rule == 'cbt':
                    thr = cbt_thresholds(
                        model.cbt_class_mean_probs,
                        s.params['alpha'],
                        s.params['beta'],
                        share_exits=spec.share,
                        counts=model.cbt_class_counts,
                        class_names=class_names)
                elif spec.rule == 'precision':
                    thr = precision_thresholds(
                        precision_stats,
                        s.params['target'],
                        s.params['alpha'],
                        s.params['beta'],
                        class_names=class_names)
                else:
                    continue
            s.warnings = sorted({str(w.message) for w in caught})
            s.thresholds = thr.to(torch.float32).expand(n, k).clone()


def posthoc_exits(model,
                  dense_logits: Sequence[Tensor],
                  cfg: Optional[dict],
                  scores: Optional[Sequence] = None,
                  masks_only: bool = False):
    """Per-exit logits and masks of one stop rule, built from dense exit logits the way ``forward_exits`` builds
    them with ``feature_mask='none'`` (same loop, same mask calls, copy aggregation).

    Args:
        model: The early-exit segmentor (CBT thresholds read from its ``cbt_thresholds`` buffer).
        dense_logits (Sequence[Tensor]): ``forward_exits(..., exit_mode='dense')`` output, (B, K, h, w) per exit.
        cfg (dict, optional): The rule for ``_stop_mask_with`` (None: dense, nothing stops).
        scores (Sequence[Tensor], optional): Every exit's scores of its dense logits (``exit_scores``), shared
            between rules. At the active positions they are the scores of the aggregated logits the model's loop
            scores, and a stop mask only counts there (``active & keep``; DToP's top-k competes among active
            positions only), so the masks are the same.
        masks_only (bool): With ``scores``: only the masks are wanted; the returned logits are then the dense ones
            (the aggregation is skipped, nothing else reads them).

    Returns:
        tuple[list[Tensor], list[Tensor | None]]: Logits and masks, as ``forward_exits(..., return_active=True)``.
    """
    num_exits = len(dense_logits)
    logits: List[Tensor] = []
    actives: List[Optional[Tensor]] = []
    active: Optional[Tensor] = None
    for n in range(num_exits):
        if active is not None and not bool(active.any()):
            logits += [logits[-1]] * (num_exits - n)
            actives += [active] * (num_exits - n)
            break
        out = dense_logits[n]
        if active is not None and not (masks_only and scores is not None):
            out = torch.where(active.unsqueeze(1), out, logits[-1])
        logits.append(out)
        actives.append(active)
        if cfg is not None and n < num_exits - 1:
            keep = ~model._stop_mask_with(out, n, cfg, active, None if scores is None else scores[n])
            active = keep if active is None else active & keep
    return logits, actives


def argmax_channels(x: Tensor) -> Tensor:
    """``x.argmax(dim=0)`` of a (K, H, W) tensor (first index among equal maxima), by a running maximum over the
    contiguous channel planes (several times faster than the strided reduction)."""
    best = x[0].clone()
    idx = torch.zeros(x.shape[1:], dtype=torch.int64, device=x.device)
    for k in range(1, x.shape[0]):
        idx.masked_fill_(x[k] > best, k)
        torch.maximum(best, x[k], out=best)
    if bool(best.isnan().any()):  # torch's argmax ranks NaN highest; the running maximum does not
        return x.argmax(dim=0)
    return idx


@dataclass
class SettingResult:
    """Accumulated numbers of one setting.

    Attributes:
        confusion (dict[int, Tensor]): Per evaluated exit (0-based), ``(K + 1, K)`` int64 [label, prediction];
            row K collects labelled pixels whose label is outside [0, K) (they count in the predicted area, as in
            mmseg's IoUMetric).
        flops (FlopsResult, optional): Per-image MACs of every exit.
    """
    confusion: Dict[int, Tensor] = field(default_factory=dict)
    flops: Optional[object] = None


class SweepEvaluator:
    """Accumulates every setting's confusion matrices and MACs from one dense forward pass per batch.

    Args:
        model: The early-exit segmentor, in eval mode (``test_cfg.mode='whole'``).
        settings (Sequence[Setting]): The settings (thresholds resolved).
        ignore_index (int): The metric's ignore index.
        all_exits (bool): Evaluate every exit (default: the final exit only).
    """

    def __init__(self, model, settings: Sequence[Setting], ignore_index: int = 255, all_exits: bool = False):
        self.model = model
        self.settings = list(settings)
        self.ignore_index = int(ignore_index)
        self.num_classes = int(model.num_classes)
        n = model.num_exits
        self.exits = list(range(n)) if all_exits else [n - 1]
        self.results = [
            SettingResult(
                {e: torch.zeros(self.num_classes + 1, self.num_classes, dtype=torch.int64)
                 for e in self.exits}) for _ in self.settings
        ]
        self.counter = EarlyExitFlopCounter(model, exit_mode='dense', feature_mask='none')
        self._plans: Dict[tuple, object] = {}  # RestorePlan per image geometry
        self.num_images = 0
        self.time_forward = 0.0
        self.time_posthoc = 0.0

    def _row_offsets(self, label: Tensor) -> Tensor:
        """Per output pixel its confusion row offset ``row * K`` (labels outside [0, K) in row K), -1 where the
        label is the ignore index."""
        k = self.num_classes
        label = label.reshape(-1).long()
        rows = torch.where((label >= 0) & (label < k), label, torch.full_like(label, k)) * k
        return torch.where(label != self.ignore_index, rows, torch.full_like(rows, -1))

    @torch.no_grad()
    def process(self, data: dict) -> None:
        """One preprocessed batch (``model.data_preprocessor(batch, False)``): dense pass, then every setting."""
        model = self.model
        inputs, samples = data['inputs'], data['data_samples']
        metas = [s.metainfo for s in samples]
        t0 = time.perf_counter()
        dense = model.forward_exits(inputs, exit_mode='dense', feature_mask='none')
        t1 = time.perf_counter()
        offsets = [self._row_offsets(s.gt_sem_seg.data) for s in samples]
        scores = [exit_scores(head, d) for head, d in zip(model.exits, dense)]
        k = self.num_classes
        per_image = [[d[i] for d in dense] for i in range(len(samples))]
        restorers = [
            ExitLabelRestorer(model, logits, metas[0]['img_shape'], meta, argmax_channels, self._plans)
            for logits, meta in zip(per_image, metas)
        ]
        counters = [CellConfusion(r, off, k) for r, off in zip(restorers, offsets)]
        saved = (model.cbt_thresholds.clone(), model.cbt_calibrated.clone())
        try:
            for setting, result in zip(self.settings, self.results):
                if setting.thresholds is not None:
                    model.cbt_thresholds.copy_(setting.thresholds.to(model.cbt_thresholds.device))
                    model.cbt_calibrated.fill_(True)
                _, actives = posthoc_exits(model, dense, setting.stop_cfg(), scores, masks_only=True)
                self.counter.exit_mode = (setting.stop_cfg() or {}).get('exit_mode', 'dense')  # the result's label
                flops = self.counter.count(inputs, actives)
                result.flops = flops if result.flops is None else result.flops.extend(flops)
                # exit whose logits each pixel holds at the last exit: cumulative masks, so the count of later
                # exits it was still active at
                held = torch.zeros(dense[0].shape[:1] + dense[0].shape[2:], dtype=torch.uint8, device=dense[0].device)
                for a in actives[1:]:
                    held += 1 if a is None else a.to(torch.uint8)
                for e in self.exits:
                    clipped = held.clamp(max=e)
                    for i in range(len(samples)):
                        result.confusion[e] += counters[i].counts(clipped[i]).view(k + 1, k).cpu()
        finally:
            model.cbt_thresholds.copy_(saved[0])
            model.cbt_calibrated.copy_(saved[1])
        self.num_images += len(samples)
        self.time_forward += t1 - t0
        self.time_posthoc += time.perf_counter() - t1

    def summary(self, index: int) -> dict:
        """Numbers of setting ``index``: per exit mean MACs / GFLOPs and, for evaluated exits, mIoU / aAcc."""
        result = self.results[index]
        exits = []
        for n, ef in enumerate(result.flops.exits):
            row = dict(exit=n + 1, macs=ef.macs, gflops_2_30=ef.gflops_2_30, gflops_1e9=ef.gflops_1e9)
            if n in result.confusion:
                row.update(confusion_metrics(result.confusion[n]))
            exits.append(row)
        return dict(exits=exits, final=exits[-1])


def confusion_metrics(conf: Tensor) -> dict:
    """mIoU / aAcc (%) of a (K + 1, K) confusion matrix as mmseg's IoUMetric computes them (classes without any
    pixel are NaN and left out of the mean)."""
    conf = conf.to(torch.float64)
    k = conf.shape[1]
    inter = conf[:k].diagonal()
    area_pred, area_label = conf.sum(0), conf[:k].sum(1)
    union = area_pred + area_label - inter
    iou = inter / union
    miou = float(iou[~iou.isnan()].mean()) * 100 if bool((~iou.isnan()).any()) else float('nan')
    aacc = float(inter.sum() / area_label.sum()) * 100 if float(area_label.sum()) > 0 else float('nan')
    return dict(mIoU=miou, mIoU_2dp=round(miou, 2), aAcc=aacc)
