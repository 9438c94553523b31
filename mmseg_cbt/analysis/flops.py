"""GFLOPs of early-exit segmentors, counted the way ADP-C and CBT count them.

Convention (ADP-C, Liu et al., ICLR 2022, and CBT, Görmez & Koyuncu, IEEE SPL 2024):

- Only the multiply-adds (MACs) of convolutions and linear layers are counted, plus the two matmuls of attention
  (``q k^T`` and ``attention x v``, ``Nq Nk E`` each) of ``nn.MultiheadAttention`` together with its q/k/v and
  output projections (which it runs as functions, not as module calls); BN, LayerNorm, softmax, activations,
  pooling and resizes are free. One MAC is one "FLOP", as in mmengine's counter (fvcore) and in the papers.
- Every conv / linear **call** is recorded by a forward hook together with its output shape, so any input size
  works and a module that runs several times is counted every time. Bias additions are not counted (fvcore does
  not count them either).
- Modules are attributed to exits through the early-exit backbone contract: the sub-modules the backbone names
  in ``stage_modules(n)`` (HRNet: the stem and ``layer1`` for stage 1, ``transition{n-1}`` and ``stage{n}``
  for stage n; ViT: the embeddings and blocks of each stage) -> exit n, ``exit_heads.{i}`` -> exit ``i + 1``,
  ``decode_head`` -> the last exit. Exit ``n`` (cumulative) is everything run up to exit ``n``: backbone stages
  ``1..n`` plus exit heads ``1..n``, earlier heads included.
- Masked counting: a conv of stage ``n + 1`` / transition ``n`` / exit ``n + 1`` counts its dense MACs times
  ``p``, the fraction of its **output** positions still computed: the mean of ``actives[n]`` (the model's mask of
  pixels still computing at 1/4 resolution, see ``EarlyExitEncoderDecoder.forward_exits``) resized with nearest
  interpolation to that conv's output size. Each image of a batch is counted separately.
- Token counting (plain ViTs): a linear layer whose output is a token sequence ``(B, T, C)`` with ``T`` = the
  mask's ``h * w`` grid (plus the backbone's ``num_extra_tokens``, e.g. the class token, which never stop) counts
  ``macs x n / T`` with ``n`` the tokens it really processes in that image (active grid tokens + extra tokens);
  an attention call counts its projections linearly and its two matmuls at ``n_q x n_k``, so removed tokens save
  quadratically there. Sequences that are not the token grid (e.g. class queries) are not scaled.
- Fill work: with ``fill='rbf'`` ADP-C also charges its RBF interpolation of stopped positions, ``(1 - p) p C_out
  49 H W`` per masked conv (7x7 kernel; ``H W`` = the conv's output size). This formula is ADP-C's accounting, taken
  over unchanged (it is not "49 MACs per stopped output": the extra ``p`` factor is theirs). ``'copy'`` and
  ``'zeros'`` add nothing. The fill term is charged for every conv that is counted with a mask.
- Two units, always labelled: ``gflops_1e9`` = MACs / 1e9 (mmengine's "G") and ``gflops_2_30`` = MACs / 2**30
  (the papers' 1024^3).

Which work is counted is the model's ``forward_exits`` in whole-image mode (``test_cfg.mode='slide'`` is not
modelled: it runs the same network on every crop). The geometry (which convs run, at which output sizes) comes from
one dense pass per input size, cached; the masks come from the model's own forward in the requested exit mode. So
the count does not depend on how masked convs are executed (``feature_mask='sparse'`` may not call ``nn.Conv2d``
modules at all), only on which positions are still active.

Equality with mmengine: :func:`mmengine_exit_macs` runs mmengine's ``FlopAnalyzer`` (the engine behind
``mmengine.analysis.get_model_complexity_info``) on the same model and input and sums its ``conv`` / ``linear`` /
``addmm`` (and attention ``bmm`` / ``matmul``) operator counts over the modules of every exit; on dense models this
equals :func:`count_flops` exactly (``tests/test_analysis/test_flops.py``, ``test_vit_flops.py``). Caveat: run
directly on an early-exit segmentor, mmengine misses the early exit heads, because its jit trace drops operators
whose results do not reach ``forward``'s output (the last exit's logits); hence the wrapper that returns every exit.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from mmseg_cbt.models.masked.semantics import RBF_SIZE, check_fill

__all__ = [
    'UNIT_1E9', 'UNIT_2_30', 'RBF_KERNEL_AREA', 'MMENGINE_CONV_LINEAR_OPS', 'MMENGINE_ATTENTION_OPS', 'LayerCall',
    'ExitFlops', 'FlopsResult', 'EarlyExitFlopCounter', 'is_early_exit_model', 'exit_units', 'attribute_module',
    'trace_layers', 'count_params_per_exit', 'count_flops', 'average_flops', 'mmengine_exit_macs'
]

#: Divisor of ``gflops_1e9`` (mmengine / fvcore "G").
UNIT_1E9 = 1e9
#: Divisor of ``gflops_2_30`` (ADP-C / HRNet papers: 1024^3).
UNIT_2_30 = float(2**30)
#: Taps of ADP-C's RBF fill kernel (7x7): the 49 in ``(1 - p) p C_out 49 H W``.
RBF_KERNEL_AREA = RBF_SIZE**2
#: Operator names (as mmengine's FlopAnalyzer reports them) that correspond to nn.Conv*d and nn.Linear.
MMENGINE_CONV_LINEAR_OPS = ('conv', 'linear', 'addmm')
#: Operator names of the attention matmuls (q k^T, attention x v) in mmengine's FlopAnalyzer.
MMENGINE_ATTENTION_OPS = ('bmm', 'matmul')


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


def trace_layers(model: nn.Module, inputs: Tensor,
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


# ---------------------------------------------------------------------------------------------------------------
# results
# ---------------------------------------------------------------------------------------------------------------
Number = Union[int, float]


def _mean(xs: Sequence[Number]) -> float:
    return float(sum(xs)) / len(xs) if xs else float('nan')


@dataclass
class ExitFlops:
    """MACs of one exit, per image and averaged.

    Attributes:
        exit (int): 1-based exit (1 for a model without exits: the whole model).
        macs_per_image (list): Cumulative MACs (everything up to this exit) of every image.
        macs_exit_only_per_image (list): MACs of this exit's own stage and head (the increment), per image.
        fill_macs_per_image (list): Part of the increment that is RBF fill work (0 unless ``fill='rbf'``).
        backbone_macs_per_image (list): Part of the increment in the backbone stage (fill included).
        params (int): Cumulative parameters (stages and heads up to this exit).
        params_exit_only (int): Parameters of this exit's stage and head.
    """
    exit: int
    macs_per_image: List[Number] = field(default_factory=list)
    macs_exit_only_per_image: List[Number] = field(default_factory=list)
    fill_macs_per_image: List[Number] = field(default_factory=list)
    backbone_macs_per_image: List[Number] = field(default_factory=list)
    params: int = 0
    params_exit_only: int = 0

    @property
    def macs(self) -> float:
        """Cumulative MACs, mean over images."""
        return _mean(self.macs_per_image)

    @property
    def macs_exit_only(self) -> float:
        """This exit's own MACs, mean over images."""
        return _mean(self.macs_exit_only_per_image)

    @property
    def gflops_1e9(self) -> float:
        """Cumulative MACs / 1e9 (mmengine's units), mean over images."""
        return self.macs / UNIT_1E9

    @property
    def gflops_2_30(self) -> float:
        """Cumulative MACs / 2**30 (the papers' units), mean over images."""
        return self.macs / UNIT_2_30

    @property
    def gflops_exit_only_1e9(self) -> float:
        """This exit's own MACs / 1e9, mean over images."""
        return self.macs_exit_only / UNIT_1E9

    @property
    def gflops_exit_only_2_30(self) -> float:
        """This exit's own MACs / 2**30, mean over images."""
        return self.macs_exit_only / UNIT_2_30

    def to_dict(self, per_image: bool = True) -> Dict[str, Any]:
        """Plain dict (JSON-ready); ``per_image`` adds the per-image lists."""
        d: Dict[str, Any] = dict(
            exit=self.exit,
            macs=self.macs,
            macs_exit_only=self.macs_exit_only,
            gflops_1e9=self.gflops_1e9,
            gflops_2_30=self.gflops_2_30,
            gflops_exit_only_1e9=self.gflops_exit_only_1e9,
            gflops_exit_only_2_30=self.gflops_exit_only_2_30,
            fill_macs=_mean(self.fill_macs_per_image),
            params=self.params,
            params_exit_only=self.params_exit_only)
        if per_image:
            d.update(
                macs_per_image=list(self.macs_per_image),
                macs_exit_only_per_image=list(self.macs_exit_only_per_image),
                gflops_1e9_per_image=[m / UNIT_1E9 for m in self.macs_per_image],
                gflops_2_30_per_image=[m / UNIT_2_30 for m in self.macs_per_image])
        return d


@dataclass
class FlopsResult:
    """Per-exit MACs of a set of images.

    Attributes:
        exits (list[ExitFlops]): One entry per exit (one entry, exit 1, for a model without exits).
        early_exit (bool): Whether the model has exits.
        exit_mode (str): Stop rule the masks came from (``'dense'``: no masking).
        fill (str): Fill rule charged (``'rbf'`` adds ADP-C's fill work).
        input_shapes (list[tuple[int, int]]): Input (H, W) of every image, as counted (after padding).
    """
    exits: List[ExitFlops]
    early_exit: bool = True
    exit_mode: str = 'dense'
    fill: str = 'copy'
    input_shapes: List[Tuple[int, int]] = field(default_factory=list)

    @property
    def num_images(self) -> int:
        """Number of images counted."""
        return len(self.input_shapes)

    @property
    def total(self) -> ExitFlops:
        """The last exit (cumulative = the whole model)."""
        return self.exits[-1]

    def extend(self, other: 'FlopsResult') -> 'FlopsResult':
        """Appends the images of ``other`` (same model and settings) in place; returns ``self``."""
        if len(other.exits) != len(self.exits):
            raise ValueError('cannot merge results with different numbers of exits')
        for a, b in zip(self.exits, other.exits):
            a.macs_per_image.extend(b.macs_per_image)
            a.macs_exit_only_per_image.extend(b.macs_exit_only_per_image)
            a.fill_macs_per_image.extend(b.fill_macs_per_image)
            a.backbone_macs_per_image.extend(b.backbone_macs_per_image)
        self.input_shapes.extend(other.input_shapes)
        return self

    def to_dict(self, per_image: bool = True) -> Dict[str, Any]:
        """Plain dict (JSON-ready): settings, ``exits`` (list of :meth:`ExitFlops.to_dict`) and ``total``."""
        return dict(
            early_exit=self.early_exit,
            exit_mode=self.exit_mode,
            fill=self.fill,
            num_images=self.num_images,
            input_shapes=[list(s) for s in self.input_shapes] if per_image else None,
            units=dict(gflops_1e9='MACs / 1e9', gflops_2_30='MACs / 2**30'),
            exits=[e.to_dict(per_image) for e in self.exits],
            total=self.total.to_dict(per_image=False))

    def table(self, per_exit: bool = False) -> str:
        """A text table (cumulative GFLOPs in both units, params); ``per_exit`` adds the exit-only columns."""
        head = ['exit', 'GFLOPs (1e9) cum.', 'GFLOPs (2^30) cum.', 'params (M) cum.']
        if per_exit:
            head += ['GFLOPs (1e9) exit only', 'GFLOPs (2^30) exit only', 'params (M) exit only']
        rows = []
        for e in self.exits:
            row = [str(e.exit) if self.early_exit else 'total', f'{e.gflops_1e9:.3f}', f'{e.gflops_2_30:.3f}',
                   f'{e.params / 1e6:.3f}']
            if per_exit:
                row += [f'{e.gflops_exit_only_1e9:.3f}', f'{e.gflops_exit_only_2_30:.3f}',
                        f'{e.params_exit_only / 1e6:.3f}']
            rows.append(row)
        widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
        line = '+'.join('-' * (w + 2) for w in widths)
        fmt = lambda r: '|'.join(f' {c:>{w}} ' for c, w in zip(r, widths))  # noqa: E731
        note = (f'MACs of conv/linear/attention layers (1 MAC = 1 FLOP), mean over {self.num_images} image(s), '
                f'exit_mode={self.exit_mode}, fill={self.fill}')
        return '\n'.join([note, line, fmt(head), line] + [fmt(r) for r in rows] + [line])


# ---------------------------------------------------------------------------------------------------------------
# counting
# ---------------------------------------------------------------------------------------------------------------
class EarlyExitFlopCounter:
    """Counts per-exit MACs of batches; caches the dense layer trace per input size.

    Args:
        model (nn.Module): An early-exit segmentor (``forward_exits``/``num_exits``) or any other model (then one
            "exit", the whole model, dense).
        exit_mode (str, optional): Stop rule (``'dense'``, ``'cbt'``, ``'global'``, ``'entropy'``); default the
            model's ``test_cfg.exit_mode``.
        feature_mask (str, optional): Passed to ``forward_exits`` (it decides the features, hence the later masks);
            default the model's ``test_cfg.feature_mask``.
        fill (str, optional): ``'copy'``, ``'zeros'`` or ``'rbf'``; default the model's ``test_cfg.fill``. Only
            ``'rbf'`` changes the count.

    A model without exits is always counted densely (it has no masks), as a single exit.
    """

    def __init__(self, model: nn.Module, exit_mode: Optional[str] = None, feature_mask: Optional[str] = None,
                 fill: Optional[str] = None) -> None:
        self.model = model
        self.early_exit = is_early_exit_model(model)
        test_cfg = getattr(model, 'test_cfg', None) or {}
        self.exit_mode = exit_mode if exit_mode is not None else test_cfg.get('exit_mode', 'dense')
        self.feature_mask = feature_mask if feature_mask is not None else test_cfg.get('feature_mask', 'none')
        self.fill = fill if fill is not None else test_cfg.get('fill', 'copy')
        check_fill(self.fill)
        if not self.early_exit:
            self.exit_mode = 'dense'
        self.num_exits = model.num_exits if self.early_exit else 1
        params = count_params_per_exit(model)
        self._params_exit_only = params
        self._params_cum = [sum(params[:i + 1]) for i in range(len(params))]
        self._traces: Dict[Tuple[int, ...], List[LayerCall]] = {}
        # tokens in front of a ViT's grid (class token): processed by every block, never stopped
        self._extra_tokens = int(getattr(getattr(model, 'backbone', None), 'num_extra_tokens', 0) or 0)

    def dense_trace(self, inputs: Tensor) -> List[LayerCall]:
        """The dense layer calls for inputs of this size (per image; traced once with the first image)."""
        key = tuple(inputs.shape[1:])
        if key not in self._traces:
            self._traces[key] = trace_layers(self.model, inputs[:1])
        return self._traces[key]

    def _actives(self, inputs: Tensor) -> List[Optional[Tensor]]:
        if not self.early_exit or self.exit_mode == 'dense':
            return [None] * self.num_exits
        with _inference_mode(self.model):
            _, actives = self.model.forward_exits(
                inputs, exit_mode=self.exit_mode, feature_mask=self.feature_mask, return_active=True)
        return list(actives)

    def count(self, inputs: Tensor, actives: Optional[Sequence[Optional[Tensor]]] = None) -> FlopsResult:
        """Counts one batch, every image separately.

        Args:
            inputs (Tensor): Preprocessed batch (B, C, H, W).
            actives (list, optional): Per-exit masks as ``forward_exits(..., return_active=True)`` returns them
                (``actives[n]``: bool (B, H/4, W/4) of pixels computed by stage/exit ``n + 1``, None = all).
                Default: obtained by running the model in ``exit_mode``.

        Returns:
            FlopsResult: Per-exit cumulative and exit-only MACs of every image.
        """
        trace = self.dense_trace(inputs)
        if actives is None:
            actives = self._actives(inputs)
        if len(actives) != self.num_exits:
            raise ValueError(f'expected {self.num_exits} masks (one per exit), got {len(actives)}')
        b = inputs.shape[0]
        n_ex = self.num_exits
        # Dense contributions stay Python ints, so dense counts are exact integers.
        dense = [0] * n_ex
        dense_backbone = [0] * n_ex
        masked = [torch.zeros(b, dtype=torch.float64) for _ in range(n_ex)]
        masked_backbone = [torch.zeros(b, dtype=torch.float64) for _ in range(n_ex)]
        fill = [torch.zeros(b, dtype=torch.float64) for _ in range(n_ex)]
        p_cache: Dict[Tuple[int, Tuple[int, ...]], Tensor] = {}
        for call in trace:
            e = (call.exit or 1) - 1
            active = actives[e]
            is_backbone = call.part == 'backbone'
            if active is None:
                dense[e] += call.macs
                if is_backbone:
                    dense_backbone[e] += call.macs
                continue
            work = self._token_work(call, active)
            if work is not None:
                masked[e] += work
                if is_backbone:
                    masked_backbone[e] += work
                continue
            key = (e, call.out_hw)
            if key not in p_cache:
                p_cache[key] = self._active_fraction(active, call.out_hw)
            p = p_cache[key]
            work = call.macs * p
            if self.fill == 'rbf':
                # ADP-C's charge for RBF-interpolating the stopped positions of this conv's output
                fw = (1.0 - p) * p * (call.out_channels * RBF_KERNEL_AREA * math.prod(call.out_hw))
                fill[e] += fw
                work = work + fw
            masked[e] += work
            if is_backbone:
                masked_backbone[e] += work
        has_mask = [a is not None for a in actives]
        exits: List[ExitFlops] = []
        running: List[Number] = [0] * b
        for e in range(n_ex):
            if has_mask[e]:
                only = [dense[e] + float(v) for v in masked[e]]
                bb = [dense_backbone[e] + float(v) for v in masked_backbone[e]]
                fl = [float(v) for v in fill[e]]
            else:
                only, bb, fl = [dense[e]] * b, [dense_backbone[e]] * b, [0] * b
            running = [r + o for r, o in zip(running, only)]
            exits.append(
                ExitFlops(
                    exit=e + 1,
                    macs_per_image=list(running),
                    macs_exit_only_per_image=only,
                    fill_macs_per_image=fl,
                    backbone_macs_per_image=bb,
                    params=self._params_cum[e],
                    params_exit_only=self._params_exit_only[e]))
        return FlopsResult(
            exits=exits,
            early_exit=self.early_exit,
            exit_mode=self.exit_mode,
            fill=self.fill,
            input_shapes=[tuple(int(s) for s in inputs.shape[2:])] * b)

    def _token_work(self, call: LayerCall, active: Tensor) -> Optional[Tensor]:
        """Per-image MACs (B,) of a call on token sequences at the tokens really processed, or None when the call
        has no token sequence (then the positional rule applies); sequences off the grid count densely."""
        if not call.seq_lens:
            return None
        grid = math.prod(active.shape[1:])
        n_active = active.flatten(1).sum(dim=1).double().cpu()
        counts, on_grid = [], False
        for t in call.seq_lens:
            if t - grid in (0, self._extra_tokens):
                counts.append(n_active + (t - grid))
                on_grid = True
            else:
                counts.append(torch.full_like(n_active, float(t)))
        if not on_grid:
            return torch.full_like(n_active, float(call.macs))
        if call.kind == 'linear':
            return call.macs * counts[0] / call.seq_lens[0]
        a, b, c = call.macs_terms
        return a * counts[0] + b * counts[1] + c * counts[0] * counts[1]

    @staticmethod
    def _active_fraction(active: Tensor, out_hw: Tuple[int, ...]) -> Tensor:
        """Per-image fraction of still-computed positions at ``out_hw`` (nearest resize of the 1/4 mask)."""
        m = active.float().unsqueeze(1)
        if out_hw and tuple(m.shape[2:]) != tuple(out_hw):
            m = F.interpolate(m, size=tuple(out_hw), mode='nearest')
        # linear layers (no spatial output): the global fraction of the mask
        return m.flatten(1).double().mean(dim=1).cpu()


def count_flops(model: nn.Module,
                inputs: Tensor,
                exit_mode: Optional[str] = None,
                feature_mask: Optional[str] = None,
                fill: Optional[str] = None,
                actives: Optional[Sequence[Optional[Tensor]]] = None) -> FlopsResult:
    """Per-exit MACs of one batch (every image counted separately).

    Args:
        model (nn.Module): Early-exit segmentor or any other model (then a single "exit": the whole model).
        inputs (Tensor): Preprocessed batch (B, C, H, W). May live on the ``meta`` device for dense counts of a
            model moved there (no real convolutions run).
        exit_mode (str, optional): Stop rule; default ``model.test_cfg.exit_mode``. ``'dense'`` counts no masks.
        feature_mask (str, optional): ``forward_exits``' feature treatment; default from ``test_cfg``.
        fill (str, optional): ``'copy'``/``'zeros'``/``'rbf'``; default from ``test_cfg``.
        actives (list, optional): Masks to count with instead of running the model (see
            :meth:`EarlyExitFlopCounter.count`).

    Returns:
        FlopsResult: Per exit ``macs`` (cumulative) and ``macs_exit_only``, per image and mean, in MACs and
        both GFLOPs units.
    """
    return EarlyExitFlopCounter(model, exit_mode, feature_mask, fill).count(inputs, actives)


def average_flops(model: nn.Module,
                  dataloader: Iterable[dict],
                  exit_mode: Optional[str] = None,
                  feature_mask: Optional[str] = None,
                  fill: Optional[str] = None,
                  data_preprocessor: Optional[Callable] = None,
                  max_images: Optional[int] = None,
                  progress: bool = True) -> FlopsResult:
    """Per-image MACs over a dataset (the papers average per validation image).

    Args:
        model (nn.Module): The model (its device is where the batches go).
        dataloader (Iterable[dict]): mmengine-style loader yielding ``dict(inputs=..., data_samples=...)``.
        exit_mode (str, optional): Stop rule; default from ``test_cfg``.
        feature_mask (str, optional): Feature treatment; default from ``test_cfg``.
        fill (str, optional): Fill rule charged; default from ``test_cfg``.
        data_preprocessor (callable, optional): Turns a loader batch into model inputs; default
            ``model.data_preprocessor`` (called with ``training=False``, so images are normalised and padded as
            at test time; the count is taken at the padded size).
        max_images (int, optional): Stop after this many images.
        progress (bool): Show an mmengine ``ProgressBar``.

    Returns:
        FlopsResult: All images' counts; ``exits[n].macs`` etc. are the per-image means over the dataset.
    """
    from mmengine.utils import ProgressBar
    preprocess = data_preprocessor if data_preprocessor is not None else model.data_preprocessor
    counter = EarlyExitFlopCounter(model, exit_mode, feature_mask, fill)
    total: Optional[int] = None
    dataset = getattr(dataloader, 'dataset', None)
    if dataset is not None:
        total = len(dataset)
    if max_images is not None:
        total = max_images if total is None else min(total, max_images)
    bar = ProgressBar(total) if progress and total else None
    result: Optional[FlopsResult] = None
    seen = 0
    for batch in dataloader:
        with torch.no_grad():
            data = preprocess(batch, False)
        inputs = data['inputs']
        if max_images is not None:
            inputs = inputs[:max_images - seen]
        res = counter.count(inputs)
        result = res if result is None else result.extend(res)
        seen += inputs.shape[0]
        if bar is not None:
            bar.update(inputs.shape[0])
        if max_images is not None and seen >= max_images:
            break
    if result is None:
        raise ValueError('the dataloader yielded no images')
    return result


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
