"""The early-exit backbone contract: what a segmentor with exits needs from a backbone.

:class:`~mmseg_cbt.models.segmentors.EarlyExitEncoderDecoder` (per-exit forward, losses, stop masks, calibration)
and :mod:`mmseg_cbt.analysis` (per-exit GFLOPs) depend only on the members below, so a new backbone family plugs
in by implementing them:

* ``num_stages``: the number of stages; exit ``n`` (1-based) reads the output of stage ``n``, the last exit is
  the decode head.
* :meth:`forward_stage`: run stage ``n`` on the previous stage's output (stage 1 receives ``[inputs]``). What a
  stage returns (``feats``) is opaque to the segmentor: it is handed to the next stage and to the exit head.
* :meth:`forward_stage_masked`: run stage ``n`` (n >= 2) restricted to the positions still active after exit
  ``n - 1`` (``active``: (B, h, w) bool at the resolution of the exits' logits), either simulated (computed
  densely, then masked with the fill rule of :mod:`mmseg_cbt.models.masked.semantics`; differentiable, the test
  oracle) or for real (``sparse=True``, inference only, the same values at active positions).
* :meth:`stage_modules`: the names (relative to the backbone) of the sub-modules that stage ``n`` runs; the FLOPs
  counter attributes every conv / linear call to an exit through these, and counts a masked stage's work at the
  fraction of positions still active.
* :meth:`exit_feature`: the single tensor (B, C, h, w) an exit head reads after stage ``n`` (for class-mean
  statistics of the features).
* :meth:`min_input_side`: the smallest image side for which the exits can run, given the smallest side their
  input feature maps need (a head declares that as ``min_input_size``, e.g. 2^k for k 2x2 poolings).

A plain ViT with token removal implements the same members: ``feats`` is its token state (the tokens still in
play plus their grid positions), ``forward_stage`` runs the transformer blocks of stage ``n``,
``forward_stage_masked(..., sparse=True)`` drops the stopped tokens before the blocks (fewer queries and keys),
``sparse=False`` keeps them but masks them out of attention as keys and freezes them, and ``stage_modules`` lists
the blocks of each stage.
"""
from typing import Any, List, Sequence

from torch import Tensor

__all__ = ['EarlyExitBackboneMixin']


class EarlyExitBackboneMixin:
    """Mixin that declares the early-exit backbone contract (see the module docstring); a backbone subclasses it
    next to its mmseg base class and implements every member."""

    #: Number of stages (= number of exits, the decode head included).
    num_stages: int

    def forward_stage(self, stage: int, feats: Any) -> Any:
        """Runs stage ``stage`` (1-based) densely.

        Args:
            stage (int): In ``[1, num_stages]``.
            feats: ``[inputs]`` for stage 1, else the previous stage's output.

        Returns:
            The stage's output (read by the next stage and by exit ``stage``).
        """
        raise NotImplementedError

    def forward_stage_masked(self,
                             stage: int,
                             feats: Any,
                             active: Tensor,
                             sparse: bool = False,
                             fill: str = 'copy') -> Any:
        """Runs stage ``stage`` (>= 2) restricted to the active positions.

        Args:
            stage (int): In ``[2, num_stages]``.
            feats: The previous stage's output.
            active (Tensor): (B, h, w) bool, True = still computing, at the exits' logit resolution.
            sparse (bool): Skip stopped positions for real (inference) instead of computing densely and masking.
            fill (str): What stopped positions hold (``copy``, ``zeros``, ``rbf``).

        Returns:
            The stage's output, equal to the simulated path's at active positions.
        """
        raise NotImplementedError

    def stage_modules(self, stage: int) -> Sequence[str]:
        """Names (relative to the backbone) of the sub-modules run by stage ``stage``, parameter-only ones
        included."""
        raise NotImplementedError

    def exit_feature(self, stage: int, feats: Any) -> Tensor:
        """The feature map (B, C, h, w) an exit head reads after stage ``stage``."""
        raise NotImplementedError

    def min_input_side(self, feature_side: int = 1) -> int:
        """The smallest image side (pixels) whose exit feature maps have at least ``feature_side`` positions per
        side (and every stage runs)."""
        raise NotImplementedError

    def forward_stages(self, x: Tensor) -> List[Any]:
        """Runs all stages densely and returns every stage's output (``outs[n]``: stage ``n + 1``)."""
        outs, feats = [], [x]
        for stage in range(1, self.num_stages + 1):
            feats = self.forward_stage(stage, feats)
            outs.append(feats)
        return outs
