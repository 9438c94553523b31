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

import math
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from mmseg_cbt.models.masked.semantics import check_fill
from .mmengine_check import mmengine_exit_macs
from .results import ExitFlops, FlopsResult, Number
from .trace import (LayerCall, _inference_mode, attribute_module, count_params_per_exit, exit_units,
                    is_early_exit_model, trace_layers)
from .units import MMENGINE_ATTENTION_OPS, MMENGINE_CONV_LINEAR_OPS, RBF_KERNEL_AREA, UNIT_1E9, UNIT_2_30

__all__ = [
    'UNIT_1E9', 'UNIT_2_30', 'RBF_KERNEL_AREA', 'MMENGINE_CONV_LINEAR_OPS', 'MMENGINE_ATTENTION_OPS', 'LayerCall',
    'ExitFlops', 'FlopsResult', 'EarlyExitFlopCounter', 'is_early_exit_model', 'exit_units', 'attribute_module',
    'trace_layers', 'count_params_per_exit', 'count_flops', 'average_flops', 'mmengine_exit_macs'
]


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

    def __init__(self,
                 model: nn.Module,
                 exit_mode: Optional[str] = None,
                 feature_mask: Optional[str] = None,
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
        self._groups: Dict[int, tuple] = {}  # per cached trace (its id): _call_groups
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
        # per-image float64 sums as Python floats: the same IEEE operations in the same order as float64 tensors,
        # without a tensor op per layer (a sweep counts every setting)
        masked = [[0.0] * b for _ in range(n_ex)]
        masked_backbone = [[0.0] * b for _ in range(n_ex)]
        fill = [[0.0] * b for _ in range(n_ex)]
        rbf = self.fill == 'rbf'
        positional, token_calls = self._call_groups(trace)
        # positional calls by (exit, output size): one active fraction and a few float operations per group
        fractions = self._group_fractions(positional, actives)
        for (e, out_hw), (macs, macs_bb, area, area_bb) in positional.items():
            if actives[e] is None:
                dense[e] += macs
                dense_backbone[e] += macs_bb
                continue
            for i, p in enumerate(fractions[e, out_hw]):
                # ADP-C's charge for RBF-interpolating the stopped positions of these convs' outputs
                fw, fw_bb = ((1.0 - p) * p * area, (1.0 - p) * p * area_bb) if rbf else (0.0, 0.0)
                fill[e][i] += fw
                masked[e][i] += macs * p + fw
                masked_backbone[e][i] += macs_bb * p + fw_bb
        for call in token_calls:
            e = (call.exit or 1) - 1
            active = actives[e]
            if active is None:
                dense[e] += call.macs
                if call.part == 'backbone':
                    dense_backbone[e] += call.macs
                continue
            for i, work in enumerate(self._token_work(call, active).tolist()):
                masked[e][i] += work
                if call.part == 'backbone':
                    masked_backbone[e][i] += work
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

    def _call_groups(self, trace: List[LayerCall]):
        """The trace's calls without token sequences summed per (exit, output size) (exact integers: MACs, backbone
        MACs, and ``C_out * 49 * H * W`` of the rbf charge, all and backbone), and the calls with token sequences;
        cached per trace."""
        key = id(trace)
        if key not in self._groups:
            positional: Dict[Tuple[int, Tuple[int, ...]], List[int]] = {}
            tokens = []
            for call in trace:
                if call.seq_lens:
                    tokens.append(call)
                    continue
                g = positional.setdefault(((call.exit or 1) - 1, tuple(call.out_hw)), [0, 0, 0, 0])
                area = call.out_channels * RBF_KERNEL_AREA * math.prod(call.out_hw)
                g[0] += call.macs
                g[2] += area
                if call.part == 'backbone':
                    g[1] += call.macs
                    g[3] += area
            self._groups[key] = (positional, tokens)
        return self._groups[key]

    def _token_work(self, call: LayerCall, active: Tensor) -> Tensor:
        """Per-image MACs (B,) of a call on token sequences (``call.seq_lens`` set; :meth:`_call_groups` sorts them
        out) at the tokens really processed; sequences off the grid count densely."""
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
    def _group_fractions(positional: dict, actives: Sequence[Optional[Tensor]]) -> Dict[tuple, List[float]]:
        """Per masked group (exit, output size) the per-image fraction of still-computed positions: the mean of the
        1/4 mask resized with nearest interpolation to the output size (linear layers: of the mask itself), as an
        exact count over the size, read back in one transfer."""
        keys, counts, sizes = [], [], []
        for e, out_hw in positional:
            active = actives[e]
            if active is None:
                continue
            hw = tuple(out_hw)
            if not hw or hw == tuple(active.shape[1:]):
                sub = active
            elif all(s % o == 0 for s, o in zip(active.shape[1:], hw)):
                # nearest resize by an integer factor picks every f-th position (scale exactly f)
                sub = active[:, ::active.shape[1] // hw[0], ::active.shape[2] // hw[1]]
            else:
                sub = F.interpolate(active.float().unsqueeze(1), size=hw, mode='nearest')[:, 0] > 0.5
            keys.append((e, out_hw))
            counts.append(sub.flatten(1).sum(dim=1))
            sizes.append(sub[0].numel())
        if not keys:
            return {}
        values = torch.stack(counts).tolist()
        return {key: [c / n for c in row] for key, row, n in zip(keys, values, sizes)}


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
