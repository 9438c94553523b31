"""Exact per-class feature statistics (class means) for E2CM exits and class-aware exit initialisation.

:class:`ClassFeatureStats` gathers, for every *point* (an exit point, i.e. the feature map an exit reads) and every
ground-truth class ``k``, the sum of the feature vectors of the training pixels labelled ``k``, their count, and
the sum of their squared norms. The class means ``M_k = sum / count`` are the E2CM exits of Görmez, Dasari and
Koyuncu (IJCNN 2022) and the weights of class-aware exit initialisation; the squared norms give the within-class
spread from which a softmax temperature is fitted (:meth:`ClassFeatureStats.fitted_temperature`).

Exactness across ranks
----------------------
Feature values are rounded to multiples of ``2**-FEATURE_FRAC_BITS`` (``2**-16``, about 1.5e-5) and summed as
int64 counts of that unit, so one pass, several ranks (:meth:`ClassFeatureStats.all_reduce`) or any batch order
give bit-for-bit the same sums, means and counts. Bounds (checked, OverflowError / ValueError beyond them):

* every feature value must satisfy ``|x| < MAX_ABS_FEATURE = 2**16``; each is stored within ``2**-17`` of its
  float32 value, hence every mean is within ``2**-17`` (7.6e-6) of the exact mean of the float32 features;
* at most ``MAX_FEATURE_PIXELS_PER_CLASS = 2**30`` (1.07e9) feature-map pixels per class and point, so a sum stays
  below ``2**30 * 2**16 * 2**16 = 2**62``. (Cityscapes' whole training split at the 1/4 feature resolution is
  3.9e8 pixels.)

The squared norms feed only the temperature: they are float64 sums of the float32 squared norms, all-reduced as
float64; their relative error is at most ``n * 2**-53`` for ``n`` pixels (below 1.2e-7 for ``n <= 2**30``), so a
fitted temperature agrees between any split over ranks to about 7 significant digits, not bit for bit.

Labels meet features on the feature map: the ground truth (at ``ori_shape``, or already at ``img_shape``) is
flipped as the image was, resized with nearest to ``img_shape``, padded with ``ignore_index`` as the batch was,
then resized with nearest to each feature map (:func:`labels_on_feature_map`).
"""
from typing import Callable, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from mmseg_cbt.utils.meta import meta_padding

__all__ = [
    'FEATURE_FRAC_BITS', 'MAX_ABS_FEATURE', 'MAX_FEATURE_PIXELS_PER_CLASS', 'ClassFeatureStats',
    'labels_on_feature_map', 'backbone_exit_features', 'gather_class_feature_stats'
]

#: Fractional bits of the fixed-point feature sums.
FEATURE_FRAC_BITS = 16
_SCALE = float(2**FEATURE_FRAC_BITS)
#: Every feature value must be smaller than this in magnitude (so a count-bounded sum fits in int64).
MAX_ABS_FEATURE = float(2**16)
#: Largest per-class pixel count (per point) of the fixed-point sums.
MAX_FEATURE_PIXELS_PER_CLASS = 2**30
#: Pixels per chunk of the int64 conversion and summation (bounds the scratch memory; any value gives the same sums).
_CHUNK_PIXELS = 2**14


class ClassFeatureStats:
    """Per point and ground-truth class: fixed-point feature sums, pixel counts and squared-norm sums.

    Shapes per point ``p``: sums ``(K, C_p)`` int64 in units of ``2**-FEATURE_FRAC_BITS``; counts ``(K,)`` int64;
    squared norms ``(K,)`` float64. The widths ``C_p`` are taken from the first update of each point (or from
    the other ranks in :meth:`all_reduce`, for a rank that saw no batch).

    Args:
        num_points (int): Number of feature points (e.g. exit points).
        num_classes (int): Number of classes K.
        ignore_index (int): Label excluded from the statistics (labels outside ``[0, K)`` are excluded too).
    """

    def __init__(self, num_points: int, num_classes: int, ignore_index: int = 255) -> None:
        if int(num_points) < 1 or int(num_classes) < 1:
            raise ValueError(f'num_points and num_classes must be >= 1, got {num_points} and {num_classes}')
        self.num_points = int(num_points)
        self.num_classes = int(num_classes)
        self.ignore_index = int(ignore_index)
        self._sums: List[Optional[Tensor]] = [None] * self.num_points
        self.counts = torch.zeros(self.num_points, self.num_classes, dtype=torch.int64)
        self.sq_norms = torch.zeros(self.num_points, self.num_classes, dtype=torch.float64)

    @property
    def channels(self) -> List[Optional[int]]:
        """list[int | None]: Feature width of every point (None before its first update)."""
        return [None if s is None else int(s.shape[1]) for s in self._sums]

    def fixed_point_sums(self, point: int) -> Tensor:
        """(K, C) int64 sums of point ``point`` in units of ``2**-FEATURE_FRAC_BITS`` (a copy)."""
        self._require(point)
        return self._sums[point].clone()

    def _require(self, point: int) -> None:
        if not 0 <= point < self.num_points:
            raise IndexError(f'point must be in [0, {self.num_points}), got {point}')
        if self._sums[point] is None:
            raise RuntimeError(f'ClassFeatureStats: point {point} has no statistics yet (no update)')

    def _valid_labels(self, labels: Tensor) -> Tensor:
        """Labels with every excluded pixel (ignore, outside [0, K)) mapped to K (an extra row dropped later)."""
        k = self.num_classes
        valid = (labels >= 0) & (labels < k)
        if 0 <= self.ignore_index < k:
            valid &= labels != self.ignore_index
        return torch.where(valid, labels, torch.full_like(labels, k))

    @torch.no_grad()
    def update(self, point: int, features: Tensor, labels: Tensor) -> None:
        """Adds one batch of one point.

        Args:
            point (int): The point (0-based).
            features (Tensor): (B, C, h, w) features, any float dtype (rounded from float32).
            labels (Tensor): (B, h, w) or (B, 1, h, w) integer labels on the same map.

        Raises:
            ValueError: Mismatched shapes, a width other than this point's earlier one, non-finite features or a
                value beyond :data:`MAX_ABS_FEATURE`.
            OverflowError: A class beyond :data:`MAX_FEATURE_PIXELS_PER_CLASS` pixels.
        """
        if not 0 <= point < self.num_points:
            raise IndexError(f'point must be in [0, {self.num_points}), got {point}')
        if features.ndim != 4 or not features.is_floating_point():
            raise ValueError(f'features must be a floating (B, C, h, w) tensor, got {tuple(features.shape)} '
                             f'{features.dtype} at point {point}')
        if labels.ndim == 4 and labels.shape[1] == 1:
            labels = labels[:, 0]
        b, c, h, w = features.shape
        if tuple(labels.shape) != (b, h, w):
            raise ValueError(f'labels have shape {tuple(labels.shape)}, expected {(b, h, w)} to match the '
                             f'features {tuple(features.shape)} at point {point}')
        if labels.is_floating_point() or labels.dtype == torch.bool:
            raise ValueError(f'labels must be an integer tensor, got {labels.dtype}')
        width = self.channels[point]
        if width is not None and width != c:
            raise ValueError(f'point {point}: features have {c} channels, earlier batches had {width}')
        x = features.detach().float().permute(0, 2, 3, 1).reshape(-1, c)
        if not bool(torch.isfinite(x).all()):
            raise ValueError(f'point {point}: the features hold NaN or infinite values')
        peak = float(x.abs().max()) if x.numel() else 0.0
        if peak >= MAX_ABS_FEATURE:
            raise ValueError(f'point {point}: a feature value of magnitude {peak:g} exceeds the fixed-point bound '
                             f'{MAX_ABS_FEATURE:g} of the class-mean statistics')
        lab = self._valid_labels(labels.to(x.device, torch.int64).reshape(-1))
        k = self.num_classes
        batch_counts = torch.bincount(lab, minlength=k + 1)[:k].cpu()
        if int((self.counts[point] + batch_counts).max()) > MAX_FEATURE_PIXELS_PER_CLASS:
            raise OverflowError(f'point {point}: a class would exceed {MAX_FEATURE_PIXELS_PER_CLASS} pixels, the '
                                'int64 fixed-point limit of the class-mean statistics')
        sums = torch.zeros(k + 1, c, dtype=torch.int64, device=x.device)
        sq = torch.zeros(k + 1, dtype=torch.float64, device=x.device)
        for start in range(0, x.shape[0], _CHUNK_PIXELS):
            rows, rl = x[start:start + _CHUNK_PIXELS], lab[start:start + _CHUNK_PIXELS]
            # power-of-two scaling and round-half-to-even are exact in float32, the int64 sums in any order
            sums.index_add_(0, rl, (rows * _SCALE).round_().to(torch.int64))
            sq.index_add_(0, rl, rows.square().sum(dim=1).double())
        if self._sums[point] is None:
            self._sums[point] = torch.zeros(k, c, dtype=torch.int64)
        self._sums[point] += sums[:k].cpu()
        self.sq_norms[point] += sq[:k].cpu()
        self.counts[point] += batch_counts

    def merge(self, other: 'ClassFeatureStats') -> 'ClassFeatureStats':
        """Adds another instance's statistics (same points and classes) into this one; returns ``self``."""
        if (other.num_points, other.num_classes) != (self.num_points, self.num_classes):
            raise ValueError(f'cannot merge statistics of {other.num_points} points / K={other.num_classes} into '
                             f'{self.num_points} points / K={self.num_classes}')
        for p, theirs in enumerate(other._sums):
            if theirs is None:
                continue
            if self._sums[p] is None:
                self._sums[p] = torch.zeros_like(theirs)
            elif self._sums[p].shape != theirs.shape:
                raise ValueError(f'point {p}: widths differ ({self._sums[p].shape[1]} vs {theirs.shape[1]})')
            self._sums[p] += theirs
        self.counts += other.counts
        self.sq_norms += other.sq_norms
        return self

    def all_reduce(self) -> 'ClassFeatureStats':
        """Sums the statistics over all distributed ranks, in place (no-op when not distributed).

        The widths are agreed first (a rank without a batch takes the others'; ranks with different widths raise
        on every rank), then the int64 sums and counts are all-reduced (exact) and the float64 squared norms.
        Every rank must call it exactly once per gathering.

        Returns:
            ClassFeatureStats: ``self``.
        """
        from mmengine import dist
        if dist.get_world_size() <= 1:
            return self
        widths = torch.tensor([-1 if c is None else c for c in self.channels], dtype=torch.int64)
        big = torch.iinfo(torch.int64).max
        hi, lo = widths.clone(), torch.where(widths < 0, torch.full_like(widths, big), widths).neg()
        dist.all_reduce(hi, op='max')
        dist.all_reduce(lo, op='max')  # -> -(min over ranks that saw the point)
        for p in range(self.num_points):
            top, low = int(hi[p]), -int(lo[p])
            if top < 0:
                raise RuntimeError(f'ClassFeatureStats.all_reduce: no rank saw point {p}')
            if top != low:
                raise RuntimeError(f'ClassFeatureStats.all_reduce: ranks disagree on the width of point {p} '
                                   f'({low} vs {top})')
            if self._sums[p] is None:
                self._sums[p] = torch.zeros(self.num_classes, top, dtype=torch.int64)
            dist.all_reduce(self._sums[p], op='sum')
        dist.all_reduce(self.counts, op='sum')
        dist.all_reduce(self.sq_norms, op='sum')
        if int(self.counts.max()) > MAX_FEATURE_PIXELS_PER_CLASS:
            raise OverflowError(f'after all_reduce a class has more than {MAX_FEATURE_PIXELS_PER_CLASS} pixels')
        return self

    # ------------------------------------------------------------------ results
    def class_means(self, point: int) -> Tensor:
        """(K, C) float64 mean feature of every class at ``point``; rows of classes without pixels are 0."""
        self._require(point)
        sums = self._sums[point].to(torch.float64) * (1.0 / _SCALE)  # exact: a power of two
        return sums / self.counts[point].clamp(min=1).to(torch.float64).unsqueeze(1)

    def within_class_sq_distance(self, point: int) -> float:
        """Mean over the counted pixels of ``||x - M_{label(x)}||^2`` at ``point`` (from the same single pass:
        ``sum ||x||^2 - ||sum x||^2 / n`` per class)."""
        self._require(point)
        n = self.counts[point].to(torch.float64)
        total = float(n.sum())
        if total == 0:
            raise ValueError(f'point {point}: no labelled pixel, the within-class spread is undefined')
        sums = self._sums[point].to(torch.float64) * (1.0 / _SCALE)
        spread = self.sq_norms[point] - sums.square().sum(dim=1) / n.clamp(min=1)
        return max(float(spread.clamp(min=0).sum()) / total, 0.0)

    def fitted_temperature(self, point: int) -> float:
        """The temperature ``T`` of ``softmax(-||x - M_k||^2 / T)`` under an isotropic Gaussian model of every
        class (shared variance ``s^2`` per dimension, equal priors): the Bayes posterior is that softmax with
        ``T = 2 s^2``, and ``s^2`` is estimated as the within-class mean squared distance divided by the width C.
        Never below 1e-6 (features identical within every class)."""
        c = self.channels[point]
        return max(2.0 * self.within_class_sq_distance(point) / float(c), 1e-6)


def labels_on_feature_map(label: Tensor, meta: dict, input_hw: Sequence[int], feat_hw: Sequence[int],
                          ignore_index: int) -> Tensor:
    """One image's ground truth brought onto a feature map of the batch it was fed in.

    Args:
        label (Tensor): (1, H0, W0) or (H0, W0) integer labels (at ``ori_shape`` or already at ``img_shape``).
        meta (dict): The image's meta information (``img_shape``, ``padding_size`` / ``img_padding_size``,
            ``flip``, ``flip_direction``).
        input_hw (Sequence[int]): The (padded) network input size.
        feat_hw (Sequence[int]): The feature map size.
        ignore_index (int): Label of padded pixels.

    Returns:
        Tensor: (h, w) int64 labels, nearest-resized.
    """
    lab = label.reshape(label.shape[-2:]).to(torch.float32)[None, None]  # labels < 2**24: exact in float32
    if meta.get('flip', False):
        direction = meta.get('flip_direction', None)
        if direction not in ('horizontal', 'vertical'):
            raise ValueError(f'unknown flip_direction {direction!r}')
        lab = lab.flip(dims=(3, ) if direction == 'horizontal' else (2, ))
    img_hw = tuple(int(s) for s in meta.get('img_shape', lab.shape[2:])[:2])
    if tuple(lab.shape[2:]) != img_hw:
        lab = F.interpolate(lab, size=img_hw, mode='nearest')
    left, right, top, bottom = meta_padding(meta)
    if left or right or top or bottom:
        lab = F.pad(lab, (left, right, top, bottom), value=float(ignore_index))
    in_hw = tuple(int(s) for s in input_hw)
    if tuple(lab.shape[2:]) != in_hw:  # batch padding beyond the recorded one (bottom/right)
        dh, dw = in_hw[0] - lab.shape[2], in_hw[1] - lab.shape[3]
        if dh < 0 or dw < 0:
            raise ValueError(f'label of size {tuple(lab.shape[2:])} does not fit the input {in_hw}')
        lab = F.pad(lab, (0, dw, 0, dh), value=float(ignore_index))
    out_hw = tuple(int(s) for s in feat_hw)
    if tuple(lab.shape[2:]) != out_hw:
        lab = F.interpolate(lab, size=out_hw, mode='nearest')
    return lab[0, 0].to(torch.int64)


def backbone_exit_features(model, inputs: Tensor, stages: Sequence[int]) -> List[Tensor]:
    """The tensors the exits read after ``stages`` (1-based, ascending): the backbone is run stage by stage densely
    and ``backbone.exit_feature(stage, feats)`` taken (HRNet: the branches resized to 1/4 and concatenated)."""
    backbone = model.backbone
    out, feats = [], [inputs]
    for stage in range(1, max(stages) + 1):
        feats = backbone.forward_stage(stage, feats)
        if stage in stages:
            out.append(backbone.exit_feature(stage, feats))
    return out


@torch.no_grad()
def gather_class_feature_stats(model,
                               dataloader,
                               num_points: int,
                               feature_fn: Callable[[Tensor], List[Tensor]],
                               max_batches: Optional[int] = None,
                               progress: bool = True,
                               sync_model: bool = True) -> ClassFeatureStats:
    """Per point and class feature sums and counts over a dataloader (eval mode, ``no_grad``), all-reduced.

    Args:
        model (nn.Module): A segmentor with ``data_preprocessor``, ``num_classes`` and ``decode_head``
            (possibly wrapped).
        dataloader: mmseg batches with ``gt_sem_seg`` (the training split read with the test pipeline:
            :func:`~mmseg_cbt.calibration.calibrate.build_calibration_dataloader`).
        num_points (int): How many tensors ``feature_fn`` returns.
        feature_fn (callable): Preprocessed inputs (B, 3, H, W) -> ``num_points`` tensors (B, C_p, h_p, w_p).
        max_batches (int, optional): Stop after this many batches (per rank).
        progress (bool): Progress bar on the main process.
        sync_model (bool): Broadcast rank 0's parameters and buffers first (distributed).

    Returns:
        ClassFeatureStats: The all-reduced statistics.

    Raises:
        ValueError: ``max_batches < 1``, an empty dataloader, or no labelled pixel at some point.
    """
    from mmengine.model import is_model_wrapper

    from .gather import run_data_pass
    model = model.module if is_model_wrapper(model) else model
    ignore_index = int(getattr(model.decode_head, 'ignore_index', 255))
    stats = ClassFeatureStats(num_points, model.num_classes, ignore_index=ignore_index)

    def step(data: dict) -> None:
        inputs, samples = data['inputs'], data['data_samples']
        feats = feature_fn(inputs)
        if len(feats) != num_points:
            raise ValueError(f'feature_fn returned {len(feats)} tensors, expected {num_points}')
        for p, f in enumerate(feats):
            labels = torch.stack([
                labels_on_feature_map(s.gt_sem_seg.data, s.metainfo, inputs.shape[2:], f.shape[2:], ignore_index)
                for s in samples
            ]).to(f.device)
            stats.update(p, f, labels)

    run_data_pass(model, dataloader, step, max_batches, progress, sync_model,
                  'the class-mean dataloader is empty: no training pixels to compute class means from')
    stats.all_reduce()
    for p in range(num_points):
        if int(stats.counts[p].sum()) == 0:
            raise ValueError(f'no labelled training pixel reached point {p} (every label is ignore_index or '
                             f'outside [0, {model.num_classes})): class means cannot be computed')
    return stats
