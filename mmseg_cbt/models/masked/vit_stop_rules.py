"""Per-class scores of an exit and DToP's stop rule with top-k retention.

Every stop rule reads per-class scores in [0, 1] at each position: the softmax of the exit's logits, or the
exit's own output when its head declares ``scores_are_probs = True`` (a head whose scores are already
probabilities, not necessarily summing to 1, such as an attention-to-mask head's ``p(present) x sigmoid(mask)``).
"""
from typing import Optional

import torch
import torch.nn as nn
from torch import Tensor

__all__ = ['exit_scores', 'dtop_stop_mask']


def exit_scores(head: nn.Module, logits: Tensor) -> Tensor:
    """(B, K, h, w) per-class scores in [0, 1] of an exit's output: ``logits`` itself when ``head`` declares
    ``scores_are_probs``, else their softmax over classes (float32)."""
    if getattr(head, 'scores_are_probs', False):
        return logits.float()
    return torch.softmax(logits.float(), dim=1)


def dtop_stop_mask(scores: Tensor, threshold: float, topk: int = 5, active: Optional[Tensor] = None) -> Tensor:
    """DToP's rule (Liu et al., ICCV 2023): a position stops when its largest class score exceeds ``threshold``,
    except that for every predicted class the ``topk`` most confident positions of the image stay active to keep
    context.

    Only positions still ``active`` compete (the scores at stopped positions are copies of earlier exits). A
    class's ``topk`` most confident positions among its confident ones are the same as among all its active
    positions (confident ones score higher), so the retention is taken over the latter. Ties go to the earlier
    position in raster order.

    Args:
        scores (Tensor): (B, K, h, w) per-class scores (see :func:`exit_scores`).
        threshold (float): Global confidence threshold (DToP: 0.9 for ViT-B, 0.95 for ViT-L).
        topk (int): Positions kept active per predicted class (DToP: 5); 0 disables the retention.
        active (Tensor, optional): (B, h, w) bool, positions still computing (None: all).

    Returns:
        Tensor: (B, h, w) bool, True = stops.
    """
    b, k, h, w = scores.shape
    val, cls = scores.flatten(2).max(dim=1)  # (B, h*w)
    stop = val > threshold
    if active is not None:
        act = active.flatten(1)
        stop &= act
    if topk > 0:
        # per image and class, the positions predicted as that class ranked by confidence; non-members score -1
        member = torch.nn.functional.one_hot(cls, k).transpose(1, 2).bool()  # (B, K, h*w)
        if active is not None:
            member &= act.unsqueeze(1)
        ranked = torch.where(member, val.unsqueeze(1).double(), -1.0)
        # a stable descending sort keeps the earlier position first among equal scores
        order = torch.sort(ranked, dim=2, descending=True, stable=True).indices[..., :min(topk, h * w)]
        top = torch.gather(member, 2, order)
        retain = torch.zeros_like(member).scatter_(2, order, top).any(dim=1)
        stop &= ~retain
    return stop.view(b, h, w)
