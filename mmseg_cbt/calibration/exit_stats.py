"""The common part of exact per-exit, per-class statistics: shapes, batch checks, merging and distributed sums.

Subclasses keep int64 tensors only, so that summing them over ranks (:meth:`ExactExitStats.all_reduce`) or merging
instances in any order gives bit-for-bit the single-pass result.
"""
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

__all__ = ['ExactExitStats']


class ExactExitStats:
    """Base of the calibration statistics: N exits and K classes, known up front or from the first update.

    A subclass implements :meth:`_allocate` (create its int64 tensors for ``(N, K)``), :meth:`_tensors` (the
    tensors that are summed) and ``update``; it may add integers that all ranks must agree on
    (:meth:`_extra_shape`, e.g. a number of bins) and a check after the sums (:meth:`_check_sums`).

    Args:
        num_exits (int, optional): Number of exits N.
        num_classes (int, optional): Number of classes K.
        ignore_index (int): Label excluded from the statistics; labels outside ``[0, K)`` are excluded too.
    """

    #: Smallest K a subclass accepts.
    min_classes = 1
    #: Per exit, whether its outputs are per-class scores in [0, 1] already (a head declaring
    #: ``scores_are_probs``, e.g. an attention-to-mask head) and are used as they are instead of their softmax;
    #: None = every exit gives logits. :func:`~mmseg_cbt.calibration.gather.gather_exit_stats` sets it from the
    #: model's exit heads.
    scores_are_probs: Optional[Sequence[bool]] = None

    def __init__(self,
                 num_exits: Optional[int] = None,
                 num_classes: Optional[int] = None,
                 ignore_index: int = 255) -> None:
        self.ignore_index = int(ignore_index)
        self._shape: Optional[Tuple[int, int]] = None
        if (num_exits is None) != (num_classes is None):
            raise ValueError('give both num_exits and num_classes, or neither')
        if num_exits is not None:
            self._init_shape(int(num_exits), int(num_classes))

    # ------------------------------------------------------------------ to implement
    def _allocate(self, num_exits: int, num_classes: int) -> None:
        raise NotImplementedError

    def _tensors(self) -> List[Tensor]:
        raise NotImplementedError

    def _extra_shape(self) -> List[int]:
        return []

    def _check_sums(self) -> None:
        """Called after every merge / all-reduce (e.g. an overflow check)."""

    def exit_probs(self, n: int, logit: Tensor, out: Optional[Tensor] = None) -> Tensor:
        """Per-class scores (float32) of exit ``n``'s output ``logit`` (B, K, H, W): its softmax over K, or the
        output itself for an exit marked in :attr:`scores_are_probs` (into ``out`` when given)."""
        if self.scores_are_probs is not None and self.scores_are_probs[n]:
            return logit.float() if out is None else out.copy_(logit)
        return torch.softmax(logit.float(), dim=1, out=out)

    # ------------------------------------------------------------------ shapes
    def _init_shape(self, num_exits: int, num_classes: int) -> None:
        if num_exits < 1 or num_classes < self.min_classes:
            raise ValueError(f'num_exits must be >= 1 and num_classes >= {self.min_classes}, got {num_exits} and '
                             f'{num_classes}')
        self._allocate(num_exits, num_classes)
        self._shape = (num_exits, num_classes)

    @property
    def initialized(self) -> bool:
        """bool: Whether the shapes are known (given up front or by a first update)."""
        return self._shape is not None

    def _require_initialized(self) -> None:
        if not self.initialized:
            raise RuntimeError(f'{type(self).__name__} is empty: call update() first or pass num_exits/num_classes')

    @property
    def num_exits(self) -> Optional[int]:
        """int | None: Number of exits N (None before the first update)."""
        return None if self._shape is None else self._shape[0]

    @property
    def num_classes(self) -> Optional[int]:
        """int | None: Number of classes K (None before the first update)."""
        return None if self._shape is None else self._shape[1]

    # ------------------------------------------------------------------ one batch
    def _check_batch(self, exit_logits: Sequence[Tensor], labels: Tensor) -> Tuple[List[Tensor], Tensor]:
        """Validates a batch of exit logits and labels; allocates on the first batch.

        Args:
            exit_logits (Sequence[Tensor]): N float tensors ``(B, K, H, W)``, one per exit, at the labels' size.
            labels (Tensor): ``(B, H, W)`` or ``(B, 1, H, W)`` integer ground truth.

        Returns:
            tuple: The logits as a list and the labels as ``(B, H, W)`` int64 on the logits' device.

        Raises:
            ValueError: If the number of exits, K or the shapes disagree with each other, the labels or earlier
                updates.
        """
        if isinstance(exit_logits, Tensor):
            raise ValueError('exit_logits must be a sequence of (B, K, H, W) tensors, one per exit (got a single '
                             'tensor; wrap it in a list for a single exit)')
        exit_logits = list(exit_logits)
        if not exit_logits:
            raise ValueError('exit_logits is empty')
        shape = tuple(exit_logits[0].shape)
        if len(shape) != 4:
            raise ValueError(f'each exit logit must be (B, K, H, W), got {shape} at exit 0')
        for n, logit in enumerate(exit_logits):
            if tuple(logit.shape) != shape:
                raise ValueError(f'exit {n} logits have shape {tuple(logit.shape)}, exit 0 has {shape}')
            if not logit.is_floating_point():
                raise ValueError(f'exit {n} logits must be floating point, got {logit.dtype}')
        batch, num_classes, height, width = shape
        num_exits = len(exit_logits)
        if self.initialized and (num_exits, num_classes) != self._shape:
            raise ValueError(f'got {num_exits} exits with K={num_classes} classes, but these statistics hold '
                             f'{self.num_exits} exits with K={self.num_classes}')
        if not isinstance(labels, Tensor):
            raise ValueError(f'labels must be a tensor, got {type(labels).__name__}')
        if labels.ndim == 4 and labels.shape[1] == 1:
            labels = labels[:, 0]  # mmseg stacks gt_sem_seg as (B, 1, H, W)
        if tuple(labels.shape) != (batch, height, width):
            raise ValueError(f'labels have shape {tuple(labels.shape)}, expected (B, H, W) = '
                             f'{(batch, height, width)} to match the logits {shape}')
        if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
            raise ValueError(f'labels must be an integer tensor, got {labels.dtype}')
        if not self.initialized:
            self._init_shape(num_exits, num_classes)
        return exit_logits, labels.to(device=exit_logits[0].device, dtype=torch.int64)

    def _valid_labels(self, labels: Tensor) -> Tensor:
        """Mask of the labels counted: inside ``[0, K)`` and not ``ignore_index``."""
        k = self.num_classes
        valid = (labels >= 0) & (labels < k)
        if 0 <= self.ignore_index < k:
            valid &= labels != self.ignore_index
        return valid

    # ------------------------------------------------------------------ sums
    def merge(self, other: 'ExactExitStats') -> 'ExactExitStats':
        """Adds another instance's statistics into this one (in-process equivalent of :meth:`all_reduce`).

        Args:
            other: Statistics of the same type over other pixels, same N, K (and bins), or empty.

        Returns:
            ``self``, for chaining.

        Raises:
            TypeError: Another type. ValueError: Other shapes.
        """
        if type(other) is not type(self):
            raise TypeError(f'can only merge {type(self).__name__}, got {type(other).__name__}')
        if other._extra_shape() != self._extra_shape():
            raise ValueError(f'cannot merge statistics with parameters {other._extra_shape()} into '
                             f'{self._extra_shape()}')
        if not other.initialized:
            return self
        if not self.initialized:
            self._init_shape(other.num_exits, other.num_classes)
        elif self._shape != other._shape:
            raise ValueError(f'cannot merge statistics of {other.num_exits} exits / K={other.num_classes} into '
                             f'{self.num_exits} exits / K={self.num_classes}')
        saved = [t.clone() for t in self._tensors()]
        for mine, theirs in zip(self._tensors(), other._tensors()):
            mine += theirs
        try:
            self._check_sums()
        except Exception:
            for mine, old in zip(self._tensors(), saved):
                mine.copy_(old)
            raise
        return self

    def all_reduce(self) -> 'ExactExitStats':
        """Sums the statistics over all distributed ranks, in place (no-op when not distributed).

        ``mmengine.dist.all_reduce(..., op='sum')`` on int64 tensors: bit-for-bit the single-process result. Every
        rank must call it exactly once per gathering (a second call would count everything again). All ranks must
        hold the same shapes; this is checked first, collectively, so a mismatch raises on every rank instead of
        hanging.

        Returns:
            ``self``, for chaining.
        """
        from mmengine import dist  # lazy: the rest of the statistics need only torch

        if dist.get_world_size() <= 1:
            return self
        mine = list(self._shape or (0, 0)) + self._extra_shape()
        shape = torch.tensor(mine + [-v for v in mine], dtype=torch.int64)
        dist.all_reduce(shape, op='max')  # -> (max of each, -min of each)
        hi, lo = shape[:len(mine)].tolist(), [-v for v in shape[len(mine):].tolist()]
        if hi != lo or not self.initialized:
            raise RuntimeError(f'{type(self).__name__}.all_reduce: ranks disagree on (num_exits, num_classes'
                               f'{", ..." if len(mine) > 2 else ""}) (this rank {tuple(mine)}, max {tuple(hi)}, min '
                               f'{tuple(lo)}); pass num_exits/num_classes up front if a rank may see no data')
        for t in self._tensors():
            dist.all_reduce(t, op='sum')
        self._check_sums()  # same verdict on every rank
        return self

    def reset(self) -> None:
        """Zeroes the statistics, keeping the shapes."""
        if self.initialized:
            for t in self._tensors():
                t.zero_()
