"""Restored predictions of many stop rules from one resize per exit, bit-equal to resizing each rule's logits.

``predict`` turns exit logits (K, h, w) into a label map by a chain of linear resamplings (bilinear resize to the
input size, unpadding, flip, bilinear resize to the original size) and an argmax. Under copy aggregation a stop
rule's logits are, per low-resolution pixel, the dense logits of the exit where that pixel stopped. An output pixel
all of whose source pixels (those read with a non-zero weight) hold the same exit ``v`` therefore gets exactly the
value, bit for bit, that the resize of exit ``v``'s dense logits gives it (same inputs, same arithmetic; a zero
weight times a finite value adds nothing), so its label is read from one precomputed map per exit. Only output
pixels at the borders between exits mix sources; they are computed in float64 from the resampling weights, and the
label is taken when the top two scores are apart by more than any float32 rounding of the real chain could move
them; otherwise (near ties) and for non-finite logits the rule falls back to the real resize. The result is the
label map of the real chain in every case.
"""
from typing import Dict, Optional, Sequence, Tuple

import torch
from torch import Tensor

__all__ = ['RestorePlan', 'ExitLabelRestorer']

# float32 rounding of a two-stage bilinear chain moves a score by a few ulps of the largest input: 2^-16 is ~500 ulps
_TIE_TOL = 2.0**-16


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
    pad = list(meta.get('img_padding_size', meta.get('padding_size', [0] * 4)))
    pad = [0, 0, pad[2], pad[3]] if axis == 0 else [pad[0], pad[1], 0, 0]
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
        self.rows = self._taps(_axis_weights(model, low_hw[0], meta, first_hw[0], 0, dtype))
        self.cols = self._taps(_axis_weights(model, low_hw[1], meta, first_hw[1], 1, dtype))
        self.out_hw = (self.rows[0].shape[0], self.cols[0].shape[0])

    @staticmethod
    def _taps(weights: Tensor) -> Tuple[Tensor, Tensor]:
        """(out, T) source indices (padded by repeating the first, weight 0) and weights of the non-zero taps."""
        nz = weights != 0
        taps = max(int(nz.sum(1).max()), 1)
        order = torch.sort(nz.to(torch.int8), dim=1, descending=True, stable=True).indices[:, :taps]
        w = weights.gather(1, order)
        keep = w != 0
        idx = torch.where(keep, order, order[:, :1])
        return idx, torch.where(keep, w, torch.zeros_like(w))

    def mixed(self, held: Tensor) -> Tuple[Tensor, Tensor]:
        """(out_h, out_w) lowest and highest held-exit index among each output pixel's sources."""
        ri, ci = self.rows[0], self.cols[0]
        by_rows = held[ri]  # (out_h, Tr, w)
        return by_rows.amin(1)[:, ci].amin(2), by_rows.amax(1)[:, ci].amax(2)

    def values(self, logits: Tensor, held: Tensor, pos: Tensor) -> Tensor:
        """float64 (n, K) scores at output pixels ``pos`` ((n, 2)) from per-exit logits (E, K, h, w)."""
        ri, rw = self.rows[0][pos[:, 0]], self.rows[1][pos[:, 0]]  # (n, Tr)
        ci, cw = self.cols[0][pos[:, 1]], self.cols[1][pos[:, 1]]  # (n, Tc)
        r, c = ri[:, :, None], ci[:, None, :]
        src = logits[held[r, c].long(), :, r, c]  # (n, Tr, Tc, K)
        return torch.einsum('na,nb,nabk->nk', rw.to(src.dtype), cw.to(src.dtype), src)


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
        pad = tuple(meta.get('img_padding_size', meta.get('padding_size', [0] * 4)))
        key = ((h, w), self.first_hw, pad, bool(meta.get('flip', False)), meta.get('flip_direction'),
               tuple(meta['ori_shape']), model.align_corners, self.dense[0].dtype)
        if plans is not None and key in plans:
            self.plan = plans[key]
        else:
            self.plan = RestorePlan(model, (h, w), self.first_hw, meta, self.dense[0].dtype)
            if plans is not None:
                plans[key] = self.plan
        self.finite = all(bool(torch.isfinite(d).all()) for d in self.dense)
        self._labels: Dict[int, Tensor] = {}
        self._maps: Optional[Tensor] = None  # (V, H, W) labels of exits 0..V-1
        self._stack: Optional[Tensor] = None
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
        if self._maps is None or self._maps.shape[0] <= vmax:
            self._maps = torch.stack([self.exit_labels(v) for v in range(vmax + 1)])
        pred = self._maps.gather(0, lo.long()[None])[0]
        pos = (lo != hi).nonzero()
        if pos.numel():
            if self._stack is None:
                self._stack = torch.stack(self.dense).to(torch.float64)
            val = self.plan.values(self._stack, held, pos)
            top = val.topk(2, dim=1).values
            scale = val.abs().amax(1).clamp(min=1.0)
            if bool((top[:, 0] - top[:, 1] <= _TIE_TOL * scale).any()):
                return self._fallback(held)
            pred[pos[:, 0], pos[:, 1]] = val.argmax(1)
        return pred

    def _fallback(self, held: Tensor) -> Tensor:
        self.fallbacks += 1
        idx = held.long()[None, None].expand(1, self.dense[0].shape[0], -1, -1)
        logits = torch.stack(self.dense).gather(0, idx)[0]
        return self.real(logits)
