"""Runs a model over data to gather CBT statistics, turns them into thresholds and writes the results."""
import copy
from typing import Any, Dict, Optional, Sequence

import torch
from mmengine.dist import is_main_process
from mmengine.model import is_model_wrapper
from mmengine.utils import ProgressBar
from torch import nn

from ..utils.io import write_json_atomic
from .stats import ClassProbStats
from .thresholds import cbt_thresholds, class_margins

__all__ = [
    'gather_class_prob_stats', 'apply_calibration', 'calibration_report', 'build_calibration_dataloader',
    'write_json_atomic'
]


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if is_model_wrapper(model) else model


def build_calibration_dataloader(cfg, dataloader: Optional[dict] = None, batch_size: int = 1,
                                 num_workers: Optional[int] = None):
    """Builds the calibration dataloader: by default the training split read with the test pipeline.

    Args:
        cfg (Config): The full mmseg config (``train_dataloader`` and ``test_dataloader`` are read).
        dataloader (dict, optional): An explicit dataloader config; used as given when set.
        batch_size (int): Batch size of the default loader (1: images of different sizes never share a batch).
        num_workers (int, optional): Workers of the default loader (default: the training loader's).

    Returns:
        DataLoader: Unshuffled, finite (DefaultSampler) loader.
    """
    from mmengine.runner import Runner
    if dataloader is None:
        train = copy.deepcopy(cfg.train_dataloader)
        test_loader = cfg.get('test_dataloader') or cfg.get('val_dataloader')
        if 'pipeline' not in train.dataset or test_loader is None or 'pipeline' not in test_loader.dataset:
            raise ValueError('cannot derive a calibration dataloader (training split with the test pipeline) from '
                             'this config: the training dataset has no top-level pipeline (a wrapped dataset?) or '
                             'there is no test/val dataloader; pass an explicit `dataloader` config')
        train.dataset.pipeline = copy.deepcopy(test_loader.dataset.pipeline)
        dataloader = dict(
            batch_size=batch_size,
            num_workers=train.get('num_workers', 0) if num_workers is None else num_workers,
            persistent_workers=False,
            sampler=dict(type='DefaultSampler', shuffle=False),
            dataset=train.dataset)
    return Runner.build_dataloader(dataloader)


@torch.no_grad()
def gather_class_prob_stats(model: nn.Module,
                            dataloader,
                            max_batches: Optional[int] = None,
                            progress: bool = True) -> ClassProbStats:
    """Per exit, per ground-truth class sums of softmax vectors and pixel counts over a dataloader.

    The exit logits are computed densely (nothing stops while calibrating) and brought to the label's size exactly
    the way the segmentor predicts (resize to the input, remove padding, undo flip, resize to ``ori_shape``), so the
    statistics describe the probabilities the model's predictions are made from. Runs in eval mode under
    ``no_grad`` and restores the training mode afterwards. Sums are exact fixed-point integers, all-reduced across
    ranks, so any split of the data over ranks gives bit-for-bit the same result.

    Args:
        model (nn.Module): An :class:`EarlyExitEncoderDecoder` (possibly wrapped).
        dataloader: Yields mmseg batches with ``gt_sem_seg``.
        max_batches (int, optional): Stop after this many batches (per rank).
        progress (bool): Show a progress bar on the main process.

    Returns:
        ClassProbStats: The all-reduced statistics.
    """
    model = _unwrap(model)
    for attr in ('inference_exits', 'restore_logits', 'num_exits'):
        if not hasattr(model, attr):
            raise TypeError(f'{type(model).__name__} is not an early-exit segmentor (no {attr})')
    try:
        total = len(dataloader)
    except TypeError:
        total = None
    if total == 0:
        raise ValueError('the calibration dataloader is empty: no training pixels to compute thresholds from')
    if max_batches is not None:
        if max_batches < 1:
            raise ValueError(f'max_batches must be >= 1, got {max_batches}')
        total = max_batches if total is None else min(total, max_batches)
    ignore_index = getattr(model.decode_head, 'ignore_index', 255)
    stats = ClassProbStats(model.num_exits, model.num_classes, ignore_index=ignore_index)
    was_training = model.training
    model.eval()
    bar = ProgressBar(total) if progress and is_main_process() and total else None
    seen = 0
    try:
        for i, data in enumerate(dataloader):
            if max_batches is not None and i >= max_batches:
                break
            data = model.data_preprocessor(data, False)
            samples = data['data_samples']
            metas = [s.metainfo for s in samples]
            exit_logits = model.inference_exits(data['inputs'], metas, exit_mode='dense')
            for j, sample in enumerate(samples):
                restored = [model.restore_logits(lg[j:j + 1], metas[j]).unsqueeze(0) for lg in exit_logits]
                stats.update(restored, sample.gt_sem_seg.data.to(restored[0].device).long())
            seen += 1
            if bar is not None:
                bar.update()
    finally:
        model.train(was_training)
    if seen == 0:
        raise ValueError('the calibration dataloader yielded no batch')
    return stats.all_reduce()


def apply_calibration(model: nn.Module,
                      class_mean_probs: torch.Tensor,
                      counts: torch.Tensor,
                      alpha: float,
                      beta: float,
                      share_exits: bool = True,
                      class_names: Optional[Sequence[str]] = None) -> torch.Tensor:
    """Computes CBT (or CBT-ns) thresholds and stores them with their statistics in the model's buffers.

    Args:
        model (nn.Module): The early-exit segmentor (possibly wrapped).
        class_mean_probs (Tensor): (N, K, K) mean softmax per exit and ground-truth class.
        counts (Tensor): (K,) pixel counts per class (0 = no training pixels).
        alpha (float): Threshold of the easiest class.
        beta (float): Threshold of the hardest class.
        share_exits (bool): CBT (one vector for every exit) or CBT-ns (one per exit).
        class_names (Sequence[str], optional): For warnings.

    Returns:
        Tensor: The thresholds, (K,) or (N, K).
    """
    model = _unwrap(model)
    n, k = model.num_exits, model.num_classes
    if tuple(class_mean_probs.shape) != (n, k, k):
        raise ValueError(f'num_classes/num_exits mismatch: statistics have shape {tuple(class_mean_probs.shape)}, '
                         f'the model needs ({n}, {k}, {k})')
    thr = cbt_thresholds(class_mean_probs, alpha, beta, share_exits=share_exits, counts=counts,
                         class_names=class_names)
    model.set_cbt_calibration(thr, alpha, beta, class_mean_probs=class_mean_probs, class_counts=counts)
    return thr


def calibration_report(thresholds: torch.Tensor,
                       class_mean_probs: torch.Tensor,
                       counts: torch.Tensor,
                       alpha: float,
                       beta: float,
                       class_names: Sequence[str]) -> Dict[str, Any]:
    """A JSON-serialisable summary: per class its pixel count, margin, threshold(s) and per-exit mean softmax."""
    share = thresholds.dim() == 1
    margins = class_margins(class_mean_probs.mean(dim=0))
    classes = []
    for k, name in enumerate(class_names):
        classes.append(
            dict(
                name=name,
                count=int(counts[k]),
                margin=float(margins[k]),
                threshold=float(thresholds[k]) if share else [float(t) for t in thresholds[:, k]],
                mean_probs=[[round(float(p), 8) for p in class_mean_probs[e, k]]
                            for e in range(class_mean_probs.shape[0])]))
    order = sorted(range(len(class_names)),
                   key=lambda k: float(thresholds[k]) if share else float(thresholds[:, k].mean()))
    return dict(
        method='CBT' if share else 'CBT-ns',
        alpha=alpha,
        beta=beta,
        share_exits=share,
        num_exits=int(class_mean_probs.shape[0]),
        class_order_easy_to_hard=[class_names[k] for k in order],
        classes=classes)
