"""ADP-C's "redesigned head" (RH) early exit: a small encoder-decoder on the concatenated HRNet branches."""
from typing import List, Tuple

import torch.nn as nn
from mmcv.cnn import ConvModule
from torch import Tensor

from mmseg.models.decode_heads.decode_head import BaseDecodeHead
from mmseg.models.utils import resize
from mmseg.registry import MODELS

from ..masked.heads import DenseRunner

__all__ = ['EarlyExitRHHead']


@MODELS.register_module()
class EarlyExitRHHead(BaseDecodeHead):
    """Encoder-decoder early exit of ADP-C (Liu et al., ICLR 2022).

    All input branches are bilinearly resized to the first (1/4-resolution) branch and concatenated
    (``input_transform='resize_concat'``). Then ``num_down`` "down" steps (AvgPool2d(2) + 1x1 conv + BN + ReLU;
    the first maps the concatenated channels to ``channels``), ``num_up`` "up" steps (x2 bilinear + 1x1 conv + BN +
    ReLU), a final bilinear upsample back to the 1/4 resolution and the 1x1 classifier ``channels -> num_classes``.
    Resizes go to the exact size of the level they return to, so odd input sizes work.

    Args:
        num_down (int): Number of down steps (>= 1). ADP-C: 3 / 2 / 1 for exits 1 / 2 / 3.
        num_up (int): Number of up steps (0 <= num_up < num_down). ADP-C: 2 / 1 / 0.
        **kwargs: :class:`BaseDecodeHead` arguments; ``channels`` is the width I (ADP-C: 128 for W48, 64 for W18).
    """

    def __init__(self, num_down: int = 3, num_up: int = 2, **kwargs):
        kwargs.setdefault('input_transform', 'resize_concat')
        super().__init__(**kwargs)
        if num_down < 1 or not 0 <= num_up < num_down:
            raise ValueError(f'EarlyExitRHHead needs num_down >= 1 and 0 <= num_up < num_down, '
                             f'got num_down={num_down}, num_up={num_up}')
        self.num_down = num_down
        self.num_up = num_up
        conv_kw = dict(kernel_size=1, conv_cfg=self.conv_cfg, norm_cfg=self.norm_cfg, act_cfg=self.act_cfg)
        self.down_convs = nn.ModuleList(
            ConvModule(self.in_channels if i == 0 else self.channels, self.channels, **conv_kw)
            for i in range(num_down))
        self.up_convs = nn.ModuleList(ConvModule(self.channels, self.channels, **conv_kw) for _ in range(num_up))
        self.pool = nn.AvgPool2d(2)

    @property
    def min_input_size(self) -> int:
        """Smallest input side: each of the ``num_down`` 2x2 average poolings needs >= 2 positions."""
        return 2**self.num_down

    def forward(self, inputs: List[Tensor]) -> Tensor:
        """Returns the exit's logits at the resolution of the first input branch (1/4 of the image)."""
        return self.forward_with(inputs, DenseRunner())

    def forward_with(self, inputs: List[Tensor], runner: DenseRunner) -> Tensor:
        """The forward with every conv unit and the classifier run by ``runner`` (dense, simulated-masked or
        sparse: :mod:`mmseg_cbt.models.masked.heads`); pooling and resizes stay dense."""
        x = self._transform_inputs(inputs)
        sizes: List[Tuple[int, int]] = [x.shape[2:]]
        for conv in self.down_convs:
            x = runner.unit(conv, self.pool(x))
            sizes.append(x.shape[2:])
        for i, conv in enumerate(self.up_convs):
            x = runner.unit(conv, resize(x, size=sizes[-2 - i], mode='bilinear', align_corners=self.align_corners))
        x = resize(x, size=sizes[0], mode='bilinear', align_corners=self.align_corners)
        return runner.seg(self, x)
