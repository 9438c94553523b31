"""Precision-targeted class thresholds (``cbt-precision``): exact confidence histograms and the thresholds they give.

A pixel that stops at an early exit keeps that exit's prediction, so the error stopping causes is the error of the
pixels that stop. This calibration chooses, per exit ``n`` and predicted class ``k``, the lowest threshold ``T_{n,k}``
at which the training pixels that would stop as class ``k`` (max softmax ``> T_{n,k}``, argmax ``k``) are correct with
at least a target precision, then clips it into ``[alpha, beta]``. Like CBT (Görmez & Koyuncu, IEEE SPL 2024) it is
one threshold per class, read by the same OR-of-channels stop rule
(:func:`~mmseg_cbt.calibration.stop_mask_from_probs`); unlike CBT's min-max map of class margins it has one
parameter with a meaning: the precision of the stopped pixels.

Statistics
----------
:class:`PrecisionStats` keeps, per exit, predicted class and outcome (wrong / correct), an int64 histogram of the max
softmax over ``B`` fixed bins. Integer sums are exact in any order, so any split of the data over ranks (summed with
:meth:`PrecisionStats.all_reduce`) gives bit-for-bit the same histograms and thresholds.

* Bins are left-open, ``(b / B, (b + 1) / B]`` (confidence 0 goes to bin 0), and ``B`` is a power of two. Then
  ``c * B`` and the edges ``e / B`` are exact in float32, so "bins ``>= e``" is exactly the set ``c > e / B`` that the
  strict stop rule ``softmax > T`` stops at ``T = e / B``: no pixel is on the wrong side of an edge.
* The prediction is the argmax of the logits (what the segmentor predicts), the confidence the max of the float32
  softmax of the whole exit tensor, as the stop rule computes it. Wherever the confidence exceeds 0.5 the two agree.
* Thresholds below 0.5 are refused (``alpha >= 0.5``): only above one half does the OR-of-channels rule stop exactly
  the pixels whose argmax passes its threshold, which is what the histograms describe.
"""
import warnings
from typing import Any, Dict, List, Optional, Sequence, Union

import torch
from torch import Tensor

from .exit_stats import ExactExitStats
from .thresholds import CBTCalibrationWarning

__all__ = [
    'PRECISION_METHOD', 'DEFAULT_PRECISION_BINS', 'PrecisionStats', 'confidence_bins', 'check_precision_options',
    'precision_thresholds'
]

#: Name of this calibration method (beside CBT's min-max map of class margins).
PRECISION_METHOD = 'cbt-precision'
#: Default number of confidence bins (resolution 2**-12 near 1, where high thresholds live).
DEFAULT_PRECISION_BINS = 4096


def _check_bins(num_bins) -> int:
    if isinstance(num_bins, bool) or not isinstance(num_bins, int) or num_bins < 2 or num_bins & (num_bins - 1):
        raise ValueError(f'num_bins must be a power of two >= 2 (bin edges exact in float32), got {num_bins!r}')
    return num_bins


def check_precision_options(target: float, alpha: float, beta: float) -> None:
    """Checks the parameters of :func:`precision_thresholds` before any work.

    Args:
        target (float): Target precision of the stopped pixels, in (0, 1].
        alpha (float): Lowest threshold, in [0.5, 1].
        beta (float): Highest threshold, in [alpha, 1].

    Raises:
        ValueError: Naming the parameter, its value and the allowed range.
    """
    values = dict(target=target, alpha=alpha, beta=beta)
    for key, value in values.items():
        try:
            values[key] = float(value)
        except (TypeError, ValueError):
            raise ValueError(f'{key} must be a number, got {value!r}') from None
    if not 0.0 < values['target'] <= 1.0:  # NaN fails too
        raise ValueError(f'target precision must be in (0, 1], got {target!r}')
    if not 0.5 <= values['alpha'] <= 1.0:
        raise ValueError(f'alpha must be in [0.5, 1] (below 0.5 the OR-of-channels stop rule can stop a pixel on a '
                         f'class that is not its argmax), got {alpha!r}')
    if not values['alpha'] <= values['beta'] <= 1.0:
        raise ValueError(f'beta must be in [alpha, 1] = [{values["alpha"]:g}, 1], got {beta!r}')


def confidence_bins(conf: Tensor, num_bins: int) -> Tensor:
    """Bin index of confidences in ``[0, 1]`` over left-open bins ``(b / B, (b + 1) / B]``.

    Args:
        conf (Tensor): Float confidences (max softmax).
        num_bins (int): ``B``, a power of two.

    Returns:
        Tensor: int64 indices in ``[0, B)``; index ``>= e`` exactly when ``conf > e / B``.
    """
    _check_bins(num_bins)
    # times a power of two is exact, so ceil() puts a value equal to an edge into the bin below it
    return (conf * num_bins).ceil_().sub_(1).clamp_(0, num_bins - 1).to(torch.int64)


class PrecisionStats(ExactExitStats):
    """Per exit, per predicted class, wrong / correct histograms of the max softmax; exact and mergeable.

    Shape of the histogram: ``(N exits, K classes, 2, B bins)`` int64, index 0 of the third axis = wrong, 1 = correct.
    ``num_exits`` / ``num_classes`` may be given up front (needed when some distributed rank may see no batch) or
    are taken from the first :meth:`update`.

    Args:
        num_exits (int, optional): Number of exits N.
        num_classes (int, optional): Number of classes K.
        num_bins (int): Confidence bins B, a power of two. Defaults to :data:`DEFAULT_PRECISION_BINS`.
        ignore_index (int): Label excluded from the statistics; labels outside ``[0, K)`` are excluded too.
            Defaults to 255.
    """

    min_classes = 2

    def __init__(self,
                 num_exits: Optional[int] = None,
                 num_classes: Optional[int] = None,
                 num_bins: int = DEFAULT_PRECISION_BINS,
                 ignore_index: int = 255) -> None:
        self.num_bins = _check_bins(num_bins)
        self._hist: Optional[Tensor] = None
        super().__init__(num_exits, num_classes, ignore_index)

    def _allocate(self, num_exits: int, num_classes: int) -> None:
        self._hist = torch.zeros(num_exits, num_classes, 2, self.num_bins, dtype=torch.int64)

    def _tensors(self) -> List[Tensor]:
        return [self._hist]

    def _extra_shape(self) -> List[int]:
        return [self.num_bins]

    @property
    def histogram(self) -> Tensor:
        """Tensor: ``(N, K, 2, B)`` int64 counts [exit, predicted class, wrong/correct, bin] (a copy)."""
        self._require_initialized()
        return self._hist.clone()

    @property
    def num_pixels(self) -> int:
        """int: Labelled pixels counted (the same pixels at every exit)."""
        self._require_initialized()
        return int(self._hist[0].sum())

    @torch.no_grad()
    def update(self, exit_logits: Sequence[Tensor], labels: Tensor) -> None:
        """Adds one batch.

        Args:
            exit_logits (Sequence[Tensor]): N tensors ``(B, K, H, W)``, one per exit, at the labels' size (as
                :meth:`EarlyExitEncoderDecoder.restore_logits` gives them).
            labels (Tensor): ``(B, H, W)`` (or ``(B, 1, H, W)``) integer ground truth.

        Raises:
            ValueError: If the number of exits, K or the shapes disagree with each other, the labels or earlier
                updates.
        """
        exit_logits, labels = self._check_batch(exit_logits, labels)
        num_classes = exit_logits[0].shape[1]
        valid = self._valid_labels(labels)
        labels = labels[valid]
        cells = num_classes * 2 * self.num_bins
        for n, logit in enumerate(exit_logits):
            # the whole tensor's softmax, as the stop rule takes it
            conf = self.exit_probs(n, logit).amax(dim=1)[valid]
            pred = logit.argmax(dim=1)[valid]
            index = (pred * 2 + (pred == labels).long()) * self.num_bins + confidence_bins(conf, self.num_bins)
            self._hist[n] += torch.bincount(index, minlength=cells).view(num_classes, 2, self.num_bins).cpu()

    def merge(self, other: 'PrecisionStats') -> 'PrecisionStats':
        """Adds another instance's histograms into this one (in-process equivalent of :meth:`all_reduce`).

        Args:
            other (PrecisionStats): Histograms over other pixels, same N, K and B (or empty).

        Returns:
            PrecisionStats: ``self``, for chaining.
        """
        if isinstance(other, PrecisionStats) and other.num_bins != self.num_bins:
            raise ValueError(f'cannot merge {other.num_bins} bins into {self.num_bins}')
        return super().merge(other)

    def state_dict(self) -> Dict[str, Any]:
        """Exact state (for ``torch.save``): ``num_bins``, ``ignore_index`` and ``histogram`` (N, K, 2, B) int64."""
        self._require_initialized()
        return dict(num_bins=self.num_bins, ignore_index=self.ignore_index, histogram=self._hist.clone())

    @classmethod
    def from_state_dict(cls, state: Dict[str, Any]) -> 'PrecisionStats':
        """Rebuilds an instance from :meth:`state_dict`."""
        hist = torch.as_tensor(state['histogram'], dtype=torch.int64).cpu()
        if hist.ndim != 4 or hist.shape[2] != 2 or hist.shape[3] != int(state['num_bins']):
            raise ValueError(f'histogram must have shape (N, K, 2, num_bins={state["num_bins"]}), '
                             f'got {tuple(hist.shape)}')
        obj = cls(hist.shape[0], hist.shape[1], int(state['num_bins']), int(state['ignore_index']))
        obj._hist.copy_(hist)
        return obj

    def __repr__(self) -> str:
        if not self.initialized:
            return f'{type(self).__name__}(empty, num_bins={self.num_bins}, ignore_index={self.ignore_index})'
        return (f'{type(self).__name__}(num_exits={self.num_exits}, num_classes={self.num_classes}, '
                f'num_bins={self.num_bins}, pixels={self.num_pixels}, ignore_index={self.ignore_index})')


def precision_thresholds(stats: Union[PrecisionStats, Tensor],
                         target: float,
                         alpha: float = 0.5,
                         beta: float = 1.0,
                         share_exits: bool = False,
                         class_names: Optional[Sequence[str]] = None) -> Tensor:
    """Per exit and class, the lowest bin edge at which the pixels that stop there are precise enough.

    For exit ``n`` and class ``k``: ``T = e / B`` for the smallest edge ``e`` in ``0..B-1`` such that, of the
    training pixels predicted as ``k`` with confidence ``> e / B`` (bins ``>= e``), at least a fraction ``target`` are
    correct (``correct >= target * total`` in float64, ``total > 0``); then clipped into ``[alpha, beta]``. The
    stopped sets are nested, so this is the largest set of class-``k`` pixels with that precision. A class for which
    no edge qualifies (never predicted, or never that precise) gets ``beta``, with a :class:`CBTCalibrationWarning`
    naming it. The clip may move the precision of the stopped set either way.

    Args:
        stats (PrecisionStats | Tensor): The statistics or their ``(N, K, 2, B)`` histogram.
        target (float): Target precision in (0, 1].
        alpha (float): Lowest threshold, in [0.5, 1]. Defaults to 0.5.
        beta (float): Highest threshold, in [alpha, 1]. Defaults to 1.
        share_exits (bool): One vector for all exits, from the histograms summed over the exits. Defaults to False
            (one vector per exit).
        class_names (Sequence[str], optional): K names, used in warnings.

    Returns:
        Tensor: float32 thresholds, ``(N, K)`` (or ``(K,)`` when ``share_exits``).
    """
    check_precision_options(target, alpha, beta)
    hist = stats.histogram if isinstance(stats, PrecisionStats) else torch.as_tensor(stats)
    if hist.ndim != 4 or hist.shape[2] != 2 or hist.is_floating_point():
        raise ValueError(f'the histogram must be an integer (N, K, 2, B) tensor, got {hist.dtype} '
                         f'{tuple(hist.shape)}')
    num_bins = _check_bins(int(hist.shape[3]))
    if class_names is not None and len(class_names) != hist.shape[1]:
        raise ValueError(f'class_names has {len(class_names)} entries but the histogram has K={hist.shape[1]}')
    hist = hist.to(device='cpu', dtype=torch.int64)
    if share_exits:
        hist = hist.sum(dim=0, keepdim=True)
    tail = hist.flip(-1).cumsum(-1).flip(-1)  # [..., e] = pixels in bins >= e, i.e. confidence > e / B
    correct, total = tail[:, :, 1], tail[:, :, 0] + tail[:, :, 1]
    ok = (total > 0) & (correct.double() >= float(target) * total.double())
    first = ok.long().argmax(dim=-1)  # first qualifying edge
    thr = first.double() / num_bins
    missing = ~ok.any(dim=-1)
    thr[missing] = float(beta)
    if bool(missing.any()):
        parts = []
        for n in range(thr.shape[0]):
            ks = missing[n].nonzero().flatten().tolist()
            if ks:
                names = ', '.join(f'{k} ({class_names[k]})' if class_names is not None else str(k) for k in ks)
                parts.append(names if share_exits else f'exit {n}: {names}')
        warnings.warn(
            f'{PRECISION_METHOD}: no confidence reaches precision {target:g} for: {"; ".join(parts)}; '
            f'they get beta={beta:g}',
            CBTCalibrationWarning,
            stacklevel=2)
    thr = thr.clamp(min=float(alpha), max=float(beta)).to(torch.float32)
    return thr[0] if share_exits else thr
