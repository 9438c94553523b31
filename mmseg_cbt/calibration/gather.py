"""Gathering exit statistics over data for calibration: the data (training split with the test pipeline, every
image once over all ranks), rank 0's model on every rank, and one pass that feeds the exit logits, at the labels'
size, to any number of exact statistics objects (CBT's class-mean softmax, the precision histograms).

Distributed: every rank must hold the model that rank 0 will save, and every pixel must be counted once. So
:func:`gather_exit_stats` first broadcasts rank 0's parameters and buffers (BN running statistics differ between
ranks under DDP with ``broadcast_buffers=False`` and plain BN), the default loader splits the data without padding
(``round_up=False``: a rank may get no image at all), and the exact integer sums are all-reduced. A failure on one
rank is raised on every rank instead of leaving the others waiting in a collective.
"""
import copy
from itertools import chain
from typing import Callable, List, Optional, Sequence

import torch
from mmengine.dist import is_main_process
from mmengine.model import is_model_wrapper
from mmengine.utils import ProgressBar
from torch import nn

from .stats import ClassProbStats

__all__ = [
    'build_calibration_dataloader', 'check_calibration_data', 'broadcast_model_state', 'run_data_pass',
    'gather_exit_stats', 'gather_class_prob_stats'
]

_EMPTY_CALIBRATION = 'the calibration dataloader is empty: no training pixels to compute thresholds from'
_EE_API = ('inference_exits', 'restore_logits', 'num_exits', 'set_cbt_calibration')


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if is_model_wrapper(model) else model


def _check_early_exit(model: nn.Module) -> nn.Module:
    model = _unwrap(model)
    for attr in _EE_API:
        if not hasattr(model, attr):
            raise TypeError(f'{type(model).__name__} is not an early-exit segmentor (no {attr})')
    return model


def _exact_sampler(sampler: Optional[dict]) -> dict:
    """The sampler config with every image read exactly once over all ranks (``round_up=False``)."""
    sampler = dict(type='DefaultSampler', shuffle=False) if sampler is None else dict(sampler)
    if sampler.get('type') in ('DefaultSampler', 'mmengine.DefaultSampler'):
        if sampler.get('round_up', False):
            raise ValueError('the calibration dataloader\'s DefaultSampler has round_up=True: it pads the split with '
                             'repeated images, which would then be counted twice; use round_up=False')
        sampler['round_up'] = False
    elif 'Infinite' in str(sampler.get('type')):
        raise ValueError(f'the calibration dataloader needs a finite sampler (DefaultSampler), got '
                         f'{sampler.get("type")}')
    return sampler


def build_calibration_dataloader(cfg,
                                 dataloader: Optional[dict] = None,
                                 batch_size: int = 1,
                                 num_workers: Optional[int] = None):
    """Builds the calibration dataloader: by default the training split read with the test pipeline.

    The sampler reads every image once over all ranks (``DefaultSampler`` with ``round_up=False``; an explicit
    ``round_up=True`` is an error: it would count padded repeats), so statistics do not depend on the number of
    ranks.

    Args:
        cfg (Config): The full mmseg config (``train_dataloader`` and ``test_dataloader`` are read).
        dataloader (dict, optional): An explicit dataloader config; used as given except for the sampler rule.
        batch_size (int): Batch size of the default loader (1: images of different sizes never share a batch).
        num_workers (int, optional): Workers of the default loader (default: the training loader's).

    Returns:
        DataLoader: Unshuffled, finite loader.
    """
    from mmengine.runner import Runner
    if dataloader is None:
        train = copy.deepcopy(cfg.train_dataloader)
        test_loader = cfg.get('test_dataloader') or cfg.get('val_dataloader')
        if 'pipeline' not in train.dataset or test_loader is None or 'pipeline' not in test_loader.dataset:
            raise ValueError('cannot derive a calibration dataloader (training split with the test pipeline) from '
                             'this config: the training dataset has no top-level pipeline (a wrapped dataset?) or '
                             'there is no test/val dataloader; pass an explicit `dataloader` config')
        train.dataset.pipeline = copy.deepcopy(test_loader.dataset.pipeline)
        dataloader = dict(
            batch_size=batch_size,
            num_workers=train.get('num_workers', 0) if num_workers is None else num_workers,
            persistent_workers=False,
            sampler=None,
            dataset=train.dataset)
    dataloader = copy.deepcopy(dict(dataloader))
    dataloader['sampler'] = _exact_sampler(dataloader.get('sampler'))
    if not dataloader.get('num_workers'):
        dataloader['persistent_workers'] = False  # torch refuses persistent workers without workers
    try:
        return Runner.build_dataloader(dataloader)
    except ValueError as e:
        # mmengine's BaseDataset cannot serialise an empty file list and fails with numpy's message
        if 'need at least one array to concatenate' not in str(e):
            raise
        ds = dataloader.get('dataset', {})
        raise ValueError(f'the calibration dataset is empty: {ds.get("type")}(data_root={ds.get("data_root")!r}, '
                         f'data_prefix={ds.get("data_prefix")!r}) has no image; CBT thresholds need labelled '
                         'training pixels') from e


def _dataset_description(dataset) -> str:
    root = getattr(dataset, 'data_root', None)
    prefix = getattr(dataset, 'data_prefix', None)
    return f'{type(dataset).__name__}(data_root={root!r}, data_prefix={prefix!r})'


def check_calibration_data(dataloader, model: nn.Module, class_names: Optional[Sequence[str]] = None) -> List[str]:
    """Checks calibration data against the model before any work: not empty, class names matching the model's
    class count, and the first sample readable.

    Args:
        dataloader: The calibration dataloader (its ``dataset`` is read).
        model (nn.Module): The early-exit segmentor (possibly wrapped).
        class_names (Sequence[str], optional): Names to check instead of the dataset's ``metainfo['classes']``.

    Returns:
        list[str]: The class names (K of them).

    Raises:
        ValueError: Empty dataset, or a class count that differs from the model's.
    """
    model = _check_early_exit(model)
    dataset = getattr(dataloader, 'dataset', None)
    if dataset is None:
        raise TypeError(f'the calibration dataloader has no dataset ({type(dataloader).__name__})')
    if len(dataset) == 0:
        raise ValueError(f'the calibration dataset is empty: {_dataset_description(dataset)} has no image; CBT '
                         'thresholds need labelled training pixels')
    if class_names is None:
        class_names = list(getattr(dataset, 'metainfo', {}).get('classes', []) or [])
    class_names = [str(c) for c in class_names]
    if len(class_names) != model.num_classes:
        raise ValueError(f'num_classes mismatch: the calibration dataset {_dataset_description(dataset)} has '
                         f'{len(class_names)} classes, the model {model.num_classes}')
    dataset[0]  # a missing or unreadable image fails here, not after training
    return class_names


def broadcast_model_state(model: nn.Module, src: int = 0) -> None:
    """Makes every rank hold rank ``src``'s model: its parameters and buffers are broadcast in place.

    Under DDP the parameters agree anyway, but buffers need not (BN running statistics with
    ``broadcast_buffers=False`` and plain BN). Tensors are sent coalesced per dtype and device, as mmengine's
    buffer-sync utilities do. No-op outside distributed runs.

    Args:
        model (nn.Module): The model (possibly wrapped).
        src (int): The rank whose state is kept (0: the one that saves checkpoints).
    """
    from mmengine import dist
    if dist.get_world_size() <= 1:
        return
    model = _unwrap(model)
    seen, groups = set(), {}
    for t in chain(model.parameters(), model.buffers()):
        if id(t) in seen:
            continue
        seen.add(id(t))
        groups.setdefault((t.dtype, t.device), []).append(t.data)
    for (dtype, _), tensors in groups.items():  # module order: the same on every rank, as collectives require
        flat = torch.cat([t.reshape(-1) for t in tensors])
        wire = flat.to(torch.uint8) if dtype == torch.bool else flat  # gloo has no bool collectives
        dist.broadcast(wire, src=src)
        flat = wire.to(dtype) if dtype == torch.bool else wire
        offset = 0
        for t in tensors:
            t.copy_(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()


def _agree_on_failure(error: Optional[BaseException]) -> None:
    """Raises on every rank when any rank failed (so no rank waits forever in the next collective)."""
    from mmengine import dist
    if dist.get_world_size() > 1:
        flag = torch.tensor([0 if error is None else 1], dtype=torch.int64)
        dist.all_reduce(flag, op='max')
        if error is None and int(flag):
            raise RuntimeError('CBT calibration failed on another rank (see that rank\'s log)')
    if error is not None:
        raise error


@torch.no_grad()
def run_data_pass(model: nn.Module,
                  dataloader,
                  step: Callable[[dict], None],
                  max_batches: Optional[int] = None,
                  progress: bool = True,
                  sync_model: bool = True,
                  empty_message: str = _EMPTY_CALIBRATION) -> None:
    """One bounded pass over a dataloader in eval mode under ``no_grad``, safe for distributed runs.

    Every rank first takes rank 0's parameters and buffers (``sync_model``), each preprocessed batch goes to
    ``step``, the training mode is restored afterwards, and an error on one rank is raised on every rank.

    Args:
        model (nn.Module): The (unwrapped) segmentor; its ``data_preprocessor`` prepares every batch.
        dataloader: Yields mmseg batches.
        step (callable): Called with each preprocessed batch (``inputs``, ``data_samples``).
        max_batches (int, optional): Stop after this many batches (per rank).
        progress (bool): Show a progress bar on the main process.
        sync_model (bool): Broadcast rank 0's model state first (see :func:`broadcast_model_state`).
        empty_message (str): The error for an empty dataloader.

    Raises:
        ValueError: An empty dataloader or ``max_batches < 1``.
    """
    if max_batches is not None and max_batches < 1:
        raise ValueError(f'max_batches must be >= 1 or None, got {max_batches}')
    dataset = getattr(dataloader, 'dataset', None)
    size = len(dataset) if dataset is not None else (len(dataloader) if hasattr(dataloader, '__len__') else None)
    if size == 0:  # the whole split (the same on every rank), not this rank's share
        raise ValueError(empty_message)
    if sync_model:
        broadcast_model_state(model)
    try:
        total = len(dataloader)
    except TypeError:
        total = None
    if max_batches is not None:
        total = max_batches if total is None else min(total, max_batches)
    was_training = model.training
    model.eval()
    bar = ProgressBar(total) if progress and is_main_process() and total else None
    error = None
    try:
        for i, data in enumerate(dataloader):
            if max_batches is not None and i >= max_batches:
                break
            step(model.data_preprocessor(data, False))
            if bar is not None:
                bar.update()
    except Exception as e:  # raised below on every rank
        error = e
    finally:
        model.train(was_training)
    _agree_on_failure(error)


def gather_exit_stats(model: nn.Module,
                      dataloader,
                      stats: Sequence,
                      max_batches: Optional[int] = None,
                      progress: bool = True,
                      sync_model: bool = True) -> Sequence:
    """One pass over a dataloader feeding every exit's logits, at the labels' size, to statistics objects.

    The exit logits are computed densely (nothing stops while calibrating) and brought to the label's size exactly
    the way the segmentor predicts (resize to the input, remove padding, undo flip, resize to ``ori_shape``), so the
    statistics describe the probabilities the model's predictions are made from. The pass is
    :func:`run_data_pass` (eval mode, ``no_grad``, rank 0's model, errors raised on every rank). Each object's sums
    must be exact (integers), so that its ``all_reduce`` gives bit-for-bit the single-process result for any split
    of the data over ranks; a rank may receive no batch at all (the objects are sized up front).

    Args:
        model (nn.Module): An :class:`EarlyExitEncoderDecoder` (possibly wrapped).
        dataloader: Yields mmseg batches with ``gt_sem_seg``.
        stats (Sequence): Objects with ``update(exit_logits, labels)`` and ``all_reduce()`` (e.g.
            :class:`~mmseg_cbt.calibration.ClassProbStats`, :class:`~mmseg_cbt.calibration.PrecisionStats`).
        max_batches (int, optional): Stop after this many batches (per rank).
        progress (bool): Show a progress bar on the main process.
        sync_model (bool): Broadcast rank 0's model state first (see :func:`broadcast_model_state`).

    Returns:
        Sequence: ``stats``, updated and all-reduced.

    Raises:
        ValueError: An empty dataloader or ``max_batches < 1``.
    """
    model = _check_early_exit(model)
    if not stats:
        raise ValueError('gather_exit_stats needs at least one statistics object')
    # exits whose heads output per-class scores in [0, 1] (scores_are_probs) are summed as they are, not softmaxed
    probs_flags = [bool(getattr(head, 'scores_are_probs', False)) for head in model.exits]
    for s in stats:
        s.scores_are_probs = probs_flags

    def step(data: dict) -> None:
        samples = data['data_samples']
        metas = [s.metainfo for s in samples]
        exit_logits = model.inference_exits(data['inputs'], metas, exit_mode='dense')
        for j, sample in enumerate(samples):
            restored = [model.restore_logits(lg[j:j + 1], metas[j]).unsqueeze(0) for lg in exit_logits]
            labels = sample.gt_sem_seg.data.to(restored[0].device).long()
            for s in stats:
                s.update(restored, labels)

    run_data_pass(model, dataloader, step, max_batches, progress, sync_model)
    for s in stats:
        if hasattr(s, 'release_buffers'):
            s.release_buffers()
        s.all_reduce()
    return stats


def gather_class_prob_stats(model: nn.Module,
                            dataloader,
                            max_batches: Optional[int] = None,
                            progress: bool = True,
                            sync_model: bool = True) -> ClassProbStats:
    """Per exit, per ground-truth class sums of softmax vectors and pixel counts over a dataloader.

    :func:`gather_exit_stats` with one :class:`~mmseg_cbt.calibration.ClassProbStats` (exact fixed-point sums).

    Args:
        model (nn.Module): An :class:`EarlyExitEncoderDecoder` (possibly wrapped).
        dataloader: Yields mmseg batches with ``gt_sem_seg``.
        max_batches (int, optional): Stop after this many batches (per rank).
        progress (bool): Show a progress bar on the main process.
        sync_model (bool): Broadcast rank 0's model state first (see :func:`broadcast_model_state`).

    Returns:
        ClassProbStats: The all-reduced statistics.

    Raises:
        ValueError: An empty dataloader, ``max_batches < 1``, or no labelled pixel on any rank.
    """
    model = _check_early_exit(model)
    ignore_index = getattr(model.decode_head, 'ignore_index', 255)
    # shapes up front: a rank without a batch still takes part in the all-reduce
    stats = ClassProbStats(model.num_exits, model.num_classes, ignore_index=ignore_index)
    gather_exit_stats(model, dataloader, [stats], max_batches, progress, sync_model)
    if int(stats.counts.sum()) == 0:
        raise ValueError('the calibration data holds no labelled pixel (every label is ignore_index or outside '
                         f'[0, {model.num_classes})): CBT thresholds cannot be computed')
    return stats
