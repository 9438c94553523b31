"""HRNet that runs stage by stage, so that an early-exit segmentor can run an exit between stages."""
from typing import List, Optional, Tuple

import torch
import torch.nn as nn
from torch import Tensor

from mmseg.models.backbones import HRNet
from mmseg.models.utils import resize
from mmseg.registry import MODELS

from .base import EarlyExitBackboneMixin

__all__ = ['EarlyExitHRNet']


@MODELS.register_module()
class EarlyExitHRNet(EarlyExitBackboneMixin, HRNet):
    """mmseg's :class:`HRNet` with a stage-wise interface.

    The module tree (and so the state dict) is exactly mmseg's ``HRNet``: a standard mmseg HRNet checkpoint loads
    with ``strict=True``. :meth:`forward` is the unchanged one-call forward. The stage-wise API splits the same
    computation at the points where the early exits read the features:

    - stage 1 = stem + ``layer1`` (one branch at 1/4 resolution),
    - stage n (n = 2, 3, 4) = ``transition{n-1}`` + ``stage{n}``.

    Masked stages (convs restricted to still-active pixels, at 1/4 resolution) run the same modules through
    :mod:`mmseg_cbt.models.masked` (simulated or sparse).

    Args:
        **kwargs: Passed unchanged to :class:`mmseg.models.backbones.HRNet`.
    """

    num_stages = 4

    def forward_stem(self, x: Tensor) -> Tensor:
        """Runs the two stride-2 stem convolutions (input -> 1/4 resolution, 64 channels)."""
        x = self.relu(self.norm1(self.conv1(x)))
        x = self.relu(self.norm2(self.conv2(x)))
        return x

    def forward_stage(self, stage: int, feats: List[Tensor]) -> List[Tensor]:
        """Runs one stage.

        Args:
            stage (int): 1-based stage index in ``[1, 4]``.
            feats (list[Tensor]): For ``stage == 1`` a one-element list holding the image batch (N, 3, H, W);
                otherwise the branch outputs of the previous stage.

        Returns:
            list[Tensor]: The branch outputs of this stage (stage 1: one branch; stage n: n branches).
        """
        if stage == 1:
            return [self.layer1(self.forward_stem(feats[0]))]
        if stage not in (2, 3, 4):
            raise ValueError(f'stage must be in [1, 4], got {stage}')
        x_list = [src if layer is None else layer(src) for layer, src in self.transition_inputs(stage, feats)]
        # HRModule.forward writes into its input list: hand it a copy so the caller's list stays intact
        return getattr(self, f'stage{stage}')(list(x_list))

    def transition_inputs(self, stage: int, feats: List[Tensor]) -> List[Tuple[Optional[nn.Module], Tensor]]:
        """Per branch of stage ``stage`` (2-4): its transition layer (None: the branch passes through) and the
        tensor it reads. Same rule as mmseg's ``HRNet.forward``: new branches are made from the lowest-resolution
        branch of the previous stage."""
        transition = getattr(self, f'transition{stage - 1}')
        num_branches = getattr(self, f'stage{stage}_cfg')['num_branches']
        return [(transition[i], feats[i] if i < len(feats) else feats[-1]) for i in range(num_branches)]

    def forward_stage_masked(self,
                             stage: int,
                             feats: List[Tensor],
                             active: Tensor,
                             sparse: bool = False,
                             fill: str = 'copy') -> List[Tensor]:
        """Runs transition ``stage - 1`` and stage ``stage`` (2-4) restricted to the active pixels.

        Args:
            stage (int): 2, 3 or 4.
            feats (list[Tensor]): The previous stage's branch outputs.
            active (Tensor): (B, H/4, W/4) bool, pixels still computing.
            sparse (bool): Skip the stopped pixels for real (sparse convs) instead of computing densely and masking.
            fill (str): What stopped positions hold: ``'copy'``, ``'zeros'`` or ``'rbf'``.
        """
        from ..masked import MaskContext, check_fill
        from ..masked.hrnet_simulated import simulate_stage
        check_fill(fill)
        if bool(active.all()):
            return self.forward_stage(stage, feats)  # nothing stopped: the dense stage has the same semantics
        if sparse:
            from ..masked.hrnet_sparse import sparse_stage
            return sparse_stage(self, stage, feats, active, fill)
        return simulate_stage(self, stage, feats, MaskContext(active, fill))

    def stage_modules(self, stage: int) -> Tuple[str, ...]:
        """Stage 1: the stem (convs and norms) and ``layer1``; stage n: ``transition{n-1}`` and ``stage{n}``."""
        if stage == 1:
            return ('conv1', self.norm1_name, 'conv2', self.norm2_name, 'layer1')
        if stage not in (2, 3, 4):
            raise ValueError(f'stage must be in [1, 4], got {stage}')
        return (f'transition{stage - 1}', f'stage{stage}')

    def exit_feature(self, stage: int, feats: List[Tensor]) -> Tensor:
        """The stage's branches bilinearly resized to the first (1/4) branch and concatenated, as the RH and FCN
        heads read them (``input_transform='resize_concat'``)."""
        size = feats[0].shape[2:]
        return torch.cat(
            [feats[0]] + [resize(f, size=size, mode='bilinear', align_corners=False) for f in feats[1:]], dim=1)

    def min_input_side(self, feature_side: int = 1) -> int:
        """Two stride-2 stem convs (k3, p1) give ``ceil(ceil(H / 2) / 2)`` at 1/4 resolution, and the stride-2
        transitions keep every lower branch at >= 1 position: the 1/4 map needs ``feature_side``."""
        return 4 * (max(int(feature_side), 1) - 1) + 1

    def stage_out_channels(self) -> List[List[int]]:
        """Channels of each stage's branch outputs, e.g. ``[[256], [18, 36], [18, 36, 72], [18, 36, 72, 144]]``."""
        chans = []
        s1 = self.extra['stage1']
        chans.append([s1['num_channels'][0] * self.blocks_dict[s1['block']].expansion])
        for n in (2, 3, 4):
            cfg = self.extra[f'stage{n}']
            chans.append([c * self.blocks_dict[cfg['block']].expansion for c in cfg['num_channels']])
        return chans
