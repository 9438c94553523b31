"""Early-exit encoder-decoder: one exit head after every backbone stage, stop masks between exits."""
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn as nn
from mmengine.structures import PixelData
from torch import Tensor

from mmseg.models.segmentors import EncoderDecoder
from mmseg.models.utils import resize
from mmseg.registry import MODELS
from mmseg.utils import ConfigType, OptConfigType, OptMultiConfig, OptSampleList, SampleList

from mmseg_cbt.calibration.thresholds import entropy_stop_mask, global_stop_mask, stop_mask_from_probs
from mmseg_cbt.utils.meta import meta_padding
from ..backbones.base import EarlyExitBackboneMixin
from ..masked import check_fill, forward_head_masked
from ..masked.vit_stop_rules import dtop_stop_mask, exit_scores
from .exit_maps import ExitCostCounter, attach_exit_outputs
from .options import (DTOP_TOPK, EXIT_MODES, FEATURE_MASKS, OPTION_RANGES, check_stop_options, range_checked,
                      topk_checked)

__all__ = ['EarlyExitEncoderDecoder']


@MODELS.register_module()
class EarlyExitEncoderDecoder(EncoderDecoder):
    """Encoder-decoder with an exit after every backbone stage (ADP-C / CBT).

    ``exit_heads[i]`` reads the branch outputs of stage ``i + 1``; ``decode_head`` is the final exit and reads the
    last stage, so the final exit is exactly mmseg's segmentor (a stock mmseg checkpoint of the same backbone and
    head loads into it). The exits are not ``auxiliary_head``: mmseg drops those at inference and in its FLOPs tool.

    Stop masks: after exit ``n`` (not the last) a pixel stops when the rule of ``test_cfg.exit_mode`` says it is
    confident; masks are cumulative and a stopped pixel keeps the logits of the exit where it stopped ("copy"
    aggregation), so every exit yields a full map. The CBT thresholds live in persistent buffers filled by
    :class:`~mmseg_cbt.engine.hooks.CBTCalibrationHook` or ``tools/calibrate.py``, so they travel with checkpoints.

    Args:
        backbone (dict): An :class:`~mmseg_cbt.models.backbones.EarlyExitHRNet` config.
        decode_head (dict): The final exit (mmseg ``FCNHead`` in its HRNetV2 form).
        exit_heads (list[dict]): Early exits, one per stage before the last.
        exit_loss_weights (list[float], optional): Loss weight of every exit (early ones, then the final).
            Default: all 1 (ADP-C).
        num_classes (int, optional): If given, overrides ``num_classes`` of every exit and of the decode head.
        train_cfg (dict, optional): mmseg train cfg.
        test_cfg (dict, optional): mmseg test cfg plus ``exit_mode`` (one of :data:`EXIT_MODES`, default
            ``'dense'``), ``global_threshold`` (default 0.998), ``entropy_threshold`` (default 0.05),
            ``dtop_threshold`` (default 0.9) and ``dtop_topk`` (default 5) for ``exit_mode='dtop'``,
            ``feature_mask`` (one of :data:`FEATURE_MASKS`, default ``'sparse'``) and ``fill`` (``'copy'``,
            ``'zeros'`` or ``'rbf'``, default ``'copy'``). With ``feature_mask='sparse'`` (the default) inference
            really skips stopped pixels; under autograd or in training mode the simulated path (same semantics)
            is used instead, and so it is for a stage or exit with more than ``sparse_max_active`` (in [0, 1]) of
            its pixels active (default: the backbone's ``default_sparse_max_active`` if it has one, else
            :func:`mmseg_cbt.ops.default_max_active`), where the simulated path is as fast or faster. Thresholds
            lie in [0, 1]; every option is checked when the model is built. The rules read per-class scores: the
            softmax of an exit's logits, or its output itself when its head declares ``scores_are_probs``.
        data_preprocessor (dict, optional): mmseg data preprocessor.
        pretrained (str, optional): Backbone weights.
        init_cfg (dict, optional): Initialisation config.
    """

    def __init__(self,
                 backbone: ConfigType,
                 decode_head: ConfigType,
                 exit_heads: Sequence[ConfigType],
                 exit_loss_weights: Optional[Sequence[float]] = None,
                 num_classes: Optional[int] = None,
                 neck: OptConfigType = None,
                 auxiliary_head: OptConfigType = None,
                 train_cfg: OptConfigType = None,
                 test_cfg: OptConfigType = None,
                 data_preprocessor: OptConfigType = None,
                 pretrained: Optional[str] = None,
                 init_cfg: OptMultiConfig = None):
        if neck is not None:
            raise ValueError('EarlyExitEncoderDecoder does not support a neck: the exits read the backbone stages')
        if num_classes is not None:
            # one switch for every exit (e.g. 150 for ADE20K) instead of repeating the exit list in each config
            decode_head = dict(decode_head, num_classes=num_classes)
            exit_heads = [dict(cfg, num_classes=num_classes) for cfg in exit_heads]
        super().__init__(
            backbone=backbone,
            decode_head=decode_head,
            auxiliary_head=auxiliary_head,
            train_cfg=train_cfg,
            test_cfg=test_cfg,
            data_preprocessor=data_preprocessor,
            pretrained=pretrained,
            init_cfg=init_cfg)
        if not isinstance(self.backbone, EarlyExitBackboneMixin):
            raise TypeError(f'{type(self.backbone).__name__} does not implement the early-exit backbone contract '
                            '(mmseg_cbt.models.backbones.EarlyExitBackboneMixin); use e.g. EarlyExitHRNet')
        if len(exit_heads) != self.backbone.num_stages - 1:
            raise ValueError(f'expected {self.backbone.num_stages - 1} exit_heads (one per stage before the last), '
                             f'got {len(exit_heads)}')
        check_stop_options(self.test_cfg, 'test_cfg')
        masked_training = (self.train_cfg or {}).get('masked_training', None)
        if masked_training:
            check_stop_options(masked_training, 'train_cfg.masked_training')
        self.exit_heads = nn.ModuleList(MODELS.build(cfg) for cfg in exit_heads)
        for i, head in enumerate(self.exit_heads):
            if head.num_classes != self.num_classes:
                raise ValueError(f'num_classes mismatch: exit_heads[{i}] has {head.num_classes}, '
                                 f'decode_head has {self.num_classes}')
        n = self.num_exits
        if exit_loss_weights is None:
            exit_loss_weights = [1.0] * n
        if len(exit_loss_weights) != n:
            raise ValueError(f'exit_loss_weights needs {n} values (one per exit), got {len(exit_loss_weights)}')
        self.exit_loss_weights = [float(w) for w in exit_loss_weights]
        k = self.num_classes
        # Calibration state: persistent buffers, so checkpoints carry it and tools/test.py uses it.
        self.register_buffer('cbt_thresholds', torch.ones(n, k))
        self.register_buffer('cbt_calibrated', torch.zeros((), dtype=torch.bool))
        self.register_buffer('cbt_range', torch.tensor([1.0, 1.0]))
        self.register_buffer('cbt_share_exits', torch.ones((), dtype=torch.bool))
        self.register_buffer('cbt_class_mean_probs', torch.zeros(n, k, k, dtype=torch.float64))
        self.register_buffer('cbt_class_counts', torch.zeros(k, dtype=torch.int64))
        self._exit_cost = ExitCostCounter(self)  # caches the dense layer trace per input size

    # ------------------------------------------------------------------ structure
    @property
    def num_exits(self) -> int:
        """Number of exits, the final one included."""
        return self.backbone.num_stages

    @property
    def exits(self) -> List[nn.Module]:
        """All exit heads in order, the final ``decode_head`` last (a plain list: no duplicate parameters)."""
        return list(self.exit_heads) + [self.decode_head]

    # ------------------------------------------------------------------ calibration state
    def set_cbt_calibration(self,
                            thresholds: Tensor,
                            alpha: float,
                            beta: float,
                            class_mean_probs: Optional[Tensor] = None,
                            class_counts: Optional[Tensor] = None) -> None:
        """Stores CBT thresholds (and optionally the statistics they came from) in the persistent buffers.

        Args:
            thresholds (Tensor): (K,) shared thresholds (CBT) or (num_exits, K) per-exit thresholds (CBT-ns).
            alpha (float): Lower end of the threshold range.
            beta (float): Upper end of the threshold range.
            class_mean_probs (Tensor, optional): (num_exits, K, K) mean softmax per ground-truth class.
            class_counts (Tensor, optional): (K,) training pixels per class.
        """
        n, k = self.cbt_thresholds.shape
        thresholds = torch.as_tensor(thresholds, dtype=torch.float32)
        share = thresholds.dim() == 1
        if share and thresholds.shape != (k, ):
            raise ValueError(f'num_classes mismatch: thresholds have shape {tuple(thresholds.shape)}, model has '
                             f'{k} classes')
        if not share and thresholds.shape != (n, k):
            raise ValueError(f'per-exit thresholds must have shape ({n}, {k}), got {tuple(thresholds.shape)}')
        dev = self.cbt_thresholds.device
        self.cbt_thresholds.copy_(thresholds.expand(n, k).to(dev))
        self.cbt_range.copy_(torch.tensor([alpha, beta], dtype=torch.float32))
        self.cbt_share_exits.fill_(share)
        if class_mean_probs is not None:
            if tuple(class_mean_probs.shape) != (n, k, k):
                raise ValueError(f'class_mean_probs must have shape ({n}, {k}, {k}), '
                                 f'got {tuple(class_mean_probs.shape)}')
            self.cbt_class_mean_probs.copy_(class_mean_probs.to(dev, torch.float64))
        if class_counts is not None:
            if tuple(class_counts.shape) != (k, ):
                raise ValueError(f'class_counts must have shape ({k},), got {tuple(class_counts.shape)}')
            self.cbt_class_counts.copy_(class_counts.to(dev, torch.int64))
        self.cbt_calibrated.fill_(True)

    @property
    def is_calibrated(self) -> bool:
        """Whether CBT thresholds have been computed for this model."""
        return bool(self.cbt_calibrated)

    # ------------------------------------------------------------------ test-time options
    def _test_opt(self, key: str, default):
        cfg = self.test_cfg if self.test_cfg is not None else {}
        return cfg.get(key, default)

    def _resolve_exit_mode(self, exit_mode: Optional[str]) -> str:
        mode = exit_mode if exit_mode is not None else self._test_opt('exit_mode', 'dense')
        if mode not in EXIT_MODES:
            raise ValueError(f'exit_mode must be one of {EXIT_MODES}, got {mode!r}')
        if mode == 'cbt' and not self.is_calibrated:
            raise RuntimeError('exit_mode="cbt" but the CBT thresholds were never calibrated for this model: train '
                               'with CBTCalibrationHook, or run tools/calibrate.py on the checkpoint')
        return mode

    def stop_mask(self,
                  logits: Tensor,
                  exit_idx: int,
                  exit_mode: Optional[str] = None,
                  active: Optional[Tensor] = None) -> Tensor:
        """Pixels that stop after exit ``exit_idx`` (0-based), by the rule of ``exit_mode``.

        Args:
            logits (Tensor): (B, K, h, w) logits of that exit.
            exit_idx (int): 0-based exit index.
            exit_mode (str, optional): Overrides ``test_cfg.exit_mode``.
            active (Tensor, optional): (B, h, w) positions that exit computed (None: all); only DToP's top-k
                retention reads it (the other rules are per position).

        Returns:
            Tensor: (B, h, w) bool, True = stops (confident).
        """
        mode = self._resolve_exit_mode(exit_mode)
        if mode == 'dense':
            return logits.new_zeros((logits.shape[0], ) + tuple(logits.shape[2:]), dtype=torch.bool)
        return self._stop_mask_with(logits, exit_idx, dict(exit_mode=mode), active)

    # ------------------------------------------------------------------ forward
    def _run_stage(self, stage: int, feats: List[Tensor], active: Optional[Tensor], feature_mask: str,
                   fill: str) -> List[Tensor]:
        """Runs backbone stage ``stage`` (1-based). This is where masked inference plugs in.

        ``active`` is the (B, H/4, W/4) mask of pixels still computing (None: all). With ``feature_mask='none'``
        the features stay dense; otherwise the backbone restricts the stage (and the transition before it) to the
        active pixels, simulated or for real.
        """
        if active is None or feature_mask == 'none':
            return self.backbone.forward_stage(stage, feats)
        return self.backbone.forward_stage_masked(
            stage, feats, active, sparse=self._use_sparse(active, feature_mask), fill=fill)

    def _use_sparse(self, active: Tensor, feature_mask: str) -> bool:
        """Whether a masked stage / exit runs the sparse path (else the simulated one, same semantics): with
        ``feature_mask='sparse'``, while at most ``test_cfg.sparse_max_active`` of the pixels are active (default:
        :func:`mmseg_cbt.ops.default_max_active` for the device, dtype and kernel), above which the simulated
        path is as fast or faster."""
        if feature_mask != 'sparse':
            return False
        limit = self._test_opt('sparse_max_active', None)
        if limit is None:
            limit = getattr(self.backbone, 'default_sparse_max_active', None)
        if limit is None:
            from mmseg_cbt.ops import default_max_active
            limit = default_max_active(active.device, torch.float32)
        else:
            limit = range_checked(limit, 'sparse_max_active', 'test_cfg')
        return float(active.float().mean()) <= limit

    def _run_exit(self, exit_idx: int, feats: List[Tensor], active: Optional[Tensor], feature_mask: str,
                  fill: str) -> Tensor:
        head = self.exits[exit_idx]
        if active is None or feature_mask == 'none':
            return head.forward(feats)
        return forward_head_masked(head, feats, active, sparse=self._use_sparse(active, feature_mask), fill=fill)

    def forward_exits(self,
                      inputs: Tensor,
                      exit_mode: Optional[str] = None,
                      feature_mask: Optional[str] = None,
                      return_active: bool = False):
        """Runs the backbone stage by stage with an exit after every stage.

        Args:
            inputs (Tensor): Preprocessed images (B, 3, H, W).
            exit_mode (str, optional): Stop rule, overrides ``test_cfg.exit_mode`` (see :data:`EXIT_MODES`).
            feature_mask (str, optional): Overrides ``test_cfg.feature_mask`` (see :data:`FEATURE_MASKS`).
            return_active (bool): Also return, per exit, the mask of pixels that exit computed (None = all).

        Returns:
            list[Tensor]: Per-exit logits (B, K, H/4, W/4) after "copy" aggregation: a stopped pixel keeps the
            logits of the exit where it stopped. With ``return_active`` a tuple ``(logits, actives)``.
        """
        mode = self._resolve_exit_mode(exit_mode)
        feature_mask = feature_mask if feature_mask is not None else self._test_opt('feature_mask', 'sparse')
        if feature_mask not in FEATURE_MASKS:
            raise ValueError(f'feature_mask must be one of {FEATURE_MASKS}, got {feature_mask!r}')
        if feature_mask == 'sparse' and (self.training or torch.is_grad_enabled()):
            # the sparse path writes buffers in place (no autograd); the simulated path has the same semantics
            feature_mask = 'simulate'
        fill = check_fill(self._test_opt('fill', 'copy'), 'test_cfg.fill')
        self.check_input_size(inputs.shape[-2:])
        feats: List[Tensor] = [inputs]
        logits: List[Tensor] = []
        actives: List[Optional[Tensor]] = []
        active: Optional[Tensor] = None
        for n in range(self.num_exits):
            if active is not None and not bool(active.any()):
                # every pixel has stopped: the remaining exits are copies, there is nothing left to compute
                logits += [logits[-1]] * (self.num_exits - n)
                actives += [active] * (self.num_exits - n)
                break
            feats = self._run_stage(n + 1, feats, active, feature_mask, fill)
            out = self._run_exit(n, feats, active, feature_mask, fill)
            if active is not None:
                out = torch.where(active.unsqueeze(1), out, logits[-1])
            logits.append(out)
            actives.append(active)
            if mode != 'dense' and n < self.num_exits - 1:
                keep = ~self.stop_mask(out, n, mode, active)
                active = keep if active is None else active & keep
        return (logits, actives) if return_active else logits

    def check_input_size(self, hw: Sequence[int]) -> None:
        """Raises a ValueError naming the minimum when an input of size ``hw`` is too small for the exits."""
        need = self.backbone.min_input_side(max(getattr(h, 'min_input_size', 1) for h in self.exits))
        if min(int(hw[0]), int(hw[1])) < need:
            raise ValueError(f'input {int(hw[0])}x{int(hw[1])} is smaller than this network runs on: every side must '
                             f'be >= {need} pixels (pad or resize the image, or use slide inference with a larger '
                             'crop)')

    def exit_logits(self, inputs: Tensor, exit_mode: Optional[str] = None) -> List[Tensor]:
        """Public per-exit logits (B, K, H/4, W/4), see :meth:`forward_exits`."""
        return self.forward_exits(inputs, exit_mode=exit_mode)

    def _forward(self, inputs: Tensor, data_samples: OptSampleList = None) -> Tensor:
        """Tensor mode: the final exit's logits, computed after every exit (an anytime model runs its exits)."""
        return self.forward_exits(inputs)[-1]

    def encode_decode(self, inputs: Tensor, batch_img_metas: List[dict]) -> Tensor:
        """Final-exit logits resized to the input size (keeps mmseg's own inference helpers working)."""
        return self.encode_decode_exits(inputs, batch_img_metas)[-1]

    def encode_decode_exits(self,
                            inputs: Tensor,
                            batch_img_metas: List[dict],
                            exit_mode: Optional[str] = None,
                            return_active: bool = False):
        """Per-exit logits resized to the (padded) input size, as ``decode_head.predict`` resizes them (with
        ``return_active`` also the masks of :meth:`forward_exits`)."""
        logits, actives = self.forward_exits(inputs, exit_mode=exit_mode, return_active=True)
        logits = [
            resize(lg, size=batch_img_metas[0]['img_shape'], mode='bilinear', align_corners=self.align_corners)
            for lg in logits
        ]
        return (logits, actives) if return_active else logits

    def inference_exits(self,
                        inputs: Tensor,
                        batch_img_metas: List[dict],
                        exit_mode: Optional[str] = None,
                        return_active: bool = False):
        """Per-exit version of mmseg's ``inference`` (``whole`` or ``slide`` mode).

        Args:
            inputs (Tensor): Preprocessed images (B, 3, H, W).
            batch_img_metas (list[dict]): Image meta information.
            exit_mode (str, optional): Overrides ``test_cfg.exit_mode`` (calibration forces ``'dense'``).
            return_active (bool): Also return every pass's box and masks (a list of
                :data:`~mmseg_cbt.models.segmentors.exit_maps.CropMasks`; one pass in ``whole`` mode).

        Returns:
            list[Tensor]: Per-exit logits (B, K, H, W) at the padded input size (with ``return_active`` a tuple
            ``(logits, crops)``).
        """
        mode = self._test_opt('mode', 'whole')
        if mode == 'whole':
            logits, actives = self.encode_decode_exits(inputs, batch_img_metas, exit_mode, return_active=True)
            box = (0, inputs.shape[2], 0, inputs.shape[3])
            return (logits, [(box, actives)]) if return_active else logits
        if mode != 'slide':
            raise ValueError(f'test_cfg.mode must be "whole" or "slide", got {mode!r}')
        h_stride, w_stride = self.test_cfg.stride
        h_crop, w_crop = self.test_cfg.crop_size
        b, _, h_img, w_img = inputs.shape
        h_grids = max(h_img - h_crop + h_stride - 1, 0) // h_stride + 1
        w_grids = max(w_img - w_crop + w_stride - 1, 0) // w_stride + 1
        preds = [inputs.new_zeros((b, self.out_channels, h_img, w_img)) for _ in range(self.num_exits)]
        count = inputs.new_zeros((b, 1, h_img, w_img))
        metas = [dict(m) for m in batch_img_metas]
        crops = []
        for hi in range(h_grids):
            for wi in range(w_grids):
                y2 = min(hi * h_stride + h_crop, h_img)
                x2 = min(wi * w_stride + w_crop, w_img)
                y1, x1 = max(y2 - h_crop, 0), max(x2 - w_crop, 0)
                crop = inputs[:, :, y1:y2, x1:x2]
                metas[0]['img_shape'] = crop.shape[2:]
                crop_logits, actives = self.encode_decode_exits(crop, metas, exit_mode, return_active=True)
                for p, lg in zip(preds, crop_logits):
                    p[:, :, y1:y2, x1:x2] += lg
                count[:, :, y1:y2, x1:x2] += 1
                crops.append(((y1, y2, x1, x2), actives))
        preds = [p / count for p in preds]
        return (preds, crops) if return_active else preds

    def restore_logits(self, logits: Tensor, img_meta: dict, mode: str = 'bilinear') -> Tensor:
        """Undoes padding and flip and resizes one image's logits (1, K, H, W) to ``ori_shape`` -> (K, h, w).

        The same steps as mmseg's ``postprocess_result``, so calibration statistics and per-exit predictions see
        exactly the logits the final prediction is made from. ``mode='nearest'`` restores a label map (exit map).
        """
        _, _, h, w = logits.shape
        left, right, top, bottom = meta_padding(img_meta)
        logits = logits[:, :, top:h - bottom, left:w - right]
        flip = img_meta.get('flip', None)
        if flip:
            direction = img_meta.get('flip_direction', None)
            if direction not in ('horizontal', 'vertical'):
                raise ValueError(f'unknown flip_direction {direction!r}')
            logits = logits.flip(dims=(3, ) if direction == 'horizontal' else (2, ))
        same = tuple(logits.shape[2:]) == tuple(img_meta['ori_shape'][:2])
        # resizing to the same size reproduces every finite value (weights 1 and 0): skip it (a finite sum means
        # every value is finite; one reduction instead of a mask)
        if same and (mode == 'nearest' or (not self.align_corners and bool(torch.isfinite(logits.sum())))):
            return logits.squeeze(0)
        align = self.align_corners if mode != 'nearest' else None  # torch rejects align_corners for nearest
        return resize(logits, size=img_meta['ori_shape'], mode=mode, align_corners=align, warning=False).squeeze(0)

    def predict(self, inputs: Tensor, data_samples: OptSampleList = None) -> SampleList:
        """Predicts with every exit.

        Returns:
            list[SegDataSample]: ``pred_sem_seg`` / ``seg_logits`` of the final exit (so every mmseg metric and
            visualiser works) plus ``exit{n}_pred_sem_seg`` (n = 1..num_exits), each exit's integer label map, and
            ``exit_map`` / ``exit_computed`` / ``exit_macs`` (where pixels stopped, what each exit computed and cost;
            see :func:`~mmseg_cbt.models.segmentors.exit_maps.attach_exit_outputs`).
        """
        if data_samples is not None:
            batch_img_metas = [ds.metainfo for ds in data_samples]
        else:
            batch_img_metas = [
                dict(
                    ori_shape=inputs.shape[2:],
                    img_shape=inputs.shape[2:],
                    pad_shape=inputs.shape[2:],
                    padding_size=[0, 0, 0, 0])
            ] * inputs.shape[0]
        only_prediction = data_samples is None
        exit_logits, crops = self.inference_exits(inputs, batch_img_metas, return_active=True)
        data_samples = self.postprocess_result(exit_logits[-1], data_samples)
        for n, lg in enumerate(exit_logits):
            for i, ds in enumerate(data_samples):
                if n == self.num_exits - 1:
                    pred = ds.pred_sem_seg.data
                elif not only_prediction:
                    pred = self.restore_logits(lg[i:i + 1], ds.metainfo).argmax(dim=0, keepdim=True)
                else:
                    pred = lg[i].argmax(dim=0, keepdim=True)
                ds.set_data({f'exit{n + 1}_pred_sem_seg': PixelData(data=pred)})
        cost = self._exit_cost if self._test_opt('exit_cost', True) else None  # test_cfg.exit_cost=False: no MACs
        attach_exit_outputs(self, inputs, data_samples, crops, not only_prediction, self._resolve_exit_mode(None), cost,
                            self._test_opt('fill', 'copy'))
        return data_samples

    # ------------------------------------------------------------------ training
    def loss(self, inputs: Tensor, data_samples: SampleList) -> Dict[str, Tensor]:
        """Cross-entropy at every exit, keys prefixed per exit (``exit1.loss_ce``, ...), weighted per exit.

        With ``train_cfg.masked_training`` (a dict with ``exit_mode`` and its threshold keys, and ``fill``; see
        :meth:`_masked_training_cfg`) the model is trained for the computation it gets at inference: after each exit
        the stop mask is built from the current (detached) predictions by the same rule as at test time, and the
        next stage and exit run through the simulated masked path, i.e. with exactly the fill semantics of the
        sparse kernel. No gradient flows through the mask. Each exit's loss is taken on its own full output.
        """
        masked = self._masked_training_cfg()
        self.check_input_size(inputs.shape[-2:])
        feats: List[Tensor] = [inputs]
        losses: Dict[str, Tensor] = {}
        active: Optional[Tensor] = None
        for n, head in enumerate(self.exits):
            if active is None:
                feats = self.backbone.forward_stage(n + 1, feats)
                logits = head.forward(feats)
            else:
                feats = self.backbone.forward_stage_masked(n + 1, feats, active, sparse=False, fill=masked['fill'])
                logits = forward_head_masked(head, feats, active, sparse=False, fill=masked['fill'])
            for key, val in head.loss_by_feat(logits, data_samples).items():
                if 'loss' in key:
                    val = val * self.exit_loss_weights[n]
                losses[f'exit{n + 1}.{key}'] = val
            if masked is not None and n < self.num_exits - 1:
                with torch.no_grad():
                    keep = ~self._stop_mask_with(logits.detach(), n, masked, active)
                active = keep if active is None else active & keep
        if self.with_auxiliary_head:
            losses.update(self._auxiliary_head_forward_train(feats, data_samples))
        return losses

    def _masked_training_cfg(self) -> Optional[dict]:
        """``train_cfg.masked_training``: None (off) or e.g. ``dict(exit_mode='global', global_threshold=0.998,
        fill='copy')`` (ADP-C trains with 0.998) or ``dict(exit_mode='cbt', fill='copy')`` (needs calibrated
        thresholds, e.g. when fine-tuning a calibrated checkpoint)."""
        cfg = (self.train_cfg or {}).get('masked_training', None)
        if not cfg:
            return None
        cfg = dict(cfg)
        cfg.setdefault('fill', self._test_opt('fill', 'copy'))
        mode = cfg.setdefault('exit_mode', 'global')
        if mode not in EXIT_MODES or mode == 'dense':
            raise ValueError(f'train_cfg.masked_training.exit_mode must be one of {EXIT_MODES[1:]}, got {mode!r}')
        return cfg

    def _stop_mask_with(self,
                        logits: Tensor,
                        exit_idx: int,
                        cfg: dict,
                        active: Optional[Tensor] = None,
                        probs: Optional[Tensor] = None) -> Tensor:
        """Stop mask by the rule and thresholds of ``cfg`` (falls back to ``test_cfg`` for missing keys); ``probs``:
        the exit's scores of ``logits`` where already computed (a sweep shares them between rules)."""
        mode = self._resolve_exit_mode(cfg['exit_mode'])
        if not getattr(self.exits[exit_idx], 'stop_pixels', True):
            # an exit that only reports (e.g. an E2CM exit at a stage not chosen for stopping): nothing stops
            return logits.new_zeros((logits.shape[0], ) + tuple(logits.shape[2:]), dtype=torch.bool)
        probs = exit_scores(self.exits[exit_idx], logits) if probs is None else probs
        if mode == 'cbt':
            return stop_mask_from_probs(probs, self.cbt_thresholds[exit_idx])
        key = f'{mode}_threshold'
        value = cfg.get(key, self._test_opt(key, OPTION_RANGES[key][0]))
        where = 'test_cfg' if key not in cfg else 'train_cfg.masked_training'
        threshold = range_checked(value, key, where)
        if mode == 'dtop':
            topk = topk_checked(cfg.get('dtop_topk', self._test_opt('dtop_topk', DTOP_TOPK)), where)
            return dtop_stop_mask(probs, threshold, topk, active)
        return (global_stop_mask if mode == 'global' else entropy_stop_mask)(probs, threshold)
