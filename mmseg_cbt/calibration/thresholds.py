"""Class based thresholds (CBT) and the pixel stop rules that use them.

Notation follows section 3 of the CBT paper (Görmez & Koyuncu, IEEE SPL 2024): N exits, K classes,
``p_{n,k}`` = mean softmax vector at exit ``n`` over the training pixels whose ground truth is ``k``.

* CBT (``share_exits=True``): ``P_k`` = mean over the exits of ``p_{n,k}`` ("information sharing"),
  margin ``T_k`` = largest minus second largest element of ``P_k``, then an *inverse* min-max map into
  ``[alpha, beta]``: the easiest class (largest margin) gets ``alpha``, the hardest gets ``beta``.
* CBT-ns (``share_exits=False``): the same, per exit, from ``p_{n,k}`` alone; one threshold vector per exit.

At inference a pixel stops at an exit when **any** class channel passes its own threshold
(``softmax_k > T_k`` for some ``k``, the OR of the K binary maps), which is the paper's rule; see
:func:`stop_mask_from_probs`.
"""
import math
import warnings
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

__all__ = [
    'CBTCalibrationWarning', 'MARGIN_EQUAL_TOL', 'cbt_thresholds', 'class_margins', 'stop_mask_from_probs',
    'global_stop_mask', 'entropy_stop_mask'
]

#: Two margins closer than this (absolute, in probability units) count as equal. The inverse min-max map
#: divides by ``max - min``; below this span the map would only amplify floating point noise.
MARGIN_EQUAL_TOL = 1e-12


class CBTCalibrationWarning(UserWarning):
    """Warning about a degenerate or surprising threshold calibration (lets users filter these alone)."""


def _check_alpha_beta(alpha: float, beta: float) -> None:
    """Raises ValueError unless ``0 < alpha <= beta <= 1`` (the message names both values)."""
    try:
        a, b = float(alpha), float(beta)
    except (TypeError, ValueError) as e:
        raise TypeError(f'alpha and beta must be numbers, got alpha={alpha!r}, beta={beta!r}') from e
    # `not (0 < x <= 1)` is also True for NaN, so NaN is rejected here too.
    if not (0.0 < a <= 1.0) or not (0.0 < b <= 1.0):
        raise ValueError(f'alpha and beta must both lie in (0, 1], got alpha={alpha!r}, beta={beta!r}')
    if a > b:
        raise ValueError(f'alpha must be <= beta (alpha goes to the easiest class, beta to the hardest), '
                         f'got alpha={alpha!r}, beta={beta!r}')


def _class_label(k: int, class_names: Optional[Sequence[str]]) -> str:
    return f'{k} ({class_names[k]})' if class_names is not None else str(k)


def class_margins(probs: Tensor) -> Tensor:
    """Top-1 minus top-2 of each probability vector along the last dimension.

    Args:
        probs (Tensor): ``(..., K)`` probability vectors, ``K >= 2``.

    Returns:
        Tensor: ``(...)`` margins, same dtype as ``probs``; a high margin means an easy (confident) class.
    """
    top2 = probs.topk(2, dim=-1).values
    return top2[..., 0] - top2[..., 1]


def _inverse_min_max(margins: Tensor, present: Tensor, alpha: float, beta: float, class_names: Optional[Sequence[str]],
                     where: str) -> Tensor:
    """Maps margins to thresholds in ``[alpha, beta]`` (largest margin -> alpha, smallest -> beta).

    Classes not ``present`` (no training pixels) get ``beta`` and are left out of the min/max.

    Args:
        margins (Tensor): ``(K,)`` float64 margins.
        present (Tensor): ``(K,)`` bool, True for classes that have training pixels.
        alpha (float): Threshold of the easiest class.
        beta (float): Threshold of the hardest class.
        class_names (Sequence[str], optional): For warning messages.
        where (str): Context for warning messages (e.g. ``' at exit 2'``).

    Returns:
        Tensor: ``(K,)`` float64 thresholds.
    """
    out = torch.full_like(margins, float(beta))
    missing = (~present).nonzero().flatten().tolist()
    if missing:
        # beta is the conservative end: a class we know nothing about must be very sure before it stops.
        names = ', '.join(_class_label(k, class_names) for k in missing)
        warnings.warn(
            f'CBT: classes with no training pixels{where}: {names}; they get beta={beta} and are left out '
            f'of the min/max normalisation.',
            CBTCalibrationWarning,
            stacklevel=3)
    if not bool(present.any()):
        return out
    known = margins[present]
    lo, hi = known.min(), known.max()
    span = float(hi - lo)
    if span <= MARGIN_EQUAL_TOL:
        # The inverse min-max map is 0/0 here; no class is easier than another, so all get the conservative
        # end rather than an arbitrary point of the range.
        warnings.warn(
            f'CBT: all class margins are equal{where} (max - min = {span:.3g}); the min-max map is undefined, '
            f'every class gets beta={beta}.',
            CBTCalibrationWarning,
            stacklevel=3)
        return out
    rel = (margins - lo) / span  # 0 = hardest, 1 = easiest
    mapped = (1.0 - rel) * (float(beta) - float(alpha)) + float(alpha)
    # Rounding may leave the end points an ulp outside [alpha, beta]; clamp so alpha/beta are hit exactly.
    mapped = mapped.clamp(min=float(alpha), max=float(beta))
    out[present] = mapped[present]
    return out


def cbt_thresholds(class_mean_probs: Tensor,
                   alpha: float,
                   beta: float,
                   share_exits: bool = True,
                   counts: Optional[Tensor] = None,
                   class_names: Optional[Sequence[str]] = None) -> Tensor:
    """Computes class based thresholds (CBT, or CBT-ns when ``share_exits=False``).

    Degenerate cases are defined rather than left to arithmetic:

    * ``alpha == beta``: every class gets that value (ADP-C's single global threshold); the statistics are
      then not consulted beyond their shape, and no warnings about them are issued.
    * classes with no training pixels get ``beta`` (with a :class:`CBTCalibrationWarning` naming them) and
      do not take part in the min/max.
    * all margins equal among the classes with pixels (including a single such class): every class gets
      ``beta`` (with a warning).
    * ``alpha <= 0.5`` (and ``alpha < beta``): a warning that the OR-of-channels rule and the argmax rule can
      then disagree; this package uses the OR-of-channels rule (:func:`stop_mask_from_probs`). For
      ``alpha > 0.5`` they agree: at most one channel can exceed a threshold above one half, and it is
      the argmax.

    All threshold math runs in float64; the result is float32.

    Args:
        class_mean_probs (Tensor): ``(N, K, K)``; row ``k`` of exit ``n`` is the mean softmax vector at exit
            ``n`` over training pixels whose ground truth is ``k`` (as given by
            :meth:`ClassProbStats.class_mean_probs`).
        alpha (float): Threshold of the easiest class, in ``(0, 1]``.
        beta (float): Threshold of the hardest class, in ``[alpha, 1]``.
        share_exits (bool): True for CBT (one vector from the exit-averaged means), False for CBT-ns
            (one vector per exit). Defaults to True.
        counts (Tensor, optional): ``(K,)`` or ``(N, K)`` training pixel counts; a zero marks a class with no
            training pixels (at that exit). If None, an all-zero row of ``class_mean_probs`` marks one (that
            is what :meth:`ClassProbStats.class_mean_probs` gives for such classes). With CBT and per-exit
            counts, ``P_k`` averages only the exits where class ``k`` has pixels.
        class_names (Sequence[str], optional): ``K`` names, used in warning messages.

    Returns:
        Tensor: float32 thresholds, ``(K,)`` when ``share_exits`` else ``(N, K)``.

    Raises:
        ValueError: If alpha/beta are out of range or ``alpha > beta``, if ``class_mean_probs`` is not
            ``(N, K, K)`` with ``N >= 1``, ``K >= 2`` or is not finite, or if ``counts``/``class_names`` do not
            match it.
    """
    _check_alpha_beta(alpha, beta)
    alpha, beta = float(alpha), float(beta)
    probs = torch.as_tensor(class_mean_probs).detach().to(device='cpu', dtype=torch.float64)
    if probs.ndim != 3 or probs.shape[1] != probs.shape[2]:
        raise ValueError(f'class_mean_probs must have shape (N exits, K classes, K), got {tuple(probs.shape)}')
    num_exits, num_classes = probs.shape[0], probs.shape[1]
    if num_exits < 1 or num_classes < 2:
        raise ValueError(f'class_mean_probs needs N >= 1 exits and K >= 2 classes (a margin needs two '
                         f'classes), got shape {tuple(probs.shape)}')
    if not bool(torch.isfinite(probs).all()):
        raise ValueError('class_mean_probs contains NaN or infinite values')
    if class_names is not None and len(class_names) != num_classes:
        raise ValueError(f'class_names has {len(class_names)} entries but class_mean_probs has K={num_classes}')

    if counts is None:
        has_pixels = (probs != 0).any(dim=2)  # (N, K)
    else:
        counts_t = torch.as_tensor(counts).detach().cpu()
        if counts_t.shape == (num_classes, ):
            counts_t = counts_t.unsqueeze(0).expand(num_exits, num_classes)
        elif counts_t.shape != (num_exits, num_classes):
            raise ValueError(f'counts must have shape (K,) = ({num_classes},) or (N, K) = '
                             f'({num_exits}, {num_classes}), got {tuple(counts_t.shape)}')
        if bool((counts_t < 0).any()):
            raise ValueError('counts must be non-negative')
        has_pixels = counts_t > 0

    if alpha == beta:
        return torch.full((num_classes, ) if share_exits else (num_exits, num_classes), alpha, dtype=torch.float32)

    if alpha <= 0.5:
        warnings.warn(
            f'CBT: alpha={alpha} <= 0.5, so the OR-of-channels rule (stop if any class k has '
            f'softmax_k > T_k) and the argmax rule (stop if softmax_argmax > T_argmax) can differ: a '
            f'non-argmax class may pass its low threshold. This model uses the OR-of-channels rule, the '
            f'paper\'s rule.',
            CBTCalibrationWarning,
            stacklevel=2)

    if share_exits:
        weights = has_pixels.to(torch.float64)  # (N, K): average only the exits that saw the class
        n_seen = weights.sum(0)  # (K,)
        shared = (probs * weights.unsqueeze(2)).sum(0) / n_seen.clamp(min=1).unsqueeze(1)  # (K, K)
        out = _inverse_min_max(class_margins(shared), n_seen > 0, alpha, beta, class_names, '')
    else:
        margins = class_margins(probs)  # (N, K)
        rows = []
        for n in range(num_exits):  # a plain loop (not a comprehension) keeps the warnings' stacklevel right
            rows.append(_inverse_min_max(margins[n], has_pixels[n], alpha, beta, class_names, f' at exit {n}'))
        out = torch.stack(rows)
    return out.to(torch.float32)


def _check_probs(probs: Tensor) -> None:
    if not isinstance(probs, Tensor) or probs.ndim != 4:
        shape = tuple(probs.shape) if isinstance(probs, Tensor) else type(probs).__name__
        raise ValueError(f'probs must be a (B, K, H, W) tensor of softmax probabilities, got {shape}')


def stop_mask_from_probs(probs: Tensor, thresholds: Union[Tensor, Sequence[float]]) -> Tensor:
    """CBT stop rule: a pixel stops when any class channel exceeds its own threshold.

    ``stop[b, h, w] = OR_k (probs[b, k, h, w] > thresholds[k])`` (strict ``>``). This is the paper's rule. For
    thresholds all above 0.5 it equals "the argmax class passes its threshold"; below that a non-argmax
    class may pass and stop the pixel (see :func:`cbt_thresholds`). For CBT-ns pass the row of the current
    exit.

    The comparison runs in the promoted dtype of ``probs`` and ``thresholds`` (float32 for float16 probs),
    so a threshold is never rounded to a coarser dtype.

    Args:
        probs (Tensor): ``(B, K, H, W)`` softmax probabilities.
        thresholds (Tensor | Sequence[float]): ``(K,)`` per-class thresholds.

    Returns:
        Tensor: ``(B, H, W)`` bool, True where the pixel stops.
    """
    _check_probs(probs)
    thr = torch.as_tensor(thresholds, device=probs.device)
    if not thr.is_floating_point():
        thr = thr.to(torch.float32)
    if thr.shape != (probs.shape[1], ):
        raise ValueError(f'thresholds must have shape (K,) = ({probs.shape[1]},), got {tuple(thr.shape)}')
    return (probs > thr.view(1, -1, 1, 1)).any(dim=1)


def global_stop_mask(probs: Tensor, threshold: float) -> Tensor:
    """ADP-C's confidence rule: a pixel stops when its largest softmax probability exceeds ``threshold``.

    Equal to :func:`stop_mask_from_probs` with the same value for every class.

    Args:
        probs (Tensor): ``(B, K, H, W)`` softmax probabilities.
        threshold (float): The single threshold (ADP-C uses 0.998).

    Returns:
        Tensor: ``(B, H, W)`` bool, True where the pixel stops (strict ``>``).
    """
    _check_probs(probs)
    return probs.amax(dim=1) > threshold


def entropy_stop_mask(probs: Tensor, threshold: float) -> Tensor:
    """Entropy rule: a pixel stops when its normalised entropy is below ``threshold`` (it is certain).

    The normalised entropy ``H / log K`` lies in ``[0, 1]``: 0 for a one-hot vector, 1 for the uniform one.
    ``0 log 0`` is taken as 0. Computed in float32 (or float64 for float64 input).

    Args:
        probs (Tensor): ``(B, K, H, W)`` softmax probabilities, ``K >= 2``.
        threshold (float): Normalised entropy threshold, typically small (e.g. 0.01).

    Returns:
        Tensor: ``(B, H, W)`` bool, True where the pixel stops (strict ``<``).
    """
    _check_probs(probs)
    num_classes = probs.shape[1]
    if num_classes < 2:
        raise ValueError(f'entropy_stop_mask needs K >= 2 classes, got K={num_classes}')
    p = probs if probs.dtype == torch.float64 else probs.float()
    entropy = -torch.special.xlogy(p, p).sum(dim=1)
    return entropy / math.log(num_classes) < threshold
