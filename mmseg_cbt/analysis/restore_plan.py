"""Restored predictions of many stop rules from one resize per exit, bit-equal to resizing each rule's logits.

``predict`` turns exit logits (K, h, w) into a label map by a chain of linear resamplings (bilinear resize to the
input size, unpadding, flip, bilinear resize to the original size) and an argmax. Under copy aggregation a stop
rule's logits are, per low-resolution pixel, the dense logits of the exit where that pixel stopped. An output pixel
all of whose source pixels (those read with a non-zero weight) hold the same exit ``v`` therefore gets exactly the
value, bit for bit, that the resize of exit ``v``'s dense logits gives it (same inputs, same arithmetic; a zero
weight times a finite value adds nothing), so its label is read from one precomputed map per exit. Only output
pixels at the borders between exits mix sources. One whose sources all rank one class first by a clear margin takes
that class (a weighted mean of such score vectors ranks it first too); the others are recomputed from the resampling
weights (measured from torch's own resize) and take their argmax when the top two scores are apart by far more than
the rounding of either computation could move them. Near ties and non-finite logits fall back to the real resize.
The result is the label map of the real chain in every case.
"""
from typing import Dict, Optional, Sequence, Tuple

import torch
from torch import Tensor

from mmseg_cbt.utils.meta import meta_padding

__all__ = ['RestorePlan', 'ExitLabelRestorer', 'CellConfusion']

# float32 rounding of a two-stage bilinear chain and of the recomputation move a score by a few ulps of the largest
# input (~2^-21 of it): 2^-18 leaves a margin of 8
_TIE_TOL = 2.0**-18


def _axis_weights(model, size: int, meta: dict, first_size: int, axis: int, dtype: torch.dtype) -> Tensor:
    """The chain's (out, size) weight matrix along one axis, measured by running it on an identity probe.

    The probe has the logits' dtype (torch computes the resampling weights in it) and size 1 along the other axis
    (weights 1 and 0 there, so every probed value is this axis' weight, unrounded).
    """
    probe = torch.eye(size, dtype=dtype)
    if axis == 0:
        x = probe.view(1, size, size, 1)
        first = (first_size, 1)
        ori = (int(meta['ori_shape'][0]), 1)
    else:
        x = probe.view(1, size, 1, size)
        first = (1, first_size)
        ori = (1, int(meta['ori_shape'][1]))
    left, right, top, bottom = meta_padding(meta)
    pad = [0, 0, top, bottom] if axis == 0 else [left, right, 0, 0]
    flip = meta.get('flip', None)
    along = 'vertical' if axis == 0 else 'horizontal'
    probe_meta = dict(
        ori_shape=ori, padding_size=pad, flip=bool(flip) and meta.get('flip_direction') == along, flip_direction=along)
    from mmseg.models.utils import resize
    out = resize(x, size=first, mode='bilinear', align_corners=model.align_corners, warning=False)
    out = model.restore_logits(out, probe_meta)  # (size, H, 1) or (size, 1, W)
    return out.reshape(size, -1).t().contiguous()


class RestorePlan:
    """Source pixels and weights of every output pixel of one image's restore chain, separably per axis.

    Args:
        model: The segmentor (``align_corners``, ``restore_logits``).
        low_hw (tuple[int, int]): The exit logits' size (h, w).
        first_hw (tuple[int, int]): The first resize's target (the batch's ``img_shape``).
        meta (dict): The image's meta (padding, flip, ``ori_shape``).
        dtype (torch.dtype): The logits' dtype.
    """

    def __init__(self,
                 model,
                 low_hw: Tuple[int, int],
                 first_hw: Tuple[int, int],
                 meta: dict,
                 dtype: torch.dtype = torch.float32):
        self.rows = self._axis_taps(_axis_weights(model, low_hw[0], meta, first_hw[0], 0, dtype))
        self.cols = self._axis_taps(_axis_weights(model, low_hw[1], meta, first_hw[1], 1, dtype))
        self.out_hw = (self.rows[0].shape[0], self.cols[0].shape[0])
        self._low_hw = tuple(low_hw)
        self._taps: Optional[Tuple[Tensor, Tensor]] = None
        self._cells: Optional[Tuple[Tensor, Tensor, Tensor, Tensor]] = None

    @staticmethod
    def _axis_taps(weights: Tensor) -> Tuple[Tensor, Tensor, Tensor, int]:
        """Per output index along one axis: (out, T) source indices (padded by repeating the first, weight 0) and
        weights of the non-zero taps, and the start of a window of ``span`` sources that holds all of them."""
        nz = weights != 0
        taps = max(int(nz.sum(1).max()), 1)
        order = torch.sort(nz.to(torch.int8), dim=1, descending=True, stable=True).indices[:, :taps]
        w = weights.gather(1, order)
        keep = w != 0
        idx = torch.where(keep, order, order[:, :1])
        lo, hi = idx.amin(1), idx.amax(1)
        span = int((hi - lo).max()) + 1
        start = lo.clamp(max=weights.shape[1] - span)  # a window of span sources from here covers [lo, hi]
        return idx, torch.where(keep, w, torch.zeros_like(w)), start, span

    def pooled(self, maps: Tensor) -> Tuple[Tensor, ...]:
        """Lowest and highest value over every window of ``span`` sources (indexed by window start) of each of the
        (n, h, w) integer maps: (lo_0, hi_0, lo_1, hi_1, ...), int64.

        A separable running maximum of shifted slices (of the maps and their negation at once): a few elementwise
        operations, where ``max_pool2d`` takes 0.3-0.5 ms on a 4 x 64 x 128 map on 2 cores.
        """
        x = maps.to(torch.int64)
        x = torch.cat([x, -x])
        span_r, span_c = self.rows[3], self.cols[3]
        h, w = x.shape[1] - span_r + 1, x.shape[2] - span_c + 1
        r = x[:, :h]
        for i in range(1, span_r):
            r = torch.maximum(r, x[:, i:i + h])
        out = r[:, :, :w]
        for j in range(1, span_c):
            out = torch.maximum(out, r[:, :, j:j + w])
        n = maps.shape[0]
        return tuple(t for i in range(n) for t in (-out[n + i], out[i]))

    def mixed(self, held: Tensor) -> Tuple[Tensor, Tensor]:
        """(out_h, out_w) lowest and highest held-exit index over a window holding each output pixel's sources (a
        window min / max at the low resolution, then looked up: equal means every source holds that exit)."""
        lo, hi = self.pooled(held[None])

        def lookup(t: Tensor) -> Tensor:
            return t.index_select(0, self.rows[2]).index_select(1, self.cols[2]).to(torch.int64)

        return lookup(lo), lookup(hi)

    def cells(self) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        """The output pixels grouped by source window ("cell": window start ``(r, c)``, id ``r * n_c + c``; all
        pixels of a cell read sources in the same window): (H * W,) pixel order by cell, (H * W,) cell of each
        pixel in that order, (cells,) first offset and pixel count of each cell. Built once."""
        if self._cells is None:
            n_c = self._low_hw[1] - self.cols[3] + 1
            n_cells = (self._low_hw[0] - self.rows[3] + 1) * n_c
            cell = (self.rows[2][:, None] * n_c + self.cols[2][None, :]).reshape(-1)
            order = torch.sort(cell, stable=True).indices
            counts = torch.bincount(cell, minlength=n_cells)
            self._cells = (order, cell[order], torch.cumsum(counts, 0) - counts, counts)
        return self._cells

    def pixels_of_cells(self, cells: Tensor) -> Tensor:
        """Flat output positions ((n,), each once) of the pixels of the given cells ((m,) int64)."""
        order, _, first, counts = self.cells()
        per = counts[cells]
        owner = torch.repeat_interleave(torch.arange(cells.numel()), per)
        local = torch.arange(int(per.sum())) - (torch.cumsum(per, 0) - per)[owner]
        return order[first[cells][owner] + local]

    def _flat_taps(self) -> Tuple[Tensor, Tensor]:
        """(H * W, Tr * Tc) flat low-resolution source index and weight of every output pixel (built once)."""
        if self._taps is None:
            (ri, rw), (ci, cw) = self.rows[:2], self.cols[:2]
            w = int(self._low_hw[1])
            idx = ri[:, None, :, None] * w + ci[None, :, None, :]  # (H, W, Tr, Tc)
            wt = rw[:, None, :, None] * cw[None, :, None, :]
            self._taps = (idx.reshape(-1, idx.shape[2] * idx.shape[3]), wt.reshape(-1, idx.shape[2] * idx.shape[3]))
        return self._taps

    def sources(self, held: Tensor, pos: Tensor) -> Tuple[Tensor, Tensor]:
        """(n, T) source rows and weights of the output pixels at flat positions ``pos`` ((n,)), rows numbered as in
        the logits' rows table ((E * h * w, K), row ``(e * h + y) * w + x``: the exit each source pixel holds)."""
        taps, weights = self._flat_taps()
        t = taps[pos]
        return held.reshape(-1)[t].long() * held.numel() + t, weights[pos]

    @staticmethod
    def values(rows: Tensor, src: Tensor, weight: Tensor) -> Tensor:
        """(n, K) scores, in the logits' dtype, of pixels with sources ``src`` and weights ``weight`` ((n, T))."""
        taps = rows.index_select(0, src.reshape(-1)) * weight.to(rows.dtype).reshape(-1, 1)
        return taps.view(src.shape[0], -1, rows.shape[1]).sum(1)


class ExitLabelRestorer:
    """Label maps of one image for any map of held exits, through :class:`RestorePlan` (see the module docstring).

    Args:
        model: The segmentor.
        dense (Sequence[Tensor]): Per exit, this image's dense logits (K, h, w).
        first_hw (tuple[int, int]): The first resize's target.
        meta (dict): The image's meta.
        argmax: ``(K, H, W) -> (H, W)`` label function of the real chain (first index among equal maxima).
        plans (dict, optional): A cache of plans shared between images of equal geometry.
    """

    def __init__(self,
                 model,
                 dense: Sequence[Tensor],
                 first_hw: Tuple[int, int],
                 meta: dict,
                 argmax,
                 plans: Optional[Dict[tuple, RestorePlan]] = None):
        self.model, self.meta, self.first_hw, self.argmax = model, meta, tuple(first_hw), argmax
        self.dense = list(dense)
        h, w = self.dense[0].shape[-2:]
        key = ((h, w), self.first_hw, meta_padding(meta), bool(meta.get('flip', False)), meta.get('flip_direction'),
               tuple(meta['ori_shape']), model.align_corners, self.dense[0].dtype)
        if plans is not None and key in plans:
            self.plan = plans[key]
        else:
            self.plan = RestorePlan(model, (h, w), self.first_hw, meta, self.dense[0].dtype)
            if plans is not None:
                plans[key] = self.plan
        self.finite = all(bool(torch.isfinite(d.sum())) for d in self.dense)  # a finite sum: all finite
        self._labels: Dict[int, Tensor] = {}
        self._maps: Optional[Tensor] = None  # (V, H, W) labels of exits 0..V-1
        self._rows: Optional[Tensor] = None  # (E * h * w, K) the logits as channels-last rows
        self.fallbacks = 0

    def real(self, logits: Tensor) -> Tensor:
        """The real chain: resize, restore, argmax of (K, h, w) logits."""
        from mmseg.models.utils import resize
        lg = resize(logits[None], size=self.first_hw, mode='bilinear', align_corners=self.model.align_corners)
        return self.argmax(self.model.restore_logits(lg, self.meta))

    def exit_labels(self, v: int) -> Tensor:
        """Label map of exit ``v``'s dense logits (computed once)."""
        if v not in self._labels:
            self._labels[v] = self.real(self.dense[v])
        return self._labels[v]

    def labels(self, held: Tensor) -> Tensor:
        """Label map (H, W) when low-resolution pixel (i, j) holds the logits of exit ``held[i, j]``."""
        vmin, vmax = int(held.min()), int(held.max())
        if vmin == vmax:
            return self.exit_labels(vmin)
        if not self.finite:
            return self._fallback(held)
        lo, hi = self.plan.mixed(held)
        pred = self._exit_maps(vmax).gather(0, lo[None])[0]
        flat = pred.view(-1)
        pos = (lo != hi).view(-1).nonzero().squeeze(1)
        if pos.numel():
            border = self._border_labels(held, pos)
            if border is None:
                return self._fallback(held)
            flat[pos] = border
        return pred

    def _exit_maps(self, vmax: int) -> Tensor:
        """(V, H, W) label maps of exits 0..V-1, V > vmax."""
        if self._maps is None or self._maps.shape[0] <= vmax:
            self._maps = torch.stack([self.exit_labels(v) for v in range(vmax + 1)])
        return self._maps

    def _border_labels(self, held: Tensor, pos: Tensor) -> Optional[Tensor]:
        """Labels of output pixels ``pos`` whose sources hold different exits (None at a near tie)."""
        self._prepare_rows()
        src, weight = self.plan.sources(held, pos)
        # a weighted mean of score vectors that all rank one class first by a clear margin ranks it first too:
        # only border pixels whose sources disagree (or nearly tie) are recomputed
        code = self._row_code[src]
        out = code[:, 0].clone()
        rest = ~((code == code[:, :1]).all(1) & (code[:, 0] >= 0))
        if bool(rest.any()):
            val = self.plan.values(self._rows, src[rest], weight[rest])
            top = val.topk(2, dim=1).values
            scale = val.abs().amax(1).clamp(min=1.0)
            if bool((top[:, 0] - top[:, 1] <= _TIE_TOL * scale).any()):
                return None
            out[rest] = val.argmax(1)
        return out

    def _prepare_rows(self) -> None:
        """The logits as channels-last rows and every row's top label where it leads by a clear margin (-1 where
        not: the margin against the image's largest score, so that any mix of such rows keeps that label)."""
        if self._rows is None:
            self._rows = torch.stack(self.dense).permute(0, 2, 3, 1).reshape(-1, self.dense[0].shape[0])
            top = self._rows.topk(2, dim=1)
            scale = float(self._rows.abs().amax().clamp(min=1.0))
            clear = top.values[:, 0] - top.values[:, 1] > _TIE_TOL * scale
            self._row_code = torch.where(clear, top.indices[:, 0], torch.full_like(top.indices[:, 0], -1))

    def _fallback(self, held: Tensor) -> Tensor:
        self.fallbacks += 1
        idx = held.long()[None, None].expand(1, self.dense[0].shape[0], -1, -1)
        logits = torch.stack(self.dense).gather(0, idx)[0]
        return self.real(logits)


class CellConfusion:
    """One image's confusion counts for any map of held exits, counted per cell (:meth:`RestorePlan.cells`) rather
    than per output pixel: the counts a sweep needs for every setting, bit-equal to counting
    :meth:`ExitLabelRestorer.labels`.

    * A cell whose window holds one exit ``v`` takes exit ``v``'s labels (as in ``labels``): its counts are
      precomputed per exit as runs of equal (label row, prediction) among the cell's pixels.
    * A mixed cell whose window's pixels all rank one class ``c`` first by a clear margin takes ``c`` at every pixel
      (every pixel's sources are in the window, so ``labels`` gives ``c`` too): its counts are its label rows'
      runs shifted by ``c``.
    * The pixels of the other cells are labelled one by one from their sources, as ``labels`` labels the pixels of
      mixed windows; where that needs the real chain (a near tie, non-finite logits), the whole map is labelled by
      ``labels``.

    So a setting costs a few operations on the low-resolution map and on the runs (a few per cell), not on every
    output pixel.

    Args:
        restorer (ExitLabelRestorer): The image's restorer.
        row_offset (Tensor): int64 (H * W,) ``label row * K`` per output pixel (labels outside [0, K) in row K),
            -1 where the pixel is not evaluated (ignore index).
        num_classes (int): K.
    """

    def __init__(self, restorer: ExitLabelRestorer, row_offset: Tensor, num_classes: int):
        self.restorer = restorer
        self.row_offset = row_offset
        self.size = (num_classes + 1) * num_classes
        order, cell, _, _ = restorer.plan.cells()
        labelled = (row_offset[order] >= 0).nonzero().squeeze(1)
        self._pixels = order[labelled]  # labelled pixels in cell order
        self._cell_of = cell[labelled]
        self._rows = row_offset[self._pixels]
        self._row_runs = self._runs(self._cell_of, self._rows)
        self._exit_runs: Optional[Tuple[Tensor, Tensor, Tensor, Tensor]] = None  # cell, bin, count, exit
        self._runs_vmax = -1
        self._flat = torch.arange(restorer.dense[0][0].numel())
        self._exit_counts: Dict[int, Tensor] = {}
        self.full_counts = 0

    def _runs(self, cell: Tensor, bins: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """(cell, bin, count) of the runs of equal (cell, bin) in cell order (equal pairs may form several runs)."""
        key = cell * self.size + bins
        if key.numel() == 0:
            return key, key, key
        start = torch.cat([key.new_zeros(1), (key[1:] != key[:-1]).nonzero().squeeze(1) + 1])
        count = torch.diff(start, append=key.new_full((1, ), key.numel()))
        key = key[start]
        return key // self.size, key % self.size, count

    def _exits(self, vmax: int) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        """Every exit's runs up to ``vmax``, concatenated, with their exit."""
        if self._exit_runs is None or self._runs_vmax < vmax:
            parts = []
            for v in range(vmax + 1):
                pred = self.restorer.exit_labels(v).reshape(-1)[self._pixels]
                c, b, n = self._runs(self._cell_of, self._rows + pred)
                parts.append((c, b, n, torch.full_like(c, v)))
            self._exit_runs = tuple(torch.cat(t) for t in zip(*parts))
            self._runs_vmax = vmax
        return self._exit_runs

    def _count(self, pos: Tensor, pred: Tensor) -> Tensor:
        rows = self.row_offset[pos]
        keep = rows >= 0
        return torch.bincount(rows[keep] + pred[keep], minlength=self.size)

    def _count_map(self, labels: Tensor) -> Tensor:
        """The counts of a whole (H, W) label map."""
        return self._count(self._pixels, labels.reshape(-1)[self._pixels])

    def _full(self, held: Tensor) -> Tensor:
        self.full_counts += 1
        return self._count_map(self.restorer.labels(held))

    def counts(self, held: Tensor) -> Tensor:
        """The (K + 1) * K flat confusion counts [label row * K + prediction] for held-exit map ``held`` (h, w)."""
        restorer = self.restorer
        vmin, vmax = torch.stack(torch.aminmax(held)).tolist()
        if vmin == vmax:
            if vmin not in self._exit_counts:
                self._exit_counts[vmin] = self._count_map(restorer.exit_labels(vmin))
            return self._exit_counts[vmin]
        if not restorer.finite:
            return self._full(held)
        plan = restorer.plan
        restorer._prepare_rows()
        flat = held.reshape(-1).long()
        code = restorer._row_code[flat * flat.numel() + self._flat]
        lo, hi, c_lo, c_hi = plan.pooled(torch.stack([flat, code]).view(2, *held.shape))
        pure = torch.where(lo == hi, lo, -1).reshape(-1)  # the one exit of a pure cell, -1 for mixed
        sure = ((c_lo == c_hi) & (c_lo >= 0)).reshape(-1) & (pure < 0)
        cell, bins, count, exit_ = self._exits(vmax)
        out = torch.zeros(self.size, dtype=torch.int64)
        out.index_add_(0, bins, count * (pure[cell] == exit_))
        r_cell, r_bin, r_count = self._row_runs
        cls = c_lo.reshape(-1).clamp(min=0)
        out.index_add_(0, r_bin + cls[r_cell], r_count * sure[r_cell])
        rest = ((pure < 0) & ~sure).nonzero().squeeze(1)
        if rest.numel():
            pos = plan.pixels_of_cells(rest)
            # their windows hold several exits, so labels() takes these pixels to its border labelling directly
            pred = restorer._border_labels(held, pos)
            if pred is None:
                return self._full(held)
            out += self._count(pos, pred)
        return out
