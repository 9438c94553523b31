"""HRNet that runs stage by stage, so that an early-exit segmentor can run an exit between stages."""
from typing import List, Optional, Tuple

import torch.nn as nn
from torch import Tensor

from mmseg.models.backbones import HRNet
from mmseg.registry import MODELS

__all__ = ['EarlyExitHRNet']


@MODELS.register_module()
class EarlyExitHRNet(HRNet):
    """mmseg's :class:`HRNet` with a stage-wise interface.

    The module tree (and so the state dict) is exactly mmseg's ``HRNet``: a standard mmseg HRNet checkpoint loads
    with ``strict=True``. :meth:`forward` is the unchanged one-call forward. The stage-wise API splits the same
    computation at the points where the early exits read the features:

    - stage 1 = stem + ``layer1`` (one branch at 1/4 resolution),
    - stage n (n = 2, 3, 4) = ``transition{n-1}`` + ``stage{n}``.

    The masked-inference path (which restricts convs to still-active pixels) lives in
    :mod:`mmseg_cbt.models.backbones.masked_hrnet` and uses these same modules.

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

    def forward_stages(self, x: Tensor) -> List[List[Tensor]]:
        """Runs all stages and returns every stage's branch outputs.

        Args:
            x (Tensor): Image batch (N, 3, H, W).

        Returns:
            list[list[Tensor]]: ``outs[n]`` holds the branch outputs of stage ``n + 1``.
        """
        outs = []
        feats: List[Tensor] = [x]
        for stage in range(1, self.num_stages + 1):
            feats = self.forward_stage(stage, feats)
            outs.append(feats)
        return outs

    def forward_stage_masked(self, stage: int, feats: List[Tensor], active: Tensor, sparse: bool = False,
                             fill: str = 'copy') -> List[Tensor]:
        """Runs stage ``stage`` (2-4) restricted to the active pixels (see :mod:`.masked_hrnet`).

        Args:
            stage (int): 2, 3 or 4.
            feats (list[Tensor]): The previous stage's branch outputs.
            active (Tensor): (B, H/4, W/4) bool, pixels still computing.
            sparse (bool): Skip the stopped pixels for real (sparse convs) instead of computing densely and masking.
            fill (str): What stopped positions hold: ``'copy'``, ``'zeros'`` or ``'rbf'``.
        """
        from .masked_hrnet import MaskContext, simulate_stage
        if bool(active.all()):
            return self.forward_stage(stage, feats)  # nothing stopped: the dense stage has the same semantics
        if sparse:
            from .sparse_hrnet import sparse_stage
            return sparse_stage(self, stage, feats, active, fill)
        return simulate_stage(self, stage, feats, MaskContext(active, fill))

    def forward_head_masked(self, head, feats: List[Tensor], active: Tensor, sparse: bool = False,
                            fill: str = 'copy') -> Tensor:
        """Runs an exit head restricted to the active pixels (see :mod:`.masked_hrnet`)."""
        from .masked_hrnet import MaskContext, simulate_head
        if bool(active.all()):
            return head(feats)
        if sparse:
            from .sparse_hrnet import sparse_head
            return sparse_head(head, feats, active, fill)
        return simulate_head(head, feats, MaskContext(active, fill))

    def stage_out_channels(self) -> List[List[int]]:
        """Channels of each stage's branch outputs, e.g. ``[[256], [18, 36], [18, 36, 72], [18, 36, 72, 144]]``."""
        chans = []
        s1 = self.extra['stage1']
        chans.append([s1['num_channels'][0] * self.blocks_dict[s1['block']].expansion])
        for n in (2, 3, 4):
            cfg = self.extra[f'stage{n}']
            chans.append([c * self.blocks_dict[cfg['block']].expansion for c in cfg['num_channels']])
        return chans
