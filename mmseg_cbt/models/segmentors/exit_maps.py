"""Where pixels stop: exit maps, computed fractions and per-image cost from the stop masks of a forward pass.

:meth:`EarlyExitEncoderDecoder.forward_exits` returns, per exit ``n``, the mask of the (1/4-resolution) positions
that exit computed (None: all). Masks are cumulative, so a position's exit is the number of exits that computed
it: 1 for a pixel that stopped after exit 1, ``num_exits`` for one that never stopped. The helpers here turn
those masks into label maps, fractions and MAC counts without running anything again.
"""
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from mmengine.structures import PixelData
from torch import Tensor

__all__ = [
    'CropMasks', 'exit_index_map', 'computed_fractions', 'paste_exit_maps', 'ExitCostCounter', 'attach_exit_outputs'
]

#: One forward pass of :meth:`forward_exits` inside the (padded) input: its box ``(y1, y2, x1, x2)`` and the
#: per-exit masks it returned (a whole-image pass has the box of the whole input).
CropMasks = Tuple[Tuple[int, int, int, int], List[Optional[Tensor]]]


def exit_index_map(actives: Sequence[Optional[Tensor]], batch: int, hw: Sequence[int], device: torch.device) -> Tensor:
    """Exit (1..num_exits) at which every position stopped, from the masks of one pass.

    Args:
        actives (list): ``actives[n]``: bool (B, h, w) positions computed by exit ``n + 1``, None = all.
        batch (int): B.
        hw (Sequence[int]): (h, w), the masks' size (used when every mask is None).
        device (torch.device): Device of the result.

    Returns:
        Tensor: (B, h, w) int64, the number of exits that computed each position.
    """
    out = torch.zeros((batch, int(hw[0]), int(hw[1])), dtype=torch.long, device=device)
    for active in actives:
        out += 1 if active is None else active.to(device=device, dtype=torch.long)
    return out


def computed_fractions(actives: Sequence[Optional[Tensor]], batch: int) -> Tensor:
    """Per image and exit, the fraction of positions that exit computed.

    Returns:
        Tensor: (B, num_exits) float64 in [0, 1] (1 where the mask is None).
    """
    cols = [
        torch.ones(batch, dtype=torch.float64) if a is None else a.flatten(1).double().mean(dim=1).cpu()
        for a in actives
    ]
    return torch.stack(cols, dim=1)


def paste_exit_maps(crops: Sequence[CropMasks], batch: int, hw: Sequence[int], device: torch.device) -> Tensor:
    """The exit map of the whole (padded) input from the passes that covered it.

    Each pass's map is resized (nearest) to its box; where boxes overlap (slide inference) a pixel shows the
    latest exit at which any pass still computed it, i.e. the most work spent on it.

    Args:
        crops (list[CropMasks]): The passes.
        batch (int): B.
        hw (Sequence[int]): (H, W) of the padded input.
        device (torch.device): Device of the result.

    Returns:
        Tensor: (B, 1, H, W) int64 in 1..num_exits.
    """
    out = torch.zeros((batch, 1, int(hw[0]), int(hw[1])), dtype=torch.long, device=device)
    for (y1, y2, x1, x2), actives in crops:
        grid = next((a.shape[1:] for a in actives if a is not None), None)
        if grid is None:  # dense pass: every pixel reached the last exit
            out[:, :, y1:y2, x1:x2] = len(actives)
            continue
        emap = exit_index_map(actives, batch, grid, device).unsqueeze(1).float()
        emap = F.interpolate(emap, size=(y2 - y1, x2 - x1), mode='nearest').long()
        out[:, :, y1:y2, x1:x2] = torch.maximum(out[:, :, y1:y2, x1:x2], emap)
    return out


class ExitCostCounter:
    """Per-image cumulative MACs of every exit, counted from the masks a prediction used.

    The counting is :class:`mmseg_cbt.analysis.EarlyExitFlopCounter`'s (the report tool's): the dense layer trace
    is taken once per input size and every masked conv is charged at the fraction of its output positions still
    computed. Passes of slide inference are summed (each crop is a full run of the network).

    Args:
        model (nn.Module): The early-exit segmentor.
    """

    def __init__(self, model) -> None:
        self.model = model
        self._counter = None

    def count(self, inputs: Tensor, crops: Sequence[CropMasks], fill: str) -> Tensor:
        """MACs of every image, cumulative per exit.

        Args:
            inputs (Tensor): Preprocessed batch (B, 3, H, W) the passes ran on.
            crops (list[CropMasks]): The passes and their masks.
            fill (str): The fill rule of the run (only ``'rbf'`` is charged).

        Returns:
            Tensor: (B, num_exits) float64 MACs.
        """
        if self._counter is None:
            # imported here: mmseg_cbt.analysis imports the model package
            from mmseg_cbt.analysis import EarlyExitFlopCounter
            self._counter = EarlyExitFlopCounter(self.model, fill=fill)
        counter = self._counter
        counter.fill = fill  # read by every count; the cached dense trace depends on the geometry only
        total: Optional[Tensor] = None
        for (y1, y2, x1, x2), actives in crops:
            res = counter.count(inputs[:, :, y1:y2, x1:x2], actives)
            macs = torch.tensor([e.macs_per_image for e in res.exits], dtype=torch.float64).t()
            total = macs if total is None else total + macs
        return total


def attach_exit_outputs(model,
                        inputs: Tensor,
                        data_samples: list,
                        crops: Sequence[CropMasks],
                        restore: bool,
                        exit_mode: str,
                        cost: Optional[ExitCostCounter] = None,
                        fill: str = 'copy') -> None:
    """Adds to every data sample where its pixels stopped and what they cost.

    Fields set: ``exit_map`` (PixelData (1, h, w) int64, the exit 1..num_exits at which each pixel stopped:
    undone padding and flip and resized (nearest) to ``ori_shape`` like the predictions when ``restore``, else at
    the input size), ``exit_computed`` ((num_exits,) float64, the fraction of 1/4-resolution positions each exit
    computed; slide inference: the mean over crops), ``exit_macs`` ((num_exits,) float64, cumulative MACs per exit,
    only with ``cost``) and the metainfo ``exit_mode``.

    Args:
        model (EarlyExitEncoderDecoder): The segmentor (for ``restore_logits``).
        inputs (Tensor): The preprocessed batch (B, 3, H, W).
        data_samples (list[SegDataSample]): The batch's samples, updated in place.
        crops (list[CropMasks]): The passes that made the prediction and their masks.
        restore (bool): Map to the original image (False when there were no data samples).
        exit_mode (str): The stop rule of the run (stored as metainfo).
        cost (ExitCostCounter, optional): Counts ``exit_macs``; None skips counting.
        fill (str): The run's fill rule (``'rbf'`` is charged).
    """
    b = inputs.shape[0]
    emap = paste_exit_maps(crops, b, inputs.shape[2:], inputs.device)
    fractions = torch.stack([computed_fractions(actives, b) for _, actives in crops]).mean(dim=0)
    macs = cost.count(inputs, crops, fill) if cost is not None else None
    for i, ds in enumerate(data_samples):
        m = emap[i]
        if restore:
            m = model.restore_logits(m[None].float(), ds.metainfo, mode='nearest').round().long()
        ds.set_data(dict(exit_map=PixelData(data=m), exit_computed=fractions[i]))
        if macs is not None:
            ds.set_data(dict(exit_macs=macs[i]))
        ds.set_metainfo(dict(exit_mode=exit_mode))
