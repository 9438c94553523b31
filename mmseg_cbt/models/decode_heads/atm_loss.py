"""The loss of an attention-to-mask head as DToP trains it: class presence, and mask / dice terms of the present
classes (Liu et al., ICCV 2023, after SegViT and MaskFormer's set criterion with one query per class)."""
from typing import Dict

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from mmseg.models.utils import resize

__all__ = ['ATM_MASK_LOSSES', 'present_classes', 'atm_losses']

#: Mask terms: ``focal`` (sigmoid focal loss, alpha 0.25, gamma 2: what DToP's released criterion applies as its
#: "mask" loss) or ``bce`` (plain sigmoid binary cross-entropy).
ATM_MASK_LOSSES = ('focal', 'bce')


def present_classes(labels: Tensor, num_classes: int, ignore_index: int) -> Tensor:
    """(B, K) bool: class ``k`` occurs among the labelled pixels of image ``b`` (``ignore_index`` and values
    outside ``[0, K)`` are not labelled)."""
    b = labels.shape[0]
    valid = (labels != ignore_index) & (labels >= 0) & (labels < num_classes)
    lab = torch.where(valid, labels, torch.full_like(labels, num_classes)).reshape(b, -1).long()
    hit = torch.zeros(b, num_classes + 1, dtype=torch.bool, device=labels.device)
    hit.scatter_(1, lab, True)
    return hit[:, :num_classes]


def _num_masks(count: int, device: torch.device) -> float:
    """Present masks per rank (averaged over ranks when distributed), at least 1, as DToP normalises."""
    n = torch.tensor([float(count)], device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(n)
        n = n / dist.get_world_size()
    return max(float(n), 1.0)


def atm_losses(cls_logits: Tensor,
               mask_logits: Tensor,
               labels: Tensor,
               ignore_index: int = 255,
               cls_weight: float = 1.0,
               mask_weight: float = 20.0,
               dice_weight: float = 1.0,
               absent_weight: float = 0.1,
               mask_loss: str = 'focal',
               focal_alpha: float = 0.25,
               focal_gamma: float = 2.0,
               align_corners: bool = False) -> Dict[str, Tensor]:
    """DToP's loss of one attention-to-mask head.

    * ``loss_cls``: 2-way cross-entropy of every class query, target "present" when the class occurs in the
      image, "not present" otherwise; the "not present" target is weighted ``absent_weight`` (MaskFormer's 0.1),
      the weighted mean over all queries of the batch.
    * ``loss_mask``: for every (image, present class), the mask logits resized bilinearly to the label size
      against the binary map ``label == k``; per mask the mean over the labelled pixels, then summed over masks and
      divided by the number of present masks in the batch.
    * ``loss_dice``: ``1 - (2 sum(p t) + 1) / (sum(p) + sum(t) + 1)`` with ``p = sigmoid(mask logit)`` over the
      labelled pixels, summed and normalised the same way.

    Pixels labelled ``ignore_index`` take no part in the mask terms (DToP counts them as background of every class).

    Args:
        cls_logits (Tensor): (B, K, 2) presence logits (index 0 = present).
        mask_logits (Tensor): (B, K, h, w) mask logits.
        labels (Tensor): (B, H, W) ground truth.
        ignore_index (int): Unlabelled pixels.
        cls_weight (float): Weight of ``loss_cls`` (DToP: 1).
        mask_weight (float): Weight of ``loss_mask`` (DToP: 20).
        dice_weight (float): Weight of ``loss_dice`` (DToP: 1).
        absent_weight (float): Class weight of the "not present" target (DToP: 0.1).
        mask_loss (str): One of :data:`ATM_MASK_LOSSES`.
        focal_alpha (float): Focal loss alpha.
        focal_gamma (float): Focal loss gamma.
        align_corners (bool): Of the resize to the label size.

    Returns:
        dict[str, Tensor]: ``loss_cls``, ``loss_mask``, ``loss_dice`` (weighted).
    """
    if mask_loss not in ATM_MASK_LOSSES:
        raise ValueError(f'mask_loss must be one of {ATM_MASK_LOSSES}, got {mask_loss!r}')
    k = cls_logits.shape[1]
    present = present_classes(labels, k, ignore_index)
    target = (~present).long()  # 0 = present, 1 = not present
    weight = cls_logits.new_tensor([1.0, float(absent_weight)])
    loss_cls = F.cross_entropy(cls_logits.reshape(-1, 2).float(), target.reshape(-1), weight=weight)
    b_idx, c_idx = present.nonzero(as_tuple=True)
    num_masks = _num_masks(int(b_idx.numel()), cls_logits.device)
    if b_idx.numel() == 0:
        zero = mask_logits.sum() * 0.0  # keeps the graph (and DDP) intact on images without labels
        return dict(loss_cls=loss_cls * cls_weight, loss_mask=zero, loss_dice=zero)
    logits = resize(
        mask_logits[b_idx, c_idx].unsqueeze(1).float(),
        size=labels.shape[-2:],
        mode='bilinear',
        align_corners=align_corners,
        warning=False).squeeze(1)  # (P, H, W)
    lab = labels[b_idx]
    valid = ((lab != ignore_index) & (lab >= 0) & (lab < k)).float()
    tgt = (lab == c_idx.view(-1, 1, 1)).float()
    bce = F.binary_cross_entropy_with_logits(logits, tgt, reduction='none')
    prob = logits.sigmoid()
    if mask_loss == 'focal':
        p_t = prob * tgt + (1 - prob) * (1 - tgt)
        alpha_t = focal_alpha * tgt + (1 - focal_alpha) * (1 - tgt)
        bce = alpha_t * bce * (1 - p_t)**focal_gamma
    per_mask = (bce * valid).flatten(1).sum(1) / valid.flatten(1).sum(1).clamp_min(1.0)
    p, t = (prob * valid).flatten(1), (tgt * valid).flatten(1)
    dice = 1 - (2 * (p * t).sum(1) + 1) / (p.sum(1) + t.sum(1) + 1)
    return dict(
        loss_cls=loss_cls * cls_weight,
        loss_mask=per_mask.sum() / num_masks * mask_weight,
        loss_dice=dice.sum() / num_masks * dice_weight)
