"""DToP's exit and decode head for plain ViTs: SegViT's attention-to-mask (ATM) head on the still-active tokens."""
from typing import Dict, List, NamedTuple, Optional, Union

import torch
import torch.nn as nn
from torch import Tensor

from mmseg.models.decode_heads.decode_head import BaseDecodeHead
from mmseg.models.losses import accuracy
from mmseg.models.utils import resize
from mmseg.registry import MODELS
from mmseg.utils import SampleList

from ..masked.vit_tokens import ViTTokens, token_slots
from .atm_layers import ATMDecoderLayer
from .atm_loss import ATM_MASK_LOSSES, atm_losses

__all__ = ['ATMOutputs', 'EarlyExitATMHead']


class ATMOutputs(NamedTuple):
    """What one forward of :class:`EarlyExitATMHead` produced (kept for its loss).

    Attributes:
        scores (Tensor): (B, K, h, w) ``p(present_k) x sigmoid(mask_k)``, the forward's return value.
        cls_logits (Tensor): (B, K, 2) presence logits (index 0 = present).
        mask_logits (Tensor): (B, K, h, w) mask logits (0 at tokens the head did not compute).
    """
    scores: Tensor
    cls_logits: Tensor
    mask_logits: Tensor


@MODELS.register_module()
class EarlyExitATMHead(BaseDecodeHead):
    """Attention-to-mask head (SegViT, Zhang et al., NeurIPS 2022) as DToP (Liu et al., ICCV 2023) uses it at every
    exit and as the final decode head of an :class:`~mmseg_cbt.models.backbones.EarlyExitViT`.

    The grid tokens of a stage go through ``Linear(in_channels, channels)`` and a LayerNorm (the "memory"); one
    learnable query per class passes ``num_layers`` :class:`~.atm_layers.ATMDecoderLayer` s (self-attention among
    the queries, cross-attention to the memory, MLP). The last layer's cross-attention logits, averaged over heads,
    are the mask logits ``m_kt`` of class ``k`` at token ``t``; a ``Linear(channels, 2)`` on each final query gives
    its present / not-present logits. The output is the score map on the token grid (H/p, W/p)::

        score_kt = softmax(presence_k)[present] * sigmoid(m_kt)      (in [0, 1], not summing to 1 over k)

    Scores are probabilities, not logits: ``scores_are_probs = True``, so the stop rules (global, DToP's, CBT) read
    them as they are instead of a softmax; the prediction is their argmax; the segmentor's copy aggregation keeps,
    at a stopped token, the score vector of the exit where it stopped (DToP instead multiplies the final head's
    presence with the mask logit kept on its canvas). CBT's class-mean statistics are formed from these scores in
    the same way: ``p_{n,k}`` = the mean over the training pixels of ground-truth class ``k`` of exit ``n``'s score
    vector, resized to the label size as predictions are (bilinear, so a pixel's vector is a convex combination of
    token score vectors); no normalisation, so a row need not sum to 1. The margin of ``p_{n,k}`` (largest minus
    second largest entry) and CBT's map into ``[alpha, beta]`` are unchanged; with scores that do not sum to 1 more
    than one channel can pass a threshold above 0.5, and the OR-of-channels rule stops the token if any does.

    Under pruning the head runs on the still-active tokens only, like
    :class:`~mmseg_cbt.models.decode_heads.EarlyExitTokenHead`: on a state from the sparse path (stopped tokens
    removed) the memory projection runs on the packed active tokens, the cross-attention keys / values are the
    active tokens of each image (padded to the batch's largest count with a key-padding mask) and only the active
    tokens are scored (0 elsewhere, replaced by the segmentor's copy). On a simulated masked state every token is
    computed but the stopped ones are masked out as keys, so the active tokens' scores equal the sparse path's.

    Training: :meth:`loss_by_feat` reads the presence and mask logits of the head's last forward (the scores passed
    in must be that forward's output) and applies DToP's loss (:func:`~.atm_loss.atm_losses`): presence
    cross-entropy (weight ``cls_weight``, "not present" targets weighted ``absent_weight``) plus mask (weight
    ``mask_weight``) and dice (weight ``dice_weight``) terms of the classes present in the image. ``loss_decode``
    is not used.

    Args:
        num_layers (int): Decoder layers (DToP: 3).
        num_heads (int): Attention heads of the decoder (DToP: 6 for ViT-B, 8 for ViT-L).
        ffn_ratio (int): MLP width of the decoder layers over ``channels``.
        dropout (float): Dropout in the decoder layers (DToP: 0.1).
        mask_loss (str): ``'focal'`` (DToP's criterion) or ``'bce'``.
        cls_weight (float): Weight of the presence loss.
        mask_weight (float): Weight of the mask loss.
        dice_weight (float): Weight of the dice loss.
        absent_weight (float): Class weight of the "not present" target.
        **kwargs: :class:`BaseDecodeHead` arguments (``in_channels``: the ViT width; ``channels``: the decoder
            width, DToP 384 for ViT-B, 512 for ViT-L).
    """

    #: The output is per-class scores in [0, 1] (read as they are by the stop rules and the calibration).
    scores_are_probs = True

    def __init__(self,
                 num_layers: int = 3,
                 num_heads: int = 6,
                 ffn_ratio: int = 4,
                 dropout: float = 0.1,
                 mask_loss: str = 'focal',
                 cls_weight: float = 1.0,
                 mask_weight: float = 20.0,
                 dice_weight: float = 1.0,
                 absent_weight: float = 0.1,
                 **kwargs) -> None:
        # DToP initialises every linear layer truncated-normal (std 0.02); there is no conv_seg to initialise
        kwargs.setdefault('init_cfg', dict(type='TruncNormal', layer='Linear', std=0.02, bias=0.0))
        super().__init__(**kwargs)
        if int(num_layers) < 1:
            raise ValueError(f'EarlyExitATMHead.num_layers must be >= 1, got {num_layers}')
        if not isinstance(self.in_channels, int):
            raise ValueError(f'EarlyExitATMHead reads one token state: in_channels must be an int, '
                             f'got {self.in_channels!r}')
        if self.channels % int(num_heads) != 0:
            raise ValueError(f'EarlyExitATMHead.channels ({self.channels}) must be divisible by num_heads '
                             f'({num_heads})')
        if mask_loss not in ATM_MASK_LOSSES:
            raise ValueError(f'EarlyExitATMHead.mask_loss must be one of {ATM_MASK_LOSSES}, got {mask_loss!r}')
        del self.conv_seg  # the masks come from the queries, there is no per-token classifier
        self.input_proj = nn.Linear(self.in_channels, self.channels)
        self.proj_norm = nn.LayerNorm(self.channels)
        self.queries = nn.Embedding(self.num_classes, self.channels)
        self.decoder = nn.ModuleList(
            ATMDecoderLayer(self.channels, int(num_heads), int(ffn_ratio), float(dropout))
            for _ in range(int(num_layers)))
        self.class_embed = nn.Linear(self.channels, 2)
        self.mask_loss = mask_loss
        self.loss_weights = dict(
            cls_weight=float(cls_weight),
            mask_weight=float(mask_weight),
            dice_weight=float(dice_weight),
            absent_weight=float(absent_weight))
        self.last_outputs: Optional[ATMOutputs] = None

    def _memory(self, state: ViTTokens):
        """The projected grid tokens the queries attend to, their key-padding mask and the packing (or None)."""
        grid = state.grid
        if state.sparse and state.active is not None:
            keep = state.active.flatten(1)
            slots = token_slots(keep)
            mem = self.proj_norm(self.input_proj(grid[keep]))  # the active tokens only, packed (S, C)
            b = grid.shape[0]
            if slots.slot is None:
                return mem.view(b, slots.width, -1), None, slots
            buf = mem.new_zeros(b * slots.width, mem.shape[-1])
            buf[slots.slot] = mem
            return buf.view(b, slots.width, -1), ~slots.valid, slots
        mem = self.proj_norm(self.input_proj(grid))
        pad = None if state.active is None else ~state.active.flatten(1)
        return mem, pad, None

    def forward(self, inputs: Union[ViTTokens, List[ViTTokens]]) -> Tensor:
        """(B, K, h, w) scores on the token grid of ``inputs`` (a token state or a one-element list of one)."""
        state = inputs[-1] if isinstance(inputs, (list, tuple)) else inputs
        b = state.tokens.shape[0]
        h, w = state.hw
        mem, pad, slots = self._memory(state)
        if pad is not None:
            # an image without any active token still needs a key; none of its tokens is scored
            pad = pad & ~pad.all(dim=1, keepdim=True)
        q = self.queries.weight.unsqueeze(0).expand(b, -1, -1)
        for layer in self.decoder:
            q, mask = layer(q, mem, pad)
        cls_logits = self.class_embed(q)
        if slots is not None:
            k = mask.shape[1]
            packed = mask.transpose(1, 2).reshape(-1, k)
            packed = packed if slots.slot is None else packed[slots.slot]
            full = mask.new_zeros(b, h * w, k)
            full[slots.b_idx, slots.t_idx] = packed
            mask = full.transpose(1, 2)
        mask = mask.reshape(b, -1, h, w)
        present = torch.softmax(cls_logits, dim=-1)[..., 0]
        scores = present[:, :, None, None] * mask.sigmoid()
        if slots is not None:
            scores = scores * state.active.unsqueeze(1)  # tokens not computed hold 0, not sigmoid(0) / 2
        self.last_outputs = ATMOutputs(scores, cls_logits, mask)
        return scores

    def loss_by_feat(self, seg_logits: Tensor, batch_data_samples: SampleList) -> Dict[str, Tensor]:
        """DToP's loss (see the class docstring) of the head's last forward, whose output ``seg_logits`` must be.

        Raises:
            RuntimeError: If ``seg_logits`` is not the output of this head's last forward.
        """
        out = self.last_outputs
        if out is None or out.scores is not seg_logits:
            raise RuntimeError('EarlyExitATMHead.loss_by_feat needs the scores of its own last forward (unchanged): '
                               'its loss reads the presence and mask logits of that forward')
        self.last_outputs = None
        labels = self._stack_batch_gt(batch_data_samples).squeeze(1)
        losses = atm_losses(
            out.cls_logits,
            out.mask_logits,
            labels,
            ignore_index=self.ignore_index,
            mask_loss=self.mask_loss,
            align_corners=self.align_corners,
            **self.loss_weights)
        pred = resize(seg_logits, size=labels.shape[-2:], mode='bilinear', align_corners=self.align_corners)
        losses['acc_seg'] = accuracy(pred, labels, ignore_index=self.ignore_index)
        return losses
