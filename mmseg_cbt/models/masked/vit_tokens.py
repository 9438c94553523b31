"""Token state of a plain ViT under early exit, and its transformer blocks restricted to the active tokens.

A stage of :class:`~mmseg_cbt.models.backbones.EarlyExitViT` hands a :class:`ViTTokens` to the next stage and to
its exit head. Its ``tokens`` always hold every token (extra tokens such as the class token first, then the
``h x w`` grid in raster order); a stopped token keeps the features it had when it stopped ("copy", as DToP's
token canvas, Liu et al., ICCV 2023). Two executions of the blocks of a stage share these semantics:

* :func:`simulated_blocks` (the oracle, differentiable, used in training): every token is computed, stopped tokens
  are masked out of attention as keys (``key_padding_mask``) and frozen after every block;
* :func:`sparse_blocks` (inference): stopped tokens are removed for real - they are neither queries nor keys /
  values and skip the MLP, so every linear layer and both attention matmuls run on the active tokens only.

Extra tokens never stop.
"""
from dataclasses import dataclass, replace
from typing import NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    'VIT_FILL_MODES', 'ViTTokens', 'TokenSlots', 'token_keep', 'token_slots', 'block_forward', 'simulated_blocks',
    'sparse_blocks', 'padded_attention_waste', 'PADDED_ATTENTION_MAX_WASTE', 'gather_active', 'scatter_active'
]

#: Fills a ViT stage supports: ``copy`` (a stopped token keeps its features) or ``zeros`` (it holds 0). Neither
#: changes an active token (stopped tokens are no keys) nor a logit (the segmentor copies stopped positions).
VIT_FILL_MODES = ('copy', 'zeros')


@dataclass
class ViTTokens:
    """What a ViT stage returns (the segmentor treats it as opaque).

    Attributes:
        tokens (Tensor): (B, N, C), ``N = num_extra + h * w``.
        hw (tuple[int, int]): The token grid (h, w).
        num_extra (int): Leading tokens that are not on the grid (the class token).
        active (Tensor, optional): (B, h, w) bool mask of the grid tokens the producing stage computed (None: all).
        sparse (bool): The producing stage removed the stopped tokens for real; an exit head reading this state then
            computes on the active tokens only.
    """
    tokens: Tensor
    hw: Tuple[int, int]
    num_extra: int = 0
    active: Optional[Tensor] = None
    sparse: bool = False

    @property
    def grid(self) -> Tensor:
        """The grid tokens (B, h * w, C)."""
        return self.tokens[:, self.num_extra:]

    def feature_map(self) -> Tensor:
        """The grid tokens as a feature map (B, C, h, w)."""
        b, _, c = self.tokens.shape
        return self.grid.reshape(b, self.hw[0], self.hw[1], c).permute(0, 3, 1, 2).contiguous()

    def with_tokens(self, tokens: Tensor, active: Optional[Tensor] = None, sparse: bool = False) -> 'ViTTokens':
        """A copy holding ``tokens`` (computed with mask ``active``, by the sparse path when ``sparse``)."""
        return replace(self, tokens=tokens, active=active, sparse=sparse)


def token_keep(state: ViTTokens, active: Tensor) -> Tensor:
    """(B, N) bool: the extra tokens and the active grid tokens.

    Raises:
        ValueError: If ``active`` is not a (B, h, w) bool mask on this state's grid.
    """
    b = state.tokens.shape[0]
    if active.dtype != torch.bool or tuple(active.shape) != (b, ) + tuple(state.hw):
        raise ValueError(f'active must be a ({b}, {state.hw[0]}, {state.hw[1]}) bool mask on the token grid, got '
                         f'{tuple(active.shape)} {active.dtype}')
    extra = active.new_ones((b, state.num_extra))
    return torch.cat([extra, active.flatten(1)], dim=1)


class TokenSlots(NamedTuple):
    """Where the active tokens of a batch go when packed, and their slots in a padded (B, width) layout.

    Attributes:
        b_idx (Tensor): (S,) image of every active token (raster order within an image).
        t_idx (Tensor): (S,) its position in the sequence.
        width (int): The largest active count of the batch.
        slot (Tensor, optional): (S,) its row in the flattened (B * width) padded layout; None when every image
            keeps ``width`` tokens (the packed layout is then already (B, width)).
        valid (Tensor, optional): (B, width) bool, True = a real token, False = padding; None with ``slot``.
        counts (tuple[int, ...]): Active tokens per image (the packed layout holds them image after image).
    """
    b_idx: Tensor
    t_idx: Tensor
    width: int
    slot: Optional[Tensor]
    valid: Optional[Tensor]
    counts: Tuple[int, ...]


def token_slots(keep: Tensor) -> TokenSlots:
    """Packing indices of the (B, N) bool mask ``keep`` (True = active), see :class:`TokenSlots`."""
    b = keep.shape[0]
    counts = keep.sum(dim=1)
    width = int(counts.max())
    b_idx, t_idx = keep.nonzero(as_tuple=True)
    per_image = tuple(int(c) for c in counts.tolist())
    if bool((counts == width).all()):
        return TokenSlots(b_idx, t_idx, width, None, None, per_image)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(b_idx.shape[0], device=keep.device) - starts[b_idx]
    valid = torch.arange(width, device=keep.device).unsqueeze(0) < counts.unsqueeze(1)
    return TokenSlots(b_idx, t_idx, width, b_idx * width + rank, valid.view(b, width), per_image)


def block_forward(layer: nn.Module, x: Tensor, key_padding_mask: Optional[Tensor] = None) -> Tensor:
    """mmseg's ``TransformerEncoderLayer.forward`` on (B, N, C) tokens, with the same modules and parameters, but
    attention through PyTorch's fused kernel instead of materialising the attention weights mmcv asks for.

    Args:
        layer (nn.Module): An mmseg ``TransformerEncoderLayer``.
        x (Tensor): (B, N, C) tokens.
        key_padding_mask (Tensor, optional): (B, N) bool, True = not a key.
    """
    h = layer.norm1(x).transpose(0, 1)  # mmcv's batch-first wrapper around a sequence-first nn.MultiheadAttention
    # mmengine's jit counter has no handle for the fused kernel: while tracing, take the bmm path it counts
    out = layer.attn.attn(h, h, h, key_padding_mask=key_padding_mask, need_weights=torch.jit.is_tracing())[0]
    x = x + layer.attn.dropout_layer(layer.attn.proj_drop(out.transpose(0, 1)))
    return layer.ffn(layer.norm2(x), identity=x)


def _freeze(new: Tensor, old: Tensor, keep: Tensor, fill: str) -> Tensor:
    return torch.where(keep.unsqueeze(-1), new, old if fill == 'copy' else torch.zeros_like(new))


def simulated_blocks(layers: Sequence[nn.Module],
                     x: Tensor,
                     keep: Tensor,
                     fill: str = 'copy',
                     norm: Optional[nn.Module] = None) -> Tensor:
    """Runs mmseg ``TransformerEncoderLayer`` s on all tokens with the stopped ones masked out as keys and frozen.

    Args:
        layers (Sequence[nn.Module]): The blocks, in order.
        x (Tensor): (B, N, C) tokens.
        keep (Tensor): (B, N) bool, True = active.
        fill (str): One of :data:`VIT_FILL_MODES`.
        norm (nn.Module, optional): A norm applied after the last block (the ViT's ``final_norm``), masked alike.

    Returns:
        Tensor: (B, N, C); equal to the input at stopped tokens (``copy``) or 0 there (``zeros``).
    """
    ignore = ~keep
    for layer in layers:
        x = _freeze(block_forward(layer, x, ignore), x, keep, fill)
    if norm is not None:
        x = _freeze(norm(x), x, keep, fill)
    return x


# padded attention costs B * M^2 against sum n^2; above this ratio one SDPA call per image is as fast or faster
PADDED_ATTENTION_MAX_WASTE = 1.05


def padded_attention_waste(counts: Sequence[int]) -> float:
    """Attention work of the padded (B, max n) layout over the exact sum of n^2 (1.0 when the counts are equal)."""
    exact = sum(n * n for n in counts)
    return len(counts) * max(counts)**2 / exact if exact else 1.0


def _attention(layer: nn.Module, xp: Tensor, slots: TokenSlots, pad_mask: Optional[Tensor]) -> Tensor:
    """Self-attention of one mmseg block on packed tokens ``xp`` (S, C).

    q/k/v and the output projection run once on the packed tokens. The attention core runs on a padded (B, M)
    layout with a key-padding mask, or, when padding would waste more than ``PADDED_ATTENTION_MAX_WASTE`` of the
    work (very unequal counts), as one SDPA call per image on its own packed slice (no mask, no padding).
    """
    mha = layer.attn.attn
    c = xp.shape[-1]
    heads, d = mha.num_heads, c // mha.num_heads
    batch, width = len(slots.counts), slots.width
    qkv = F.linear(layer.norm1(xp), mha.in_proj_weight, mha.in_proj_bias)
    if slots.slot is not None and padded_attention_waste(slots.counts) > PADDED_ATTENTION_MAX_WASTE:
        outs = []
        for part in qkv.split(list(slots.counts)):
            q, k, v = part.view(1, -1, 3, heads, d).permute(2, 0, 3, 1, 4).unbind(0)
            outs.append(F.scaled_dot_product_attention(q, k, v)[0].transpose(0, 1).reshape(-1, c))
        o = torch.cat(outs)
    else:
        if slots.slot is not None:
            buf = qkv.new_zeros(batch * width, 3 * c)
            buf[slots.slot] = qkv
            qkv = buf
        q, k, v = qkv.view(batch, width, 3, heads, d).permute(2, 0, 3, 1, 4).unbind(0)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=pad_mask)
        o = o.transpose(1, 2).reshape(batch * width, c)
        if slots.slot is not None:
            o = o[slots.slot]
    o = F.linear(o, mha.out_proj.weight, mha.out_proj.bias)
    return xp + layer.attn.dropout_layer(layer.attn.proj_drop(o))


def sparse_blocks(layers: Sequence[nn.Module],
                  x: Tensor,
                  keep: Tensor,
                  fill: str = 'copy',
                  norm: Optional[nn.Module] = None) -> Tensor:
    """Runs mmseg ``TransformerEncoderLayer`` s on the active tokens only (inference).

    The active tokens of all images are packed into one (S, C) sequence, so norms, q/k/v and output projections
    and the MLP run on exactly the active tokens. Only attention needs per-image sequences: the packed q/k/v are
    scattered into (B, M) slots, M = the largest active count of the batch, with a key-padding mask. Why this
    layout: attention then costs B M^2 (= the exact n^2 at batch 1, where no mask is built at all), whereas one
    packed sequence with a block-diagonal mask costs (sum n)^2, i.e. about B times more, and a Python loop over
    images runs every block B times with small matmuls; the linear layers, which dominate at ViT token counts,
    never see a padded slot. When B M^2 exceeds sum n^2 by more than ``PADDED_ATTENTION_MAX_WASTE`` only the
    attention core runs per image (one SDPA call each on its packed slice; ViT-B heads, 614 + 410 tokens: 27 ms
    against 39 ms padded). Jagged nested tensors would avoid both, but their SDPA is 6-40x slower on CPU
    (torch 2.13).

    Args:
        layers (Sequence[nn.Module]): The blocks, in order (eval mode: dropout and drop-path are identities).
        x (Tensor): (B, N, C) tokens.
        keep (Tensor): (B, N) bool, True = active.
        fill (str): One of :data:`VIT_FILL_MODES`.
        norm (nn.Module, optional): A norm applied to the active tokens after the last block.

    Returns:
        Tensor: (B, N, C): the blocks' output at active tokens, the input (``copy``) or 0 (``zeros``) elsewhere;
        equal to :func:`simulated_blocks` at active tokens.
    """
    b = x.shape[0]
    slots = token_slots(keep)
    xp = x[slots.b_idx, slots.t_idx]
    pad_mask = None if slots.valid is None else slots.valid.view(b, 1, 1, slots.width)
    for layer in layers:
        xp = _attention(layer, xp, slots, pad_mask)
        xp = layer.ffn(layer.norm2(xp), identity=xp)
    if norm is not None:
        xp = norm(xp)
    out = x.clone() if fill == 'copy' else torch.zeros_like(x)
    out[slots.b_idx, slots.t_idx] = xp
    return out


def gather_active(state: ViTTokens) -> Tuple[Tensor, Optional[Tensor]]:
    """The grid tokens an exit head computes on: (S, C) packed active tokens and the (B, h * w) mask when the
    state came from the sparse path with a mask, else all grid tokens (B, h * w, C) and None."""
    if state.sparse and state.active is not None:
        m = state.active.flatten(1)
        return state.grid[m], m
    return state.grid, None


def scatter_active(values: Tensor, mask: Optional[Tensor], state: ViTTokens) -> Tensor:
    """Per-token head outputs back to a (B, K, h, w) map (0 at tokens the head did not compute)."""
    b = state.tokens.shape[0]
    h, w = state.hw
    if mask is None:
        return values.transpose(1, 2).reshape(b, -1, h, w)
    out = values.new_zeros(b, h * w, values.shape[-1])
    out[mask] = values
    return out.transpose(1, 2).reshape(b, -1, h, w)
