"""A cheap per-token exit for plain ViTs: LayerNorm, an optional MLP and a linear classifier on every token."""
from typing import List, Union

import torch.nn as nn
from torch import Tensor

from mmseg.models.decode_heads.decode_head import BaseDecodeHead
from mmseg.registry import MODELS

from ..masked.vit_tokens import ViTTokens, gather_active, scatter_active

__all__ = ['EarlyExitTokenHead']


@MODELS.register_module()
class EarlyExitTokenHead(BaseDecodeHead):
    """Per-token exit head on the grid tokens of an :class:`~mmseg_cbt.models.backbones.EarlyExitViT` stage.

    ``LayerNorm(in_channels)`` -> ``num_layers`` x (``Linear`` -> GELU) of width ``channels`` -> dropout ->
    ``Linear`` to ``num_classes`` (``conv_seg`` is that linear layer). Logits are on the token grid (H/p, W/p);
    ``loss_by_feat`` / ``predict_by_feat`` resize them to the labels / image as for any mmseg head. Each token is
    classified on its own, so on a state from the sparse path (stopped tokens removed) the head computes the active
    tokens only and leaves 0 at the others (the segmentor copies their earlier logits there); on any other state it
    computes every token.

    Args:
        num_layers (int): Hidden ``Linear`` + GELU layers (0: a linear classifier on the normalised tokens).
        **kwargs: :class:`BaseDecodeHead` arguments (``in_channels``: the ViT width).
    """

    def __init__(self, num_layers: int = 1, **kwargs) -> None:
        super().__init__(**kwargs)
        if int(num_layers) < 0:
            raise ValueError(f'EarlyExitTokenHead.num_layers must be >= 0, got {num_layers}')
        if not isinstance(self.in_channels, int):
            raise ValueError(f'EarlyExitTokenHead reads one token state: in_channels must be an int, '
                             f'got {self.in_channels!r}')
        self.norm = nn.LayerNorm(self.in_channels)
        layers: List[nn.Module] = []
        width = self.in_channels
        for _ in range(int(num_layers)):
            layers += [nn.Linear(width, self.channels), nn.GELU()]
            width = self.channels
        self.mlp = nn.Sequential(*layers)
        self.conv_seg = nn.Linear(width, self.num_classes)

    def forward(self, inputs: Union[ViTTokens, List[ViTTokens]]) -> Tensor:
        """(B, K, h, w) logits on the token grid of ``inputs`` (a token state or a one-element list of one)."""
        state = inputs[-1] if isinstance(inputs, (list, tuple)) else inputs
        tokens, mask = gather_active(state)
        return scatter_active(self.cls_seg(self.mlp(self.norm(tokens))), mask, state)
