"""The reference count: mmengine's FlopAnalyzer summed over the modules of every exit."""
from __future__ import annotations

from typing import List, Tuple

import torch.nn as nn
from torch import Tensor

from .trace import _inference_mode, exit_units, is_early_exit_model
from .units import MMENGINE_ATTENTION_OPS, MMENGINE_CONV_LINEAR_OPS

__all__ = ['mmengine_exit_macs']


# ---------------------------------------------------------------------------------------------------------------
# mmengine reference
# ---------------------------------------------------------------------------------------------------------------
class _AllExitLogits(nn.Module):
    """Wrapper whose output is the tuple of **all** exits' logits of a dense ``forward_exits`` pass.

    Needed because mmengine's counter works on a jit trace of ``forward``, and the trace drops every operator
    whose result does not reach the output: the segmentor's own tensor-mode ``forward`` returns only the last
    exit, so exits 1..n-1 would vanish from mmengine's count (the backbone stages survive, they feed the last
    exit). Module names inside keep the segmentor's names behind the ``segmentor.`` prefix.
    """

    def __init__(self, segmentor: nn.Module) -> None:
        super().__init__()
        self.segmentor = segmentor

    def forward(self, x: Tensor) -> Tuple[Tensor, ...]:
        return tuple(self.segmentor.forward_exits(x, exit_mode='dense', feature_mask='none'))


def mmengine_exit_macs(model: nn.Module, inputs: Tensor) -> List[int]:
    """Cumulative per-exit conv+linear(+attention matmul) MACs **per image** according to mmengine's counter.

    Runs ``mmengine.analysis.FlopAnalyzer`` - the jit-trace engine whose ``total()`` is what
    ``get_model_complexity_info`` reports - on ``inputs[:1]`` and sums its ``conv`` / ``linear`` / ``addmm``
    operator counts and the attention matmuls ``bmm`` / ``matmul`` (one MAC = one flop; BN, LayerNorm, upsampling
    and the other elementwise operators that mmengine also counts are left out) over the top-level modules of every
    exit. Early-exit models are traced through a wrapper that returns every exit's logits (see
    :class:`_AllExitLogits`); other models through their mmseg tensor-mode
    ``forward`` (one element: the whole model). Slow for big inputs (a real traced forward).

    Raises:
        RuntimeError: If mmengine sees conv / linear work outside the exits' modules.
    """
    from mmengine.analysis import FlopAnalyzer
    x = inputs[:1]
    early_exit = is_early_exit_model(model)
    target = _AllExitLogits(model) if early_exit else model
    prefix = 'segmentor.' if early_exit else ''
    with _inference_mode(model):
        analyzer = FlopAnalyzer(target, (x, ))
        analyzer.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings('none')
        counts = analyzer.by_module_and_operator()

    def conv_linear(name: str) -> int:
        c = counts.get(name)
        return int(sum(c.get(op, 0) for op in MMENGINE_CONV_LINEAR_OPS + MMENGINE_ATTENTION_OPS)) if c else 0

    total = conv_linear('')
    if not early_exit:
        return [total]
    per_exit = [0] * model.num_exits
    for name, exit_idx, _ in exit_units(model):
        per_exit[exit_idx - 1] += conv_linear(prefix + name)
    if sum(per_exit) != total:
        raise RuntimeError(f'mmengine counts {total} conv/linear MACs, of which only {sum(per_exit)} in the exits')
    return [sum(per_exit[:i + 1]) for i in range(len(per_exit))]
