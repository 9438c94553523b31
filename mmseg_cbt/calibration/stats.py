"""Exact, order independent per-class softmax statistics for CBT calibration.

:class:`ClassProbStats` gathers, for every exit ``n`` and ground-truth class ``k``, the sum of the softmax
vectors of the pixels labelled ``k`` and their count. The means ``p_{n,k}`` feed
:func:`~mmseg_cbt.calibration.cbt_thresholds`.

Fixed point, and why
--------------------
Floating point addition is not associative, so summing the same pixels split over several ranks (or in
another batch order) would change the last bits of the sums, and possibly a threshold. Every softmax value
is therefore rounded to a multiple of ``2**-FRAC_BITS`` (``FRAC_BITS = 24``) and the sums are kept as int64
counts of that unit. Integer addition is associative, so one pass, several ranks (summed with
:meth:`ClassProbStats.all_reduce`) or any batch order give bit-for-bit the same statistics.

* Resolution ``2**-24`` (about 6e-8): float32 values in ``[0.5, 1]`` are already multiples of ``2**-24``,
  so the dominant probability, the one that decides margins, is stored without loss; smaller values are off by
  at most ``2**-25`` each, hence every mean is within ``2**-25`` (about 3e-8) of the exact float32 mean.
* Headroom: a sum is at most ``count_k * 2**24``, so int64 holds ``count_k < 2**39`` (5.5e11) pixels per
  class. Cityscapes' whole training set at full resolution is 6.2e9 pixels. (``2**-32`` would allow only
  2.1e9 per class, less than Cityscapes' road class.) Exceeding it raises OverflowError.
* Rounding is round-half-to-even of the float32 softmax value times ``2**24`` (exact in float32), so it is
  the same on every rank and device. The sums themselves are int64 ``index_add_`` over the label index, exact
  in any order (also with CUDA's atomics).
* The softmax is taken over the whole ``(B, K, H, W)`` exit tensor, the way the segmentor takes it: PyTorch's
  vectorised softmax may differ in the last bit between a full tensor and a slice of it, so slicing first could
  make a pixel's statistics depend on how its batch was cut up. Only the steps after it, which are exact
  elementwise operations, are chunked.
"""
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .exit_stats import ExactExitStats

__all__ = ['ClassProbStats', 'FRAC_BITS', 'MAX_PIXELS_PER_CLASS']

#: Fractional bits of the fixed-point sums: each softmax value is stored in units of ``2**-FRAC_BITS``.
FRAC_BITS = 24
_SCALE = float(2**FRAC_BITS)
#: Largest per-class pixel count for which ``count * 2**FRAC_BITS`` still fits in int64.
MAX_PIXELS_PER_CLASS = 2**(63 - FRAC_BITS)
#: Elements (K x pixels of one image) per chunk of the rounding and int64 summation in
#: :meth:`ClassProbStats.update`: a chunk stays in cache (measured fastest at 2**18 - 2**20 here). Any value
#: gives the same integers.
_CHUNK_ELEMENTS = 2**18
_JSON_FORMAT = 'mmseg_cbt.ClassProbStats'
_JSON_VERSION = 1


class ClassProbStats(ExactExitStats):
    """Per exit, per ground-truth class sums of softmax vectors and pixel counts, exact and mergeable.

    Shapes: fixed-point sums ``(N exits, K classes, K)`` int64; counts ``(K,)`` int64 (the same pixels
    are counted at every exit, so one count vector serves all exits).

    ``num_exits``/``num_classes`` may be given up front or are taken from the first :meth:`update`. Give them
    up front when some distributed rank may see no batch at all, so that every rank can take part in
    :meth:`all_reduce`.

    Args:
        num_exits (int, optional): Number of exits N.
        num_classes (int, optional): Number of classes K.
        ignore_index (int): Label excluded from the statistics. Labels outside ``[0, K)`` are excluded too.
            Defaults to 255.
    """

    def __init__(self,
                 num_exits: Optional[int] = None,
                 num_classes: Optional[int] = None,
                 ignore_index: int = 255) -> None:
        self._sums: Optional[Tensor] = None  # (N, K, K) int64, units of 2**-FRAC_BITS
        self._counts: Optional[Tensor] = None  # (K,) int64
        self._work: Optional[Tuple[Tensor, Tensor]] = None  # scratch buffers of update()
        super().__init__(num_exits, num_classes, ignore_index)

    # ------------------------------------------------------------------ properties
    def _allocate(self, num_exits: int, num_classes: int) -> None:
        self._sums = torch.zeros(num_exits, num_classes, num_classes, dtype=torch.int64)
        self._counts = torch.zeros(num_classes, dtype=torch.int64)

    def _tensors(self) -> List[Tensor]:
        return [self._sums, self._counts]

    def _check_sums(self) -> None:
        if int(self._counts.max()) >= MAX_PIXELS_PER_CLASS:
            raise OverflowError(f'a class has more than {MAX_PIXELS_PER_CLASS} pixels: the fixed-point sums '
                                'overflowed')

    @property
    def counts(self) -> Tensor:
        """Tensor: ``(K,)`` int64 pixel counts per ground-truth class (a copy)."""
        self._require_initialized()
        return self._counts.clone()

    @property
    def fixed_point_sums(self) -> Tensor:
        """Tensor: ``(N, K, K)`` int64 sums in units of ``2**-FRAC_BITS`` (a copy)."""
        self._require_initialized()
        return self._sums.clone()

    # ------------------------------------------------------------------ accumulation
    def _work_buffers(self, n_probs: int, n_fixed: int, device: torch.device) -> Tuple[Tensor, Tensor]:
        """Flat scratch buffers kept between updates: float32 softmax of one exit, int64 chunk.

        Reusing them avoids fresh allocations, whose page faults otherwise cost about as much as the softmax.
        They hold no state; :meth:`release_buffers` frees them.
        """
        work = self._work
        if work is None or work[0].device != device or work[0].numel() < n_probs or work[1].numel() < n_fixed:
            work = (torch.empty(n_probs, dtype=torch.float32,
                                device=device), torch.empty(n_fixed, dtype=torch.int64, device=device))
            self._work = work
        return work

    def release_buffers(self) -> None:
        """Frees the scratch buffers of :meth:`update` (one exit's logits in float32, plus 2 MB)."""
        self._work = None

    @torch.no_grad()
    def update(self, exit_logits: Sequence[Tensor], labels: Tensor) -> None:
        """Adds one batch.

        Args:
            exit_logits (Sequence[Tensor]): N tensors ``(B, K, H, W)``, one per exit, already resized to the
                label size the way the segmentor predicts. Any float dtype; the softmax is taken in float32.
            labels (Tensor): ``(B, H, W)`` (or ``(B, 1, H, W)``) integer ground truth. ``ignore_index`` and any
                value outside ``[0, K)`` are excluded.

        Raises:
            ValueError: If the number of exits, K, or the shapes disagree with each other, with the labels or
                with earlier updates.
            OverflowError: If a class would exceed :data:`MAX_PIXELS_PER_CLASS` pixels.
        """
        exit_logits, labels = self._check_batch(exit_logits, labels)
        batch, num_classes, height, width = exit_logits[0].shape
        num_exits = len(exit_logits)
        device = exit_logits[0].device
        labels = labels.reshape(batch, height * width)
        valid = self._valid_labels(labels)
        # Excluded pixels get label K: they land in an extra column K of the sums, which is dropped below.
        labels = torch.where(valid, labels, torch.full_like(labels, num_classes))
        batch_counts = torch.bincount(labels.flatten(), minlength=num_classes + 1)[:num_classes].cpu()
        if int((self._counts + batch_counts).max()) >= MAX_PIXELS_PER_CLASS:
            raise OverflowError(f'a class would exceed {MAX_PIXELS_PER_CLASS} pixels, the int64 fixed-point limit '
                                f'at 2**-{FRAC_BITS} resolution')

        num_pixels = height * width
        cols = max(1, min(num_pixels, _CHUNK_ELEMENTS // num_classes))
        probs_buf, fixed_buf = self._work_buffers(batch * num_classes * num_pixels, num_classes * cols, device)
        # Column K of the transposed sums collects the excluded pixels and is dropped at the end.
        sums_t = torch.zeros(num_exits, num_classes, num_classes + 1, dtype=torch.int64, device=device)
        for n, logit in enumerate(exit_logits):
            # Softmax of the whole tensor in float32, as the segmentor computes it (see the module docstring);
            # the scores themselves for an exit whose head outputs probabilities (scores_are_probs)
            out = probs_buf[:batch * num_classes * num_pixels].view(batch, num_classes, height, width)
            probs = self.exit_probs(n, logit, out=out)
            probs = probs.view(batch, num_classes, num_pixels)
            for b in range(batch):
                for start in range(0, num_pixels, cols):
                    stop = min(start + cols, num_pixels)
                    # Round to the 2**-24 grid (exact float32 ops), then convert to int64 and add per label.
                    chunk = probs[b, :, start:stop].mul_(_SCALE).round_()
                    fixed = fixed_buf[:num_classes * (stop - start)].view(num_classes, stop - start)
                    fixed.copy_(chunk)
                    sums_t[n].index_add_(1, labels[b, start:stop], fixed)  # [channel c, true class k]
        sums = sums_t[:, :, :num_classes].transpose(1, 2)  # [exit, true class k, channel c]
        self._sums += sums.cpu()
        self._counts += batch_counts

    # ------------------------------------------------------------------ results
    def class_mean_probs(self) -> Tensor:
        """Mean softmax vector per exit and ground-truth class.

        Returns:
            Tensor: ``(N, K, K)`` float64; row ``k`` of exit ``n`` is ``p_{n,k}``. Rows of classes without
            pixels are all zero.
        """
        self._require_initialized()
        sums = self._sums.to(torch.float64) * (1.0 / _SCALE)  # exact scaling by a power of two
        denom = self._counts.clamp(min=1).to(torch.float64).view(1, -1, 1)
        return sums / denom

    # ------------------------------------------------------------------ (de)serialisation
    def state_dict(self) -> Dict[str, Any]:
        """Exact state as tensors (for ``torch.save``).

        Returns:
            dict: ``num_exits``, ``num_classes``, ``ignore_index``, ``frac_bits``, ``sums`` ((N, K, K) int64,
            fixed point) and ``counts`` ((K,) int64).
        """
        self._require_initialized()
        return dict(
            num_exits=self.num_exits,
            num_classes=self.num_classes,
            ignore_index=self.ignore_index,
            frac_bits=FRAC_BITS,
            sums=self._sums.clone(),
            counts=self._counts.clone())

    @classmethod
    def from_state_dict(cls, state: Dict[str, Any]) -> 'ClassProbStats':
        """Rebuilds an instance from :meth:`state_dict`.

        Args:
            state (dict): As produced by :meth:`state_dict`.

        Returns:
            ClassProbStats: The restored statistics.
        """
        if int(state.get('frac_bits', -1)) != FRAC_BITS:
            raise ValueError(f'state has frac_bits={state.get("frac_bits")}, this version uses {FRAC_BITS}')
        obj = cls(int(state['num_exits']), int(state['num_classes']), ignore_index=int(state['ignore_index']))
        sums = torch.as_tensor(state['sums'], dtype=torch.int64).cpu()
        counts = torch.as_tensor(state['counts'], dtype=torch.int64).cpu()
        if sums.shape != obj._sums.shape or counts.shape != obj._counts.shape:
            raise ValueError(f'state tensors have shapes {tuple(sums.shape)} / {tuple(counts.shape)}, expected '
                             f'{tuple(obj._sums.shape)} / {tuple(obj._counts.shape)}')
        obj._sums.copy_(sums)
        obj._counts.copy_(counts)
        return obj

    def to_json_dict(self, class_names: Optional[Sequence[str]] = None) -> Dict[str, Any]:
        """JSON-serialisable summary that also round-trips exactly.

        Args:
            class_names (Sequence[str], optional): K names; default ``'class_<k>'``.

        Returns:
            dict: Header fields plus ``classes``: one entry per class with ``index``, ``name``, ``count``,
            ``mean_probs`` (N lists of K floats, the mean softmax vector at each exit) and
            ``fixed_point_sums`` (N lists of K ints, the exact state).
        """
        self._require_initialized()
        k_count = self.num_classes
        if class_names is None:
            class_names = [f'class_{k}' for k in range(k_count)]
        if len(class_names) != k_count:
            raise ValueError(f'class_names has {len(class_names)} entries, expected K={k_count}')
        means = self.class_mean_probs()
        classes: List[Dict[str, Any]] = []
        for k in range(k_count):
            classes.append(
                dict(
                    index=k,
                    name=str(class_names[k]),
                    count=int(self._counts[k]),
                    mean_probs=means[:, k].tolist(),
                    fixed_point_sums=self._sums[:, k].tolist()))
        return dict(
            format=_JSON_FORMAT,
            version=_JSON_VERSION,
            num_exits=self.num_exits,
            num_classes=k_count,
            ignore_index=self.ignore_index,
            frac_bits=FRAC_BITS,
            classes=classes)

    @classmethod
    def from_json_dict(cls, data: Dict[str, Any]) -> 'ClassProbStats':
        """Rebuilds an instance from :meth:`to_json_dict` output.

        Exact when ``fixed_point_sums`` is present; otherwise the sums are rebuilt from ``mean_probs * count``
        (accurate to the fixed-point resolution, not bit-exact).

        Args:
            data (dict): As produced by :meth:`to_json_dict` (possibly after a JSON round trip).

        Returns:
            ClassProbStats: The restored statistics.
        """
        if data.get('format') != _JSON_FORMAT:
            raise ValueError(f'not a {_JSON_FORMAT} dict (format={data.get("format")!r})')
        if int(data.get('frac_bits', FRAC_BITS)) != FRAC_BITS:
            raise ValueError(f'data has frac_bits={data["frac_bits"]}, this version uses {FRAC_BITS}')
        num_exits, num_classes = int(data['num_exits']), int(data['num_classes'])
        obj = cls(num_exits, num_classes, ignore_index=int(data.get('ignore_index', 255)))
        entries = data['classes']
        if len(entries) != num_classes:
            raise ValueError(f'{len(entries)} class entries for num_classes={num_classes}')
        for entry in entries:
            k = int(entry['index'])
            obj._counts[k] = int(entry['count'])
            if 'fixed_point_sums' in entry:
                row = torch.tensor(entry['fixed_point_sums'], dtype=torch.int64)
            else:
                mean = torch.tensor(entry['mean_probs'], dtype=torch.float64)
                row = torch.round(mean * int(entry['count']) * _SCALE).to(torch.int64)
            if row.shape != (num_exits, num_classes):
                raise ValueError(f'class {k}: expected ({num_exits}, {num_classes}) values, got {tuple(row.shape)}')
            obj._sums[:, k] = row
        return obj

    def __repr__(self) -> str:
        if not self.initialized:
            return f'{type(self).__name__}(empty, ignore_index={self.ignore_index})'
        return (f'{type(self).__name__}(num_exits={self.num_exits}, num_classes={self.num_classes}, '
                f'pixels={int(self._counts.sum())}, ignore_index={self.ignore_index})')
