"""Exit heads under masked execution: one forward per head family, parameterised by how a layer is run.

A head's forward is written once against a *runner* (:class:`DenseRunner`, :class:`SimulatedRunner`,
:class:`SparseRunner`), which decides how each conv unit and the classifier run: densely, densely then masked
(the oracle), or on the active positions only. :class:`~mmseg_cbt.models.decode_heads.EarlyExitRHHead` defines
``forward_with(inputs, runner)``; mmseg's ``FCNHead`` (the final exit of HRNetV2) gets :func:`fcn_forward_with`.
Heads that support neither run densely (their stopped positions are replaced by the segmentor's copy).
"""
from typing import List, Optional

import torch
import torch.nn as nn
from torch import Tensor

from .semantics import MaskContext

__all__ = ['DenseRunner', 'SimulatedRunner', 'SparseRunner', 'fcn_forward_with', 'forward_head_masked']


class DenseRunner:
    """Runs every layer as the module does (the plain forward)."""

    def supports(self, head: nn.Module) -> bool:
        """Whether this runner can execute every layer of ``head``."""
        return True

    def unit(self, module: nn.Module, x: Tensor) -> Tensor:
        """A conv unit (``ConvModule``: conv, norm, activation)."""
        return module(x)

    def seg(self, head: nn.Module, x: Tensor) -> Tensor:
        """The classifier (``cls_seg``: dropout + 1x1 conv)."""
        return head.cls_seg(x)


class SimulatedRunner(DenseRunner):
    """Computes every layer densely and applies the mask and fill to its output (the test oracle)."""

    def __init__(self, ctx: MaskContext) -> None:
        self.ctx = ctx

    def unit(self, module: nn.Module, x: Tensor) -> Tensor:
        return self.ctx.apply(module(x))

    def seg(self, head: nn.Module, x: Tensor) -> Tensor:
        return self.ctx.apply(head.cls_seg(x))


class SparseRunner(DenseRunner):
    """Computes 1x1 conv units and the classifier at the active positions only (inference).

    Args:
        ctx (SparseContext): Sparse indices, masks and fill of one exit.
    """

    def __init__(self, ctx) -> None:
        self.ctx = ctx

    def supports(self, head: nn.Module) -> bool:
        convs = [m for m in head.modules() if isinstance(m, nn.Conv2d)]
        return all(c.kernel_size == (1, 1) and c.stride == (1, 1) for c in convs)

    def unit(self, module: nn.Module, x: Tensor) -> Tensor:
        return self.ctx.pointwise(module.conv, getattr(module, 'bn', None), module.with_activation, x)

    def seg(self, head: nn.Module, x: Tensor) -> Tensor:
        return self.ctx.pointwise(head.conv_seg, None, False, x)


def fcn_forward_with(head: nn.Module, inputs: List[Tensor], runner: DenseRunner) -> Tensor:
    """mmseg's ``FCNHead`` forward (``concat_input=False``) with every layer run by ``runner``."""
    x = head._transform_inputs(inputs)
    for conv in head.convs:
        x = runner.unit(conv, x)
    return runner.seg(head, x)


def _forward_with(head: nn.Module):
    """The runner-parameterised forward of ``head``, or None when it has none (it then runs densely)."""
    if hasattr(head, 'forward_with'):
        return head.forward_with
    from mmseg.models.decode_heads import FCNHead
    if isinstance(head, FCNHead) and not head.concat_input:
        return lambda inputs, runner: fcn_forward_with(head, inputs, runner)
    return None


def forward_head_masked(head: nn.Module,
                        feats: List[Tensor],
                        active: Optional[Tensor],
                        sparse: bool = False,
                        fill: str = 'copy') -> Tensor:
    """Runs an exit head restricted to the active positions.

    Args:
        head (nn.Module): The exit head.
        feats (list[Tensor]): What the head reads (the stage's outputs).
        active (Tensor, optional): (B, h, w) bool at the head's output resolution; None or all True: dense.
        sparse (bool): Compute at the active positions only (inference) instead of densely then masked.
        fill (str): One of :data:`~mmseg_cbt.models.masked.FILL_MODES`.

    Returns:
        Tensor: Logits; only the active positions are meaningful (the segmentor copies the rest).
    """
    forward_with = _forward_with(head)
    if active is None or bool(active.all()) or forward_with is None:
        return head(feats)
    if sparse:
        from .sparse_context import SparseContext
        runner: DenseRunner = SparseRunner(SparseContext(active, fill))
        if not runner.supports(head):
            return head(feats)
        with torch.no_grad():
            return forward_with(feats, runner)
    return forward_with(feats, SimulatedRunner(MaskContext(active, fill)))
