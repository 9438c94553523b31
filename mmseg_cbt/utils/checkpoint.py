"""Strict checkpoint loading for the tools: a checkpoint either fits the model built from the config, or the tool
stops with an error that names the first differing keys, the checkpoint and the config.

mmengine's ``load_checkpoint(..., strict=False)`` only logs mismatches, so a checkpoint of another model (a plain
mmseg HRNet, another class count, a model without exits) used to be evaluated or calibrated with randomly
initialised layers. The one tolerated difference is a checkpoint without the CBT calibration buffers (``cbt_*``,
e.g. one written before they existed): it loads, and the message says that the model is uncalibrated.
"""
import os.path as osp
import pickle
import re
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

__all__ = [
    'CALIBRATION_PREFIX', 'CheckpointMismatchError', 'build_segmentor_strict', 'compare_state_dicts', 'read_checkpoint',
    'load_checkpoint_strict'
]

#: State-dict prefix of the segmentor's calibration buffers (thresholds, statistics, flags).
CALIBRATION_PREFIX = 'cbt_'
#: How many keys an error message names per kind of difference.
_SHOW = 5
_ZIP_MAGIC = b'PK\x03\x04'  # torch.save's default (zip) format
_PICKLE_MAGIC = b'\x80'  # the legacy format: a pickle protocol >= 2 header


class CheckpointMismatchError(RuntimeError):
    """A checkpoint whose state dict does not fit the model built from the config."""


def _is_remote(filename: str) -> bool:
    return '://' in filename


def read_checkpoint(filename: str, map_location: Any = 'cpu') -> Dict[str, Any]:
    """Reads a checkpoint file, with an error naming the file when it is missing, empty, truncated or not a
    checkpoint.

    Local files are read with ``torch.load`` (weights only, with the types of mmengine's checkpoints allowed);
    URLs and ``open-mmlab://``-style names go through mmengine's checkpoint loader.

    Args:
        filename (str): Path or URL.
        map_location: As for ``torch.load``.

    Returns:
        dict: The checkpoint (a dict with ``state_dict`` and ``meta``, or a bare state dict).

    Raises:
        FileNotFoundError: If a local file does not exist.
        ValueError: If the file is empty, truncated, not a checkpoint, or holds no dict.
    """
    from .compat import allow_mmengine_checkpoints
    allow_mmengine_checkpoints()
    if _is_remote(filename):
        from mmengine.runner.checkpoint import _load_checkpoint
        ckpt = _load_checkpoint(filename, map_location=map_location)
    else:
        if not osp.exists(filename):
            raise FileNotFoundError(f'checkpoint not found: {filename}')
        if not osp.isfile(filename):
            raise ValueError(f'checkpoint {filename} is not a file')
        size = osp.getsize(filename)
        if size == 0:
            raise ValueError(f'checkpoint {filename} is empty (0 bytes): an interrupted save or copy?')
        with open(filename, 'rb') as f:
            head = f.read(4)
        if not (head.startswith(_ZIP_MAGIC) or head.startswith(_PICKLE_MAGIC)):
            raise ValueError(f'{filename} is not a PyTorch checkpoint (it starts with {head!r}, not with the zip or '
                             f'pickle header that torch.save writes)')
        try:
            ckpt = torch.load(filename, map_location=map_location, weights_only=True)
        except (EOFError, RuntimeError, ValueError, KeyError, pickle.UnpicklingError) as e:
            raise ValueError(f'cannot read checkpoint {filename} ({size} bytes): truncated or damaged? '
                             f'({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""})') from e
    if not isinstance(ckpt, dict):
        raise ValueError(f'checkpoint {filename} holds a {type(ckpt).__name__}, not a dict with a state_dict')
    return ckpt


def _state_dict_of(ckpt: Dict[str, Any], filename: str) -> Dict[str, torch.Tensor]:
    state = ckpt.get('state_dict', ckpt)
    if not isinstance(state, dict) or not state:
        raise ValueError(f'checkpoint {filename} holds no state_dict')
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f'checkpoint {filename}: the state_dict holds non-tensor entries (first: {bad[:_SHOW]})')
    # checkpoints saved from a DDP/DataParallel wrapper carry a `module.` prefix (as mmengine strips it)
    return {re.sub(r'^module\.', '', k): v for k, v in state.items()}


def _first(keys: List[str]) -> str:
    more = f' and {len(keys) - _SHOW} more' if len(keys) > _SHOW else ''
    return ', '.join(keys[:_SHOW]) + more


def compare_state_dicts(model_state: Dict[str, torch.Tensor],
                        ckpt_state: Dict[str, torch.Tensor]) -> Tuple[List[str], List[str], List[str]]:
    """Keys the checkpoint lacks, keys the model lacks, and keys of another shape (``'key: ckpt vs model'``)."""
    missing = [k for k in model_state if k not in ckpt_state]
    unexpected = [k for k in ckpt_state if k not in model_state]
    shapes = [
        f'{k}: checkpoint {tuple(ckpt_state[k].shape)} vs model {tuple(v.shape)}' for k, v in model_state.items()
        if k in ckpt_state and tuple(ckpt_state[k].shape) != tuple(v.shape)
    ]
    # weights first: a calibration buffer of another shape only follows from them
    shapes.sort(key=lambda text: text.startswith(CALIBRATION_PREFIX))
    return missing, unexpected, shapes


def load_checkpoint_strict(model: nn.Module,
                           filename: str,
                           config: Optional[str] = None,
                           map_location: Any = 'cpu',
                           logger: Optional[str] = 'current') -> Dict[str, Any]:
    """Loads ``filename`` into ``model`` and raises unless every key and shape matches.

    The one tolerated difference: calibration buffers (``cbt_*``) missing from the checkpoint. Then everything else
    is loaded, the calibration buffers keep their initial (uncalibrated) values, and a warning says so.

    Args:
        model (nn.Module): The model built from ``config``.
        filename (str): The checkpoint (path or URL).
        config (str, optional): The config the model was built from (named in the error).
        map_location: As for ``torch.load``.
        logger (str, optional): mmengine logger for the uncalibrated warning (None: print).

    Returns:
        dict: The checkpoint as read (``meta`` etc. untouched).

    Raises:
        CheckpointMismatchError: Missing (other than ``cbt_*``), unexpected or mis-shaped keys; the message names
            the first few of each kind, the checkpoint and the config.
        FileNotFoundError, ValueError: See :func:`read_checkpoint`.
    """
    ckpt = read_checkpoint(filename, map_location)
    state = _state_dict_of(ckpt, filename)
    missing, unexpected, shapes = compare_state_dicts(model.state_dict(), state)
    missing_cbt = [k for k in missing if k.startswith(CALIBRATION_PREFIX)]
    missing = [k for k in missing if not k.startswith(CALIBRATION_PREFIX)]
    if missing or unexpected or shapes:
        what = [
            f'{len(missing)} missing keys (first: {_first(missing)})' if missing else '',
            f'{len(unexpected)} unexpected keys (first: {_first(unexpected)})' if unexpected else '',
            f'{len(shapes)} keys of another shape (first: {_first(shapes)})' if shapes else ''
        ]
        source = f'the model built from {config}' if config else f'this {type(model).__name__}'
        found = '; '.join(w for w in what if w)
        raise CheckpointMismatchError(f'checkpoint {filename} does not fit {source}: {found}. Pass the config the '
                                      'checkpoint was trained with (and the same --cfg-options).')
    model.load_state_dict(state, strict=not missing_cbt)
    if missing_cbt:
        calibrated = bool(getattr(model, 'is_calibrated', False))
        state_note = ('partly calibrated checkpoint; the missing ones keep their initial values' if calibrated else
                      'uncalibrated checkpoint; the model is UNCALIBRATED (calibrate it with tools/calibrate.py '
                      'before using exit_mode="cbt")')
        msg = f'checkpoint {filename} has no CBT calibration buffers ({_first(missing_cbt)}): an older or {state_note}'
        from mmengine.logging import print_log
        print_log(msg, logger=logger, level=30)  # logging.WARNING
    return ckpt


def build_segmentor_strict(config: str, checkpoint: str) -> Tuple[Any, nn.Module]:
    """The config's model (``pretrained`` off, registries set up) with ``checkpoint`` loaded strictly, in eval mode.

    Args:
        config (str): Config file.
        checkpoint (str): Checkpoint for the model that config builds.

    Returns:
        tuple: The loaded ``Config`` and the model.
    """
    from mmengine.config import Config

    from mmseg.registry import MODELS
    from mmseg.utils import register_all_modules

    import mmseg_cbt  # noqa: F401  (registers the plugin's modules)
    register_all_modules()
    cfg = Config.fromfile(config)
    cfg.model.pretrained = None
    model = MODELS.build(cfg.model)
    load_checkpoint_strict(model, checkpoint, config=config, logger=None)
    return cfg, model.eval()
