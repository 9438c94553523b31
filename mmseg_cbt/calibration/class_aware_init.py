"""Class-aware initialisation of trained exits' classifiers from class means.

For a linear classifier on features ``r``, the nearest-class-mean rule ``argmin_k ||r - M_k||^2`` equals
``argmax_k (M_k . r - ||M_k||^2 / 2)`` (the optimal detector of a vector AWGN channel), so a classifier with weight
rows ``M_k`` and biases ``-||M_k||^2 / 2`` predicts like class means before any training (the class-aware
initialisation of Görmez's thesis). With ``alpha < 1`` it is mixed with the existing (default) initialisation:
``alpha x class-aware + (1 - alpha) x default``.

``M_k`` is the mean of what the classifier reads (for an RH exit: the output of its last conv unit, upsampled to
the 1/4 map), over the training pixels of class ``k``, gathered exactly (:mod:`.class_means`) with the exit's own
forward (``forward_with`` and a runner that records the classifier's input).
"""
import warnings
from typing import Any, Dict, List, Optional, Sequence

import torch
from torch import Tensor, nn

from ..models.masked.heads import DenseRunner
from .class_means import gather_class_feature_stats

__all__ = ['class_aware_exits', 'classifier_inputs', 'init_classifier_from_means', 'class_aware_init']


class _RecordingRunner(DenseRunner):
    """Dense runner that keeps the classifier's input of the exit it runs."""

    def __init__(self) -> None:
        self.seen: Optional[Tensor] = None

    def seg(self, head: nn.Module, x: Tensor) -> Tensor:
        self.seen = x
        return head.cls_seg(x)


def class_aware_exits(model: nn.Module, exits: Optional[Sequence[int]] = None) -> List[int]:
    """0-based indices of the early exits to initialise: the given 1-based ``exits`` or every early exit with a
    runner forward (``forward_with``) and a 1x1 ``conv_seg`` classifier; a ValueError names an exit that has none."""
    early = list(model.exit_heads)
    chosen = range(1, len(early) + 1) if exits is None else [int(e) for e in exits]
    out = []
    for e in chosen:
        if not 1 <= e <= len(early):
            raise ValueError(f'exits must be early exits in [1, {len(early)}], got {e}')
        head = early[e - 1]
        conv = getattr(head, 'conv_seg', None)
        if not hasattr(head, 'forward_with') or not isinstance(conv, nn.Conv2d) or conv.kernel_size != (1, 1):
            if exits is None:
                continue
            raise ValueError(f'exit {e} ({type(head).__name__}) has no 1x1 conv_seg classifier read through '
                             'forward_with: it cannot be initialised from class means')
        if not isinstance(conv.weight, nn.Parameter):
            if exits is None:
                continue  # a classifier derived from class means already (EarlyExitClassMeanHead)
            raise ValueError(f'exit {e} ({type(head).__name__}) has no trained classifier to initialise')
        out.append(e - 1)
    if not out:
        raise ValueError('no early exit with a trainable 1x1 conv_seg classifier to initialise')
    return out


def classifier_inputs(model: nn.Module, inputs: Tensor, exit_indices: Sequence[int]) -> List[Tensor]:
    """What the classifiers of the exits ``exit_indices`` (0-based, early) read, from one dense pass."""
    runner = _RecordingRunner()
    out, feats = [], [inputs]
    for stage in range(1, max(exit_indices) + 2):
        feats = model.backbone.forward_stage(stage, feats)
        if stage - 1 in exit_indices:
            model.exits[stage - 1].forward_with(feats, runner)
            out.append(runner.seen)
    return out


@torch.no_grad()
def init_classifier_from_means(conv: nn.Conv2d,
                               means: Tensor,
                               counts: Tensor,
                               alpha: float = 1.0,
                               where: str = 'exit') -> List[int]:
    """Sets ``conv`` (K x C 1x1) to ``alpha x (M_k, -||M_k||^2 / 2) + (1 - alpha) x`` its current weight and bias.

    A class without pixels (warned about) has no mean: its class-aware weight is 0 and its class-aware bias is
    ``b_min - 1 - |b_min|`` with ``b_min`` the lowest bias of the present classes, so with ``alpha = 1`` it scores
    below every present class wherever features and means are non-negative (an RH classifier reads ReLU outputs);
    otherwise a default-initialised row (bias near 0) would beat every class-aware one. Returns those classes.
    """
    if not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f'alpha must be in [0, 1], got {alpha!r}')
    k, c = conv.weight.shape[:2]
    if tuple(means.shape) != (k, c):
        raise ValueError(f'{where}: class means of shape {tuple(means.shape)} do not fit its classifier '
                         f'({k} classes x {c} input channels)')
    present = counts > 0
    empty = [int(i) for i in torch.nonzero(~present).flatten()]
    if empty:
        warnings.warn(f'{where}: classes {empty} have no training pixels; their classifier rows keep the default '
                      'initialisation')
    if not bool(present.any()):
        raise ValueError(f'{where}: no class has training pixels')
    dev, dtype = conv.weight.device, conv.weight.dtype
    mask = present.to(dev).view(-1, 1)
    means = torch.where(mask, means.to(dev, torch.float64), 0.0)
    aware_b = -0.5 * means.square().sum(1)
    b_min = float(aware_b[mask[:, 0]].min())
    aware_b = torch.where(mask[:, 0], aware_b, b_min - 1.0 - abs(b_min))
    w = conv.weight.view(k, c).to(torch.float64)
    conv.weight.copy_((alpha * means + (1 - alpha) * w).to(dtype).view_as(conv.weight))
    if conv.bias is not None:
        conv.bias.copy_((alpha * aware_b + (1 - alpha) * conv.bias.to(torch.float64)).to(dtype))
    return empty


def class_aware_init(model: nn.Module,
                     dataloader,
                     alpha: float = 1.0,
                     exits: Optional[Sequence[int]] = None,
                     max_batches: Optional[int] = None,
                     progress: bool = True) -> Dict[str, Any]:
    """Initialises the classifiers of early exits from the class means of their inputs (one pass over the data).

    Every rank must call it (statistics all-reduced after every rank took rank 0's model).

    Args:
        model (nn.Module): An early-exit segmentor (possibly wrapped).
        dataloader: The training split read with the test pipeline.
        alpha (float): Weight of the class-aware values, in [0, 1] (1: purely class-aware; the thesis keeps its
            advantage through training with about 0.6).
        exits (Sequence[int], optional): 1-based early exits (default: every one with a trainable classifier).
        max_batches (int, optional): Bound on the batches read per rank.
        progress (bool): Progress bar.

    Returns:
        dict: ``exits`` (1-based), ``alpha``, ``empty_classes`` per exit.
    """
    from mmengine.model import is_model_wrapper
    model = model.module if is_model_wrapper(model) else model
    if not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f'alpha must be in [0, 1], got {alpha!r}')
    idx = class_aware_exits(model, exits)
    stats = gather_class_feature_stats(
        model,
        dataloader,
        len(idx),
        lambda inputs: classifier_inputs(model, inputs, idx),
        max_batches=max_batches,
        progress=progress)
    empty = []
    for p, i in enumerate(idx):
        empty.append(
            init_classifier_from_means(model.exits[i].conv_seg, stats.class_means(p), stats.counts[p], float(alpha),
                                       f'exit {i + 1}'))
    return dict(exits=[i + 1 for i in idx], alpha=float(alpha), empty_classes=empty)
