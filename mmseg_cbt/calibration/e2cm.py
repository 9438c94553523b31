"""E2CM: turn a plain trained mmseg segmentor into an early-exit one whose exits are class means (no training).

One algorithm shared by ``tools/e2cm.py`` and :class:`~mmseg_cbt.engine.hooks.E2CMConversionHook`:

1. :func:`e2cm_config`: the plain config (mmseg ``EncoderDecoder`` + ``HRNet`` + ``FCNHead``) rewritten as an
   :class:`~mmseg_cbt.models.segmentors.EarlyExitEncoderDecoder` with :class:`~mmseg_cbt.models.backbones.
   EarlyExitHRNet` (same module tree, so the same state dict), an
   :class:`~mmseg_cbt.models.decode_heads.EarlyExitClassMeanHead` after every stage before the last, and the
   original FCN head as the final exit;
2. :func:`load_plain_weights`: the plain model's weights into it, strictly (only the exits and the CBT buffers are
   new);
3. :func:`fit_class_mean_exits`: one pass over the training split (test pipeline) gathering the exact class means
   of the features each class-mean exit reads, and the temperature.
"""
import copy
import time
from typing import Any, Dict, List, Optional, Sequence, Union

import torch
from torch import nn

from .class_means import ClassFeatureStats, backbone_exit_features, gather_class_feature_stats

__all__ = [
    'SUPPORTED_BACKBONES', 'check_plain_segmentor_cfg', 'e2cm_config', 'load_plain_weights', 'class_mean_exits',
    'fit_class_mean_exits', 'build_e2cm_model', 'save_e2cm', 'convert_plain_segmentor'
]

#: Plain mmseg backbone type -> its early-exit counterpart (same state dict).
SUPPORTED_BACKBONES = {'HRNet': 'EarlyExitHRNet', 'mmseg.HRNet': 'EarlyExitHRNet'}
_PLAIN_SEGMENTORS = ('EncoderDecoder', 'mmseg.EncoderDecoder')
_PLAIN_HEADS = ('FCNHead', 'mmseg.FCNHead')


def check_plain_segmentor_cfg(model_cfg: dict, where: str = 'config') -> None:
    """Raises a ValueError naming what is unsupported unless ``model_cfg`` is a stock mmseg ``EncoderDecoder``
    with a supported backbone (:data:`SUPPORTED_BACKBONES`), no neck, and an ``FCNHead`` without
    ``concat_input``."""
    mtype = model_cfg.get('type')
    if mtype not in _PLAIN_SEGMENTORS:
        raise ValueError(f'{where}: model.type is {mtype!r}; E2CM converts a plain mmseg EncoderDecoder (an '
                         'early-exit model already has exits)')
    btype = model_cfg.get('backbone', {}).get('type')
    if btype not in SUPPORTED_BACKBONES:
        raise ValueError(f'{where}: backbone type {btype!r} is not supported; supported: {sorted(SUPPORTED_BACKBONES)}')
    if model_cfg.get('neck'):
        raise ValueError(f'{where}: a segmentor with a neck is not supported (the exits read the backbone stages)')
    head = model_cfg.get('decode_head', {})
    if head.get('type') not in _PLAIN_HEADS or head.get('concat_input', True):
        raise ValueError(f'{where}: the decode head must be an FCNHead with concat_input=False (HRNetV2\'s head), '
                         f'got {head.get("type")!r} (concat_input={head.get("concat_input", True)})')


def e2cm_config(cfg, exits: Optional[Sequence[int]] = None, temperature: float = 1.0):
    """The early-exit (E2CM) version of a plain mmseg config.

    Args:
        cfg (Config): The plain config (model, data, runtime).
        exits (Sequence[int], optional): Stages (1-based, before the last) whose class-mean exits may stop pixels;
            the other early stages get class-mean exits that only report their map. Default: all.
        temperature (float): Initial temperature of the exits (the fitted one is stored in the checkpoint).

    Returns:
        Config: A new config (the input is not changed): ``EarlyExitEncoderDecoder`` with ``EarlyExitHRNet``,
        class-mean exits, the original ``FCNHead`` as final exit, ``test_cfg`` with ``exit_mode='dense'``,
        ``feature_mask='sparse'``, ``fill='copy'``, the plugin in ``custom_imports`` and per-exit IoU metrics.
    """
    from mmseg.registry import MODELS
    check_plain_segmentor_cfg(cfg.model)
    new = copy.deepcopy(cfg)
    model = new.model
    backbone = dict(model.backbone, type=SUPPORTED_BACKBONES[model.backbone.type], init_cfg=None)
    chans = MODELS.build(backbone).stage_out_channels()
    num_stages = len(chans)
    exits = list(range(1, num_stages)) if exits is None else [int(e) for e in exits]
    bad = [e for e in exits if not 1 <= e < num_stages]
    if bad or len(set(exits)) != len(exits):
        raise ValueError(f'exits must be distinct stages in [1, {num_stages - 1}] (the last stage is the final exit), '
                         f'got {exits}')
    head = model.decode_head
    num_classes = head.num_classes
    exit_heads = [
        dict(
            type='EarlyExitClassMeanHead',
            in_channels=list(c),
            in_index=list(range(len(c))),
            num_classes=num_classes,
            temperature=float(temperature),
            stop_pixels=stage in exits,
            align_corners=head.get('align_corners', False),
            ignore_index=head.get('ignore_index', 255)) for stage, c in enumerate(chans[:-1], start=1)
    ]
    test_cfg = dict(model.get('test_cfg') or {}, exit_mode='dense', feature_mask='sparse', fill='copy')
    new.model = dict(
        type='EarlyExitEncoderDecoder',
        data_preprocessor=model.get('data_preprocessor'),
        pretrained=None,
        backbone=backbone,
        decode_head=dict(head),
        exit_heads=exit_heads,
        train_cfg=dict(model.get('train_cfg') or {}),
        test_cfg=test_cfg)
    imports = list((new.get('custom_imports') or {}).get('imports', []))
    new.custom_imports = dict(
        imports=imports + ([] if 'mmseg_cbt' in imports else ['mmseg_cbt']), allow_failed_imports=False)
    for key in ('val_evaluator', 'test_evaluator'):
        ev = new.get(key)
        if isinstance(ev, dict) and ev.get('type') in ('IoUMetric', 'mmseg.IoUMetric'):
            new[key] = dict(ev, type='EarlyExitIoUMetric')
    return new


def load_plain_weights(model: nn.Module, state: Dict[str, torch.Tensor], source: str = 'the checkpoint') -> None:
    """Loads a plain segmentor's state dict into its E2CM model: every backbone and decode-head key must match
    (names and shapes); auxiliary heads are dropped; only the exits and the CBT buffers are left to fill.

    Raises:
        ValueError: ``state`` is not an mmseg segmentor's (no ``backbone.`` / ``decode_head.`` keys).
        CheckpointMismatchError: Keys or shapes that differ.
    """
    from ..utils.checkpoint import CALIBRATION_PREFIX, CheckpointMismatchError, compare_state_dicts
    if not any(k.startswith('backbone.') for k in state) or not any(k.startswith('decode_head.') for k in state):
        raise ValueError(f'{source} is not an mmseg segmentor checkpoint: its state dict has no backbone.* and '
                         f'decode_head.* keys (first keys: {list(state)[:3]})')
    state = {k: v for k, v in state.items() if not k.startswith('auxiliary_head.')}
    target = model.state_dict()
    missing, unexpected, shapes = compare_state_dicts(target, state)
    missing = [k for k in missing if not k.startswith(('exit_heads.', CALIBRATION_PREFIX))]
    if missing or unexpected or shapes:
        raise CheckpointMismatchError(f'{source} does not fit the E2CM model built from its config: missing '
                                      f'{missing[:5]}, unexpected {unexpected[:5]}, shapes {shapes[:5]}')
    model.load_state_dict(state, strict=False)


def class_mean_exits(model: nn.Module) -> List[int]:
    """0-based indices of the exits that are :class:`EarlyExitClassMeanHead`."""
    from ..models.decode_heads import EarlyExitClassMeanHead
    return [i for i, h in enumerate(model.exits) if isinstance(h, EarlyExitClassMeanHead)]


def fit_class_mean_exits(model: nn.Module,
                         dataloader,
                         temperature: Union[str, float] = 'fit',
                         class_names: Optional[Sequence[str]] = None,
                         max_batches: Optional[int] = None,
                         progress: bool = True) -> Dict[str, Any]:
    """Gathers class means of every class-mean exit's input in one pass and stores them in the exits.

    Every rank must call it (the statistics are all-reduced; every rank first takes rank 0's model).

    Args:
        model (nn.Module): An early-exit segmentor with class-mean exits (possibly wrapped).
        dataloader: The training split read with the test pipeline.
        temperature (str | float): ``'fit'`` (per exit, :meth:`ClassFeatureStats.fitted_temperature`) or a
            number > 0 for every exit.
        class_names (Sequence[str], optional): For the warning about classes without pixels.
        max_batches (int, optional): Bound on the batches read per rank.
        progress (bool): Progress bar.

    Returns:
        dict: ``exits`` (1-based), ``temperatures``, ``pixels`` (per exit, per class counts) and ``stats``
        (the :class:`ClassFeatureStats`).
    """
    from mmengine.model import is_model_wrapper
    model = model.module if is_model_wrapper(model) else model
    if temperature != 'fit':
        try:
            temperature = float(temperature)
        except (TypeError, ValueError):
            raise ValueError(f'temperature must be "fit" or a number > 0, got {temperature!r}') from None
        if not 0 < temperature < float('inf'):
            raise ValueError(f'temperature must be "fit" or a finite number > 0, got {temperature!r}')
    idx = class_mean_exits(model)
    if not idx:
        raise ValueError(f'{type(model).__name__} has no EarlyExitClassMeanHead exit')
    if idx[-1] == model.num_exits - 1:
        raise ValueError('the final exit cannot be a class-mean exit here: it reads the last stage through the '
                         'decode head')
    stages = [i + 1 for i in idx]
    stats: ClassFeatureStats = gather_class_feature_stats(
        model,
        dataloader,
        len(stages),
        lambda inputs: backbone_exit_features(model, inputs, stages),
        max_batches=max_batches,
        progress=progress)
    temps = []
    for p, i in enumerate(idx):
        t = stats.fitted_temperature(p) if temperature == 'fit' else float(temperature)
        model.exits[i].set_class_means(
            stats.class_means(p), stats.counts[p], t, class_names=class_names, where=f'E2CM exit {i + 1}')
        temps.append(float(model.exits[i].temperature))
    return dict(exits=[i + 1 for i in idx], temperatures=temps, pixels=stats.counts.tolist(), stats=stats)


def build_e2cm_model(cfg,
                     state: Dict[str, torch.Tensor],
                     exits: Optional[Sequence[int]] = None,
                     source: str = 'the checkpoint'):
    """The E2CM model of a plain config with the plain model's weights (exits not fitted yet).

    Args:
        cfg (Config): The plain config.
        state (dict): The plain segmentor's state dict.
        exits (Sequence[int], optional): See :func:`e2cm_config`.
        source (str): Names the weights in errors.

    Returns:
        tuple: ``(model, new_cfg)``.
    """
    from mmseg.registry import MODELS
    new_cfg = e2cm_config(cfg, exits)
    model = MODELS.build(new_cfg.model)
    load_plain_weights(model, state, source=source)
    return model, new_cfg


def save_e2cm(model: nn.Module, new_cfg, meta: Dict[str, Any], out: str, out_config: str) -> None:
    """Writes the E2CM checkpoint (``meta`` + state dict) and its config as one set (main process only)."""
    from mmengine.dist import is_main_process

    from ..utils.io import atomic_file_set
    if not is_main_process():
        return
    ckpt = dict(meta=meta, state_dict={k: v.detach().cpu() for k, v in model.state_dict().items()})
    with atomic_file_set([out, out_config]) as tmp:
        torch.save(ckpt, tmp[out])
        with open(tmp[out_config], 'w', encoding='utf-8') as f:
            f.write(new_cfg.pretty_text)


def convert_plain_segmentor(cfg,
                            state: Dict[str, torch.Tensor],
                            dataloader,
                            exits: Optional[Sequence[int]] = None,
                            temperature: Union[str, float] = 'fit',
                            max_batches: Optional[int] = None,
                            progress: bool = True,
                            source: str = 'the checkpoint',
                            device: Optional[Union[str, torch.device]] = None):
    """The whole conversion shared by ``tools/e2cm.py`` and the hook: build the E2CM model with the plain weights,
    check the data against it, fit the class-mean exits in one pass (timed).

    Args:
        cfg (Config): The plain config.
        state (dict): The plain segmentor's state dict.
        dataloader: The training split read with the test pipeline.
        exits, temperature, max_batches, progress: See :func:`e2cm_config` and :func:`fit_class_mean_exits`.
        source (str): Names the weights in errors.
        device (str, optional): Where to run the pass (default: where the weights are).

    Returns:
        tuple: ``(model, new_cfg, record)``; ``record`` (for the checkpoint's ``meta['e2cm']``) holds the exits,
        the exits that may stop pixels, the temperatures, the number of images and the seconds of the pass.
    """
    from .gather import check_calibration_data
    model, new_cfg = build_e2cm_model(cfg, state, exits, source=source)
    if device is not None:
        model.to(device)
    model.eval()
    class_names = check_calibration_data(dataloader, model)
    start = time.perf_counter()
    fit = fit_class_mean_exits(
        model, dataloader, temperature, class_names=class_names, max_batches=max_batches, progress=progress)
    images = len(dataloader.dataset)
    record = dict(
        exits=fit['exits'],
        stop_exits=[i + 1 for i, h in enumerate(model.exit_heads) if getattr(h, 'stop_pixels', True)],
        temperatures=fit['temperatures'],
        temperature_mode='fit' if temperature == 'fit' else 'set',
        images=images if max_batches is None else min(images, max_batches * (dataloader.batch_size or 1)),
        seconds=round(time.perf_counter() - start, 3),
        classes=list(class_names))
    return model, new_cfg, record
