"""Layers of the attention-to-mask (ATM) decoder: class queries that attend to image tokens, whose attention logits
are the masks (SegViT, Zhang et al., NeurIPS 2022; the head of DToP, Liu et al., ICCV 2023)."""
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

__all__ = ['ATMCrossAttention', 'ATMDecoderLayer']


class ATMCrossAttention(nn.MultiheadAttention):
    """Multi-head cross-attention (batch first) that also returns its attention logits, averaged over the heads.

    The logit of query ``q`` and key ``t`` is the scaled dot product ``<W_q q, W_k t> / sqrt(E / heads)`` averaged
    over the heads, before the softmax: the attention-to-mask head reads it as the mask logit of class ``q`` at
    token ``t``. A subclass of :class:`torch.nn.MultiheadAttention` with the same parameters (``in_proj_weight``,
    ``in_proj_bias``, ``out_proj``), so the FLOPs counter charges it as attention: q / output projections per
    query, k / v projections per key, both matmuls per query-key pair. The output projection runs as a function
    (not a module call) for the same reason.

    Args:
        embed_dim (int): Width E.
        num_heads (int): Heads (E must be divisible by it).
        dropout (float): Dropout on the attention weights in training.
    """

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0) -> None:
        super().__init__(embed_dim, num_heads, dropout=dropout, bias=True, batch_first=True)

    def forward(self,
                query: Tensor,
                key: Tensor,
                value: Tensor,
                key_padding_mask: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        """Attention of ``query`` (B, Q, E) to ``key`` / ``value`` (B, T, E).

        Args:
            query (Tensor): (B, Q, E).
            key (Tensor): (B, T, E).
            value (Tensor): (B, T, E).
            key_padding_mask (Tensor, optional): (B, T) bool, True = not a key (no image may mask all its keys).

        Returns:
            tuple[Tensor, Tensor]: The output (B, Q, E) and the head-averaged attention logits (B, Q, T), in which
            masked keys hold their (unused) dot products.
        """
        b, nq, e = query.shape
        nk = key.shape[1]
        h = self.num_heads
        w, bias = self.in_proj_weight, self.in_proj_bias
        q = F.linear(query, w[:e], bias[:e]).view(b, nq, h, e // h).transpose(1, 2)
        k = F.linear(key, w[e:2 * e], bias[e:2 * e]).view(b, nk, h, e // h).transpose(1, 2)
        v = F.linear(value, w[2 * e:], bias[2 * e:]).view(b, nk, h, e // h).transpose(1, 2)
        logits = torch.matmul(q, k.transpose(-2, -1)) * (e // h)**-0.5  # (B, h, Q, T)
        attn_logits = logits
        if key_padding_mask is not None:
            attn_logits = logits.masked_fill(key_padding_mask[:, None, None, :], float('-inf'))
        attn = F.dropout(torch.softmax(attn_logits, dim=-1), self.dropout, self.training)
        out = torch.matmul(attn, v).transpose(1, 2).reshape(b, nq, e)
        return F.linear(out, self.out_proj.weight, self.out_proj.bias), logits.mean(dim=1)


class ATMDecoderLayer(nn.Module):
    """One post-norm decoder layer of the class queries, as DToP's head stacks them: self-attention among the
    queries, cross-attention to the tokens (:class:`ATMCrossAttention`), a ReLU MLP, each followed by a residual
    add and a LayerNorm.

    Args:
        embed_dim (int): Width of the queries and tokens.
        num_heads (int): Attention heads.
        ffn_ratio (int): MLP hidden width over ``embed_dim``.
        dropout (float): Dropout on attention weights, on every residual branch and inside the MLP (DToP: 0.1).
    """

    def __init__(self, embed_dim: int, num_heads: int, ffn_ratio: int = 4, dropout: float = 0.1) -> None:
        super().__init__()
        # sequence first: a batch-first self-attention in eval mode takes PyTorch's fused fast path, one operator
        # that mmengine's FLOPs counter does not see
        self.self_attn = nn.MultiheadAttention(embed_dim, num_heads, dropout=dropout)
        self.norm1 = nn.LayerNorm(embed_dim)
        self.cross_attn = ATMCrossAttention(embed_dim, num_heads, dropout=dropout)
        self.norm2 = nn.LayerNorm(embed_dim)
        self.linear1 = nn.Linear(embed_dim, embed_dim * ffn_ratio)
        self.linear2 = nn.Linear(embed_dim * ffn_ratio, embed_dim)
        self.norm3 = nn.LayerNorm(embed_dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self,
                queries: Tensor,
                memory: Tensor,
                key_padding_mask: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        """Updates ``queries`` (B, Q, E) from ``memory`` (B, T, E); returns them and the attention logits (B, Q, T)."""
        # mmengine's jit FLOPs check needs the bmm path of nn.MultiheadAttention, which need_weights takes
        q = queries.transpose(0, 1)
        sa = self.self_attn(q, q, q, need_weights=torch.jit.is_tracing())[0]
        queries = self.norm1(queries + self.dropout(sa.transpose(0, 1)))
        ca, logits = self.cross_attn(queries, memory, memory, key_padding_mask=key_padding_mask)
        queries = self.norm2(queries + self.dropout(ca))
        ffn = self.linear2(self.dropout(F.relu(self.linear1(queries))))
        return self.norm3(queries + self.dropout(ffn)), logits
