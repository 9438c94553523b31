"""Plain ViT that runs stage by stage with real token removal between the stages (DToP's host)."""
from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from mmseg.models.backbones import VisionTransformer
from mmseg.registry import MODELS

from ..masked.vit_tokens import VIT_FILL_MODES, ViTTokens, block_forward, simulated_blocks, sparse_blocks, token_keep
from .base import EarlyExitBackboneMixin

__all__ = ['EarlyExitViT']


@MODELS.register_module()
class EarlyExitViT(EarlyExitBackboneMixin, VisionTransformer):
    """mmseg's :class:`VisionTransformer` split into stages after the blocks ``exit_after``.

    The module tree (and so the state dict) is exactly mmseg's ``VisionTransformer``, so an mmseg ViT checkpoint
    (e.g. ImageNet weights converted with mmseg's ``vit2mmseg``) loads with ``strict=True``; :meth:`forward` is the
    unchanged mmseg forward (``out_indices`` default to ``exit_after``); the stages compute the same blocks with
    attention through PyTorch's fused kernel (equal up to float rounding). Stage 1 = patch embedding, class token,
    position embedding (resized bicubically as mmseg does for other input sizes), ``pre_norm`` and blocks
    ``0..exit_after[0]``; stage n = blocks ``exit_after[n-2]+1..exit_after[n-1]`` (``final_norm`` after the last
    block). DToP (Liu et al., ICCV 2023) splits ViT-B/16 after blocks 6 and 8 of 12, ``(5, 7, 11)`` 0-based, and
    ViT-L/16 as ``(7, 15, 23)``.

    A stage returns a :class:`~mmseg_cbt.models.masked.vit_tokens.ViTTokens`; exits read its grid tokens and give
    logits on the token grid (H/p, W/p), which is also the resolution of the segmentor's ``active`` masks.
    Inputs whose sides are not multiples of the patch size are padded at the bottom / right by the patch
    embedding (``patch_pad='corner'``, mmseg's default), so the grid is ``ceil(H/p) x ceil(W/p)``; the segmentor
    resizes exit logits to the input size as mmseg's ViT heads do.

    Masked stages (``active`` after exit n-1): ``sparse=False`` computes every token, masks the stopped ones out of
    attention as keys and freezes them (the oracle, differentiable); ``sparse=True`` removes them from every block
    (:func:`~mmseg_cbt.models.masked.vit_tokens.sparse_blocks`). The class token never stops.

    Args:
        exit_after (Sequence[int]): 0-based block indices after which a stage ends; strictly increasing, the last
            one must be ``num_layers - 1``.
        **kwargs: Passed unchanged to :class:`mmseg.models.backbones.VisionTransformer`.
    """

    #: Token removal pays off at any active fraction below 1 (every matmul shrinks), so the segmentor's sparse path
    #: is used whenever something stopped, unless ``test_cfg.sparse_max_active`` says otherwise.
    default_sparse_max_active = 1.0

    def __init__(self, exit_after: Sequence[int] = (5, 7, 11), **kwargs) -> None:
        exit_after = tuple(int(i) for i in exit_after)
        num_layers = kwargs.get('num_layers', 12)
        if (not exit_after or exit_after[-1] != num_layers - 1 or exit_after[0] < 0
                or any(a >= b for a, b in zip(exit_after, exit_after[1:]))):
            raise ValueError(f'exit_after must be strictly increasing block indices in [0, {num_layers - 1}] ending '
                             f'with {num_layers - 1} (num_layers - 1), got {exit_after}')
        kwargs.setdefault('out_indices', list(exit_after))
        super().__init__(**kwargs)
        self.exit_after = exit_after
        self.num_stages = len(exit_after)

    def train(self, mode: bool = True) -> 'EarlyExitViT':
        """mmseg's ``train`` (``norm_eval`` handling), returning the module as ``nn.Module.train`` does."""
        super().train(mode)
        return self

    # ------------------------------------------------------------------ structure
    @property
    def num_extra_tokens(self) -> int:
        """Tokens in front of the grid (the class token) that the blocks process and that never stop."""
        return 1 if self.with_cls_token else 0

    def stage_blocks(self, stage: int) -> range:
        """0-based indices of the blocks of stage ``stage``."""
        self._check_stage(stage, 1)
        first = 0 if stage == 1 else self.exit_after[stage - 2] + 1
        return range(first, self.exit_after[stage - 1] + 1)

    def _check_stage(self, stage: int, lowest: int) -> None:
        if not lowest <= int(stage) <= self.num_stages:
            raise ValueError(f'stage must be in [{lowest}, {self.num_stages}], got {stage}')

    def stage_modules(self, stage: int) -> Tuple[str, ...]:
        """Stage 1: the embeddings (``patch_embed``, ``cls_token``, ``pos_embed``, ``pre_norm``) and its blocks;
        stage n: its blocks; the last one also ``final_norm``."""
        names: List[str] = []
        if stage == 1:
            names += ['patch_embed', 'cls_token', 'pos_embed']
            if self.pre_norm:
                names.append(self.pre_ln_name)
        names += [f'layers.{i}' for i in self.stage_blocks(stage)]
        if stage == self.num_stages and self.final_norm:
            names.append(self.norm1_name)
        return tuple(names)

    def exit_feature(self, stage: int, feats: ViTTokens) -> Tensor:
        """The grid tokens as a (B, C, H/p, W/p) map."""
        return feats.feature_map()

    def min_input_side(self, feature_side: int = 1) -> int:
        """With ``patch_pad='corner'`` the grid is ``ceil(H / p)``; without padding ``floor(H / p)``."""
        p, fs = self.patch_size, max(int(feature_side), 1)
        return p * (fs - 1) + 1 if self.patch_embed.adap_padding is not None else p * fs

    # ------------------------------------------------------------------ forward
    def embed(self, inputs: Tensor) -> ViTTokens:
        """Patch embedding, class token, position embedding and ``pre_norm``, exactly as mmseg's forward."""
        b = inputs.shape[0]
        x, hw = self.patch_embed(inputs)
        x = torch.cat((self.cls_token.expand(b, -1, -1), x), dim=1)
        x = self._pos_embeding(x, hw, self.pos_embed)
        if not self.with_cls_token:
            x = x[:, 1:]
        if self.pre_norm:
            x = self.pre_ln(x)
        return ViTTokens(x, (int(hw[0]), int(hw[1])), self.num_extra_tokens)

    def _final_norm(self, stage: int):
        return self.norm1 if stage == self.num_stages and self.final_norm else None

    def forward_stage(self, stage: int, feats: Union[List[Tensor], ViTTokens]) -> ViTTokens:
        """Runs stage ``stage`` densely (stage 1 receives ``[inputs]``): mmseg's block computation with attention
        through PyTorch's fused kernel (:func:`~mmseg_cbt.models.masked.vit_tokens.block_forward`)."""
        self._check_stage(stage, 1)
        state = self.embed(feats[0]) if stage == 1 else feats
        x = state.tokens
        for i in self.stage_blocks(stage):
            x = block_forward(self.layers[i], x)
        norm = self._final_norm(stage)
        if norm is not None:
            x = norm(x)
        return state.with_tokens(x)

    def forward_stage_masked(self,
                             stage: int,
                             feats: ViTTokens,
                             active: Tensor,
                             sparse: bool = False,
                             fill: str = 'copy') -> ViTTokens:
        """Runs stage ``stage`` (>= 2) on the active tokens (see the class docstring).

        Args:
            stage (int): In ``[2, num_stages]``.
            feats (ViTTokens): The previous stage's output.
            active (Tensor): (B, h, w) bool on the token grid, True = still computing.
            sparse (bool): Remove stopped tokens for real (inference) instead of masking them.
            fill (str): ``'copy'`` or ``'zeros'`` (what stopped tokens hold).
        """
        self._check_stage(stage, 2)
        if fill not in VIT_FILL_MODES:
            raise ValueError(f'fill must be one of {VIT_FILL_MODES} for EarlyExitViT (a stopped token is no key, '
                             f'there is nothing to interpolate), got {fill!r}')
        keep = token_keep(feats, active)
        if bool(active.all()):
            return self.forward_stage(stage, feats)  # nothing stopped: the dense stage has the same semantics
        layers = [self.layers[i] for i in self.stage_blocks(stage)]
        if sparse:
            with torch.no_grad():
                x = sparse_blocks(layers, feats.tokens, keep, fill, self._final_norm(stage))
        else:
            x = simulated_blocks(layers, feats.tokens, keep, fill, self._final_norm(stage))
        return feats.with_tokens(x, active=active, sparse=sparse)

    def forward_stages_masked(self,
                              inputs: Tensor,
                              actives: Sequence[Optional[Tensor]],
                              sparse: bool = False) -> List[ViTTokens]:
        """Every stage with the given per-stage masks (``actives[n]`` for stage ``n + 1``, None = dense)."""
        outs, feats = [], [inputs]
        for stage, active in enumerate(actives, start=1):
            if active is None:
                feats = self.forward_stage(stage, feats)
            else:
                feats = self.forward_stage_masked(stage, feats, active, sparse=sparse)
            outs.append(feats)
        return outs
