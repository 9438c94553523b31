"""Which conv / linear / attention calls a dense forward makes, and to which exit each belongs."""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import torch
import torch.nn as nn
from torch import Tensor

__all__ = [
    'LayerCall', 'is_early_exit_model', 'exit_units', 'attribute_module', 'trace_layers', 'count_params_per_exit'
]


# ---------------------------------------------------------------------------------------------------------------
# attribution
# ---------------------------------------------------------------------------------------------------------------
def is_early_exit_model(model: nn.Module) -> bool:
    """Whether ``model`` has the early-exit API (``num_exits`` and ``forward_exits``)."""
    return hasattr(model, 'forward_exits') and isinstance(getattr(model, 'num_exits', None), int)


def exit_units(model: nn.Module) -> List[Tuple[str, int, str]]:
    """``(module name, exit, part)`` of every unit an early-exit segmentor runs, from the backbone contract.

    Args:
        model (nn.Module): An early-exit segmentor (``backbone.stage_modules``, ``num_exits``).

    Returns:
        list[tuple[str, int, str]]: Qualified module name, 1-based exit and ``'backbone'`` or ``'head'``.
    """
    units = [(f'backbone.{name}', stage, 'backbone') for stage in range(1, model.num_exits + 1)
             for name in model.backbone.stage_modules(stage)]
    units += [(f'exit_heads.{i}', i + 1, 'head') for i in range(model.num_exits - 1)]
    return units + [('decode_head', model.num_exits, 'head')]


def attribute_module(name: str, model: nn.Module) -> Optional[Tuple[int, str]]:
    """Maps a module (or parameter) name of an early-exit segmentor to the exit that runs it.

    Args:
        name (str): Qualified name relative to the segmentor, e.g. ``'backbone.stage3.0.fuse_layers.2.0.0.conv'``.
        model (nn.Module): The early-exit segmentor.

    Returns:
        tuple[int, str] | None: ``(exit, part)`` with the 1-based exit and ``part`` in ``('backbone', 'head')``;
        None for modules that do not run at inference (e.g. ``auxiliary_head``) or are unknown.
    """
    for prefix, exit_idx, part in exit_units(model):
        if name == prefix or name.startswith(prefix + '.'):
            return exit_idx, part
    return None


# ---------------------------------------------------------------------------------------------------------------
# tracing
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LayerCall:
    """One call of a conv / linear layer in a dense forward pass.

    Attributes:
        name (str): Module name in the model.
        kind (str): ``'conv'`` or ``'linear'``.
        exit (int | None): 1-based exit (stage / head unit) it belongs to; None for models without exits.
        part (str): ``'backbone'``, ``'head'`` or ``'model'`` (models without exits).
        out_hw (tuple[int, ...]): Spatial size of the output (empty for linear layers).
        out_channels (int): Output channels (features for linear layers).
        macs (int): Dense multiply-adds of this call **per image**.
        seq_lens (tuple[int, ...]): Token counts the cost depends on: ``(T,)`` for a linear layer on a sequence,
            ``(Nq, Nk)`` for attention, empty otherwise.
        macs_terms (tuple[int, ...]): Attention only: ``(a, b, c)`` with ``macs = a Nq + b Nk + c Nq Nk``.
    """
    name: str
    kind: str
    exit: Optional[int]
    part: str
    out_hw: Tuple[int, ...]
    out_channels: int
    macs: int
    seq_lens: Tuple[int, ...] = ()
    macs_terms: Tuple[int, ...] = ()


def _layer_kind(module: nn.Module) -> Optional[str]:
    if isinstance(module, nn.modules.conv._ConvNd):
        return 'conv'
    if isinstance(module, nn.Linear):
        return 'linear'
    if isinstance(module, nn.MultiheadAttention):
        return 'attention'
    return None


def _attention_call(module: nn.MultiheadAttention, args: Tuple[Any, ...], kwargs: Dict[str, Any]):
    """Per-image MACs terms ``(a, b, c)`` and ``(Nq, Nk)`` of one ``nn.MultiheadAttention`` call: q and output
    projections ``2 E^2`` per query, k / v projections ``(kdim + vdim) E`` per key, two matmuls ``2 E`` per
    query-key pair (fvcore's / mmengine's linear and bmm formulas)."""
    names = ('query', 'key', 'value')
    q, k = [args[i] if len(args) > i else kwargs.get(names[i]) for i in range(2)]
    seq = 1 if module.batch_first else 0
    e = module.embed_dim
    nq, nk = int(q.shape[seq]), int(k.shape[seq])
    terms = (2 * e * e, (module.kdim + module.vdim) * e, 2 * e)
    return terms, (nq, nk)


def _call_macs(module: nn.Module, kind: str, inp: Tensor, out: Tensor) -> Tuple[int, Tuple[int, ...], int]:
    """Dense MACs per image of one call, its output spatial size and output channels (fvcore's formulas)."""
    if kind == 'conv':
        k = math.prod(module.kernel_size)
        if module.transposed:
            # fvcore: every input position is multiplied with the whole (C_out / groups) x k kernel
            macs = module.in_channels * (module.out_channels // module.groups) * k * math.prod(inp.shape[2:])
        else:
            macs = (module.in_channels // module.groups) * k * math.prod(out.shape[1:])
        return int(macs), tuple(int(s) for s in out.shape[2:]), int(out.shape[1])
    # nn.Linear on (B, ..., in_features): one in_features-long dot product per output element
    return int(module.in_features * math.prod(out.shape[1:])), (), int(module.out_features)


@contextlib.contextmanager
def _inference_mode(model: nn.Module) -> Iterator[None]:
    """eval() + no_grad for the duration (BN must not update its statistics), then the old training flag."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def _default_forward(model: nn.Module) -> Callable[[Tensor], Any]:
    """The pass that is counted: all exits of an early-exit model (dense), else mmseg's tensor mode."""
    if is_early_exit_model(model):
        return lambda x: model.forward_exits(x, exit_mode='dense', feature_mask='none')
    try:
        from mmengine.model import BaseModel
        if isinstance(model, BaseModel):
            return lambda x: model(x, mode='tensor')
    except ImportError:  # pragma: no cover - mmengine is a hard dependency of the package
        pass
    return model


def trace_layers(model: nn.Module,
                 inputs: Tensor,
                 forward: Optional[Callable[[Tensor], Any]] = None) -> List[LayerCall]:
    """Runs one dense forward pass and records every conv / linear call with forward hooks.

    Args:
        model (nn.Module): The model (an early-exit segmentor, an mmseg segmentor or any module).
        inputs (Tensor): Input batch (B, C, H, W); MACs are reported per image.
        forward (callable, optional): What to run; default: all exits densely for early-exit models, mmseg's
            ``mode='tensor'`` (no auxiliary head) for other mmengine models, ``model(inputs)`` otherwise.

    Returns:
        list[LayerCall]: Calls in execution order.

    Raises:
        ValueError: If a conv / linear of an early-exit model cannot be attributed to an exit (it would otherwise
            be silently dropped from the per-exit numbers).
    """
    num_exits = model.num_exits if is_early_exit_model(model) else None
    calls: List[LayerCall] = []

    def make_hook(name: str, kind: str) -> Callable:

        def hook(module: nn.Module, args: Tuple[Any, ...], kwargs: Dict[str, Any], out: Any) -> None:
            seq_lens: Tuple[int, ...] = ()
            terms: Tuple[int, ...] = ()
            if kind == 'attention':
                terms, seq_lens = _attention_call(module, args, kwargs)
                macs, out_hw, out_ch = terms[0] * seq_lens[0] + terms[1] * seq_lens[1] + terms[2] * math.prod(
                    seq_lens), (), module.embed_dim
            elif not isinstance(out, Tensor) or not args or not isinstance(args[0], Tensor):
                return
            else:
                macs, out_hw, out_ch = _call_macs(module, kind, args[0], out)
                if kind == 'linear' and out.dim() >= 3:
                    seq_lens = (int(out.shape[-2]), )
            if num_exits is None:
                exit_idx, part = None, 'model'
            else:
                unit = attribute_module(name, model)
                if unit is None:
                    raise ValueError(f'cannot attribute {kind} {name!r} to an exit: not in the backbone\'s '
                                     'stage_modules(), exit_heads.* or decode_head')
                exit_idx, part = unit
            calls.append(LayerCall(name, kind, exit_idx, part, out_hw, out_ch, macs, seq_lens, terms))

        return hook

    handles = []
    for name, module in model.named_modules():
        kind = _layer_kind(module)
        if kind is not None:
            handles.append(module.register_forward_hook(make_hook(name, kind), with_kwargs=True))
    try:
        with _inference_mode(model):
            (forward or _default_forward(model))(inputs)
    finally:
        for h in handles:
            h.remove()
    return calls


def count_params_per_exit(model: nn.Module) -> List[int]:
    """Parameters of every exit's own modules (stage + head), or ``[total]`` for models without exits.

    Parameters that do not run at inference (``auxiliary_head``) are left out in both cases.
    """
    if not is_early_exit_model(model):
        return [sum(p.numel() for n, p in model.named_parameters() if not n.startswith('auxiliary_head.'))]
    out = [0] * model.num_exits
    for name, p in model.named_parameters():
        unit = attribute_module(name, model)
        if unit is not None:
            out[unit[0] - 1] += p.numel()
    return out
