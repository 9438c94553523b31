"""Calibration of a model: gather CBT statistics over data, turn them into thresholds, store them in the model,
report them (log, JSON, plot).

:func:`calibrate_and_report` is the one algorithm that :class:`~mmseg_cbt.engine.hooks.CBTCalibrationHook` and
``tools/calibrate.py`` both call (as mmpretrain's ``PreciseBNHook`` calls one function), so both give the same
thresholds, report and files for the same model and data.

Distributed: every rank must hold the model that rank 0 will save, and every pixel must be counted once. So
:func:`gather_class_prob_stats` first broadcasts rank 0's parameters and buffers (BN running statistics differ
between ranks under DDP with ``broadcast_buffers=False`` and plain BN), the default loader splits the data without
padding (``round_up=False``: a rank may get no image at all), and the exact fixed-point sums are all-reduced. A
failure on one rank is raised on every rank instead of leaving the others waiting in a collective.
"""
import copy
import os.path as osp
from dataclasses import dataclass, field
from itertools import chain
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
from mmengine.dist import is_main_process
from mmengine.logging import print_log
from mmengine.model import is_model_wrapper
from mmengine.utils import ProgressBar
from torch import Tensor, nn

from ..utils.io import OUTPUTS_KEY, atomic_file_set, read_json_outputs, write_json
from .stats import ClassProbStats
from .thresholds import _check_alpha_beta, cbt_thresholds, class_margins

__all__ = [
    'CalibrationResult', 'calibrate_and_report', 'gather_class_prob_stats', 'apply_calibration', 'calibration_report',
    'calibration_result_from_model', 'build_calibration_dataloader', 'broadcast_model_state', 'check_calibration_data',
    'write_calibration_outputs'
]

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
def gather_class_prob_stats(model: nn.Module,
                            dataloader,
                            max_batches: Optional[int] = None,
                            progress: bool = True,
                            sync_model: bool = True) -> ClassProbStats:
    """Per exit, per ground-truth class sums of softmax vectors and pixel counts over a dataloader.

    The exit logits are computed densely (nothing stops while calibrating) and brought to the label's size exactly
    the way the segmentor predicts (resize to the input, remove padding, undo flip, resize to ``ori_shape``), so the
    statistics describe the probabilities the model's predictions are made from. Runs in eval mode under
    ``no_grad`` and restores the training mode afterwards. Sums are exact fixed-point integers, all-reduced across
    ranks, so any split of the data over ranks gives bit-for-bit the same result. Distributed, every rank first
    takes rank 0's parameters and buffers (``sync_model``) and a rank may receive no batch at all.

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
    if max_batches is not None and max_batches < 1:
        raise ValueError(f'max_batches must be >= 1 or None, got {max_batches}')
    dataset = getattr(dataloader, 'dataset', None)
    size = len(dataset) if dataset is not None else (len(dataloader) if hasattr(dataloader, '__len__') else None)
    if size == 0:  # the whole split (the same on every rank), not this rank's share
        raise ValueError('the calibration dataloader is empty: no training pixels to compute thresholds from')
    if sync_model:
        broadcast_model_state(model)
    ignore_index = getattr(model.decode_head, 'ignore_index', 255)
    # shapes up front: a rank without a batch still takes part in the all-reduce
    stats = ClassProbStats(model.num_exits, model.num_classes, ignore_index=ignore_index)
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
            data = model.data_preprocessor(data, False)
            samples = data['data_samples']
            metas = [s.metainfo for s in samples]
            exit_logits = model.inference_exits(data['inputs'], metas, exit_mode='dense')
            for j, sample in enumerate(samples):
                restored = [model.restore_logits(lg[j:j + 1], metas[j]).unsqueeze(0) for lg in exit_logits]
                stats.update(restored, sample.gt_sem_seg.data.to(restored[0].device).long())
            if bar is not None:
                bar.update()
    except Exception as e:  # raised below on every rank
        error = e
    finally:
        model.train(was_training)
    _agree_on_failure(error)
    stats.release_buffers()
    stats.all_reduce()
    if int(stats.counts.sum()) == 0:
        raise ValueError('the calibration data holds no labelled pixel (every label is ignore_index or outside '
                         f'[0, {model.num_classes})): CBT thresholds cannot be computed')
    return stats


def apply_calibration(model: nn.Module,
                      class_mean_probs: torch.Tensor,
                      counts: torch.Tensor,
                      alpha: float,
                      beta: float,
                      share_exits: bool = True,
                      class_names: Optional[Sequence[str]] = None) -> torch.Tensor:
    """Computes CBT (or CBT-ns) thresholds and stores them with their statistics in the model's buffers.

    Args:
        model (nn.Module): The early-exit segmentor (possibly wrapped).
        class_mean_probs (Tensor): (N, K, K) mean softmax per exit and ground-truth class.
        counts (Tensor): (K,) pixel counts per class (0 = no training pixels).
        alpha (float): Threshold of the easiest class.
        beta (float): Threshold of the hardest class.
        share_exits (bool): CBT (one vector for every exit) or CBT-ns (one per exit).
        class_names (Sequence[str], optional): For warnings.

    Returns:
        Tensor: The thresholds, (K,) or (N, K).
    """
    model = _unwrap(model)
    n, k = model.num_exits, model.num_classes
    if tuple(class_mean_probs.shape) != (n, k, k):
        raise ValueError(f'num_classes/num_exits mismatch: statistics have shape {tuple(class_mean_probs.shape)}, '
                         f'the model needs ({n}, {k}, {k})')
    thr = cbt_thresholds(class_mean_probs, alpha, beta, share_exits=share_exits, counts=counts, class_names=class_names)
    model.set_cbt_calibration(thr, alpha, beta, class_mean_probs=class_mean_probs, class_counts=counts)
    return thr


def calibration_report(thresholds: torch.Tensor, class_mean_probs: torch.Tensor, counts: torch.Tensor, alpha: float,
                       beta: float, class_names: Sequence[str]) -> Dict[str, Any]:
    """A JSON-serialisable summary: per class its pixel count, margin, threshold(s) and per-exit mean softmax."""
    share = thresholds.dim() == 1
    margins = class_margins(class_mean_probs.mean(dim=0))
    classes = []
    for k, name in enumerate(class_names):
        classes.append(
            dict(
                name=name,
                count=int(counts[k]),
                margin=float(margins[k]),
                threshold=float(thresholds[k]) if share else [float(t) for t in thresholds[:, k]],
                mean_probs=[[round(float(p), 8) for p in class_mean_probs[e, k]]
                            for e in range(class_mean_probs.shape[0])]))
    order = sorted(
        range(len(class_names)), key=lambda k: float(thresholds[k]) if share else float(thresholds[:, k].mean()))
    return dict(
        method='CBT' if share else 'CBT-ns',
        alpha=alpha,
        beta=beta,
        share_exits=share,
        num_exits=int(class_mean_probs.shape[0]),
        class_order_easy_to_hard=[class_names[k] for k in order],
        classes=classes)


@dataclass
class CalibrationResult:
    """What :func:`calibrate_and_report` computed and stored in the model.

    Attributes:
        thresholds (Tensor): (K,) for CBT, (N, K) for CBT-ns (float32, as stored in the model).
        class_mean_probs (Tensor): (N, K, K) float64 statistics they came from.
        counts (Tensor): (K,) int64 pixel counts per class.
        alpha (float): Lower end of the range.
        beta (float): Upper end of the range.
        class_names (list[str]): K names.
        report (dict): :func:`calibration_report` plus any extra fields given.
    """
    thresholds: Tensor
    class_mean_probs: Tensor
    counts: Tensor
    alpha: float
    beta: float
    class_names: List[str]
    report: Dict[str, Any] = field(default_factory=dict)

    @property
    def share_exits(self) -> bool:
        """bool: CBT (True) or CBT-ns (False)."""
        return self.thresholds.dim() == 1

    def summary(self) -> str:
        """One line: the method, the range and every class's threshold(s), easiest class first."""
        thr_of = {c['name']: c['threshold'] for c in self.report['classes']}

        def fmt(t):
            return f'{t:.4f}' if isinstance(t, float) else '/'.join(f'{x:.4f}' for x in t)

        order = ', '.join(f'{name}={fmt(thr_of[name])}' for name in self.report['class_order_easy_to_hard'])
        return f'{self.report["method"]} thresholds in [{self.alpha}, {self.beta}] (easy -> hard): {order}'


def calibration_result_from_model(model: nn.Module,
                                  class_names: Sequence[str],
                                  alpha: float,
                                  beta: float,
                                  extra_report: Optional[Dict[str, Any]] = None) -> CalibrationResult:
    """The calibration a model already holds (its ``cbt_*`` buffers), as :func:`calibrate_and_report` returns it.

    Args:
        model (nn.Module): A calibrated early-exit segmentor (possibly wrapped).
        class_names (Sequence[str]): K names.
        alpha (float): The range it was calibrated with (the buffers hold it in float32 only).
        beta (float): See ``alpha``.
        extra_report (dict, optional): Fields added to the report.

    Returns:
        CalibrationResult: Thresholds ((K,) when shared), statistics and report.
    """
    model = _check_early_exit(model)
    if not model.is_calibrated:
        raise RuntimeError('the model holds no CBT calibration')
    thr = model.cbt_thresholds.detach().cpu().clone()
    if bool(model.cbt_share_exits):
        thr = thr[0]
    mean_probs, counts = model.cbt_class_mean_probs.cpu().clone(), model.cbt_class_counts.cpu().clone()
    class_names = [str(c) for c in class_names]
    report = calibration_report(thr, mean_probs, counts, float(alpha), float(beta), class_names)
    report.update(extra_report or {})
    return CalibrationResult(thr, mean_probs, counts, float(alpha), float(beta), class_names, report)


def write_calibration_outputs(result: CalibrationResult,
                              json_file: str,
                              plot_file: Optional[str] = None,
                              extra_report: Optional[Dict[str, Any]] = None,
                              extra_files: Optional[Dict[str, Callable[[str], None]]] = None) -> List[str]:
    """Writes the report JSON, the thresholds chart and any extra files as one set (main process only).

    The set is replaced together (:func:`~mmseg_cbt.utils.io.atomic_file_set`): an interrupt leaves either the
    previous set or the new one. The JSON lists the files of its set (``outputs``), so that a later run that writes
    fewer files (e.g. no chart) removes the earlier run's extra file, and nothing else.

    Args:
        result (CalibrationResult): What to report.
        json_file (str): The report.
        plot_file (str, optional): The sorted bar chart (PNG); None: no chart.
        extra_report (dict, optional): Fields added to the JSON.
        extra_files (dict, optional): Further files of the set: final path -> function writing it at a given path.

    Returns:
        list[str]: The files written (empty on other ranks).
    """
    if not is_main_process():
        return []
    extra_files = dict(extra_files or {})
    writers: Dict[str, Callable[[str], None]] = dict(extra_files)
    if plot_file is not None:
        from .visualization import plot_thresholds

        def write_plot(path: str) -> None:
            plot_thresholds(result.thresholds, result.class_names, path, result.alpha, result.beta)

        writers[plot_file] = write_plot
    files = list(writers) + [json_file]
    folder = osp.dirname(osp.abspath(json_file))
    report = dict(result.report, **(extra_report or {}))
    report[OUTPUTS_KEY] = [osp.basename(f) for f in files if osp.dirname(osp.abspath(f)) == folder]
    stale = [f for f in (read_json_outputs(json_file) or []) if osp.abspath(f) not in {osp.abspath(p) for p in files}]
    with atomic_file_set(files, remove=stale) as tmp:
        for path, write in writers.items():
            write(tmp[path])
        write_json(report, tmp[json_file])
    return files


def calibrate_and_report(model: nn.Module,
                         dataloader=None,
                         alpha: float = 0.99,
                         beta: float = 0.998,
                         share_exits: bool = True,
                         class_names: Optional[Sequence[str]] = None,
                         max_batches: Optional[int] = None,
                         from_stats: bool = False,
                         progress: bool = True,
                         json_file: Optional[str] = None,
                         plot_file: Optional[str] = None,
                         extra_report: Optional[Dict[str, Any]] = None,
                         extra_files: Optional[Dict[str, Callable[[str], None]]] = None,
                         logger: Optional[str] = 'current') -> CalibrationResult:
    """Calibrates CBT thresholds of an early-exit model and reports them: gather statistics (or take those stored
    in the model), compute thresholds, store them in the model's buffers, log them, and write JSON and chart.

    Every rank must call it (the statistics are all-reduced; see :func:`gather_class_prob_stats`); files are written
    by the main process only.

    Args:
        model (nn.Module): The early-exit segmentor (possibly wrapped).
        dataloader: The calibration data (see :func:`build_calibration_dataloader`); unused with ``from_stats``.
        alpha (float): Threshold of the easiest class, in (0, 1].
        beta (float): Threshold of the hardest class, in [alpha, 1].
        share_exits (bool): CBT (True) or CBT-ns (False).
        class_names (Sequence[str], optional): K names; default: the dataloader's ``metainfo['classes']``.
        max_batches (int, optional): Bound on the batches read per rank.
        from_stats (bool): Re-map the statistics already stored in the model (no data pass).
        progress (bool): Progress bar while gathering.
        json_file (str, optional): Write the report here (with ``plot_file`` and ``extra_files`` as one set).
        plot_file (str, optional): The thresholds chart.
        extra_report (dict, optional): Fields added to the report (e.g. the iteration).
        extra_files (dict, optional): Further files of the set, see :func:`write_calibration_outputs`.
        logger (str, optional): mmengine logger name for the summary (None: print).

    Returns:
        CalibrationResult: Thresholds, statistics and report.
    """
    _check_alpha_beta(alpha, beta)
    model = _check_early_exit(model)
    if from_stats:
        if not model.is_calibrated or int(model.cbt_class_counts.sum()) == 0:
            raise RuntimeError('the model holds no calibration statistics: gather them from data first '
                               '(without from_stats)')
        mean_probs, counts = model.cbt_class_mean_probs.cpu().clone(), model.cbt_class_counts.cpu().clone()
        if class_names is None and dataloader is not None:
            class_names = check_calibration_data(dataloader, model)
    else:
        if dataloader is None:
            raise ValueError('a calibration dataloader is needed unless from_stats=True')
        class_names = check_calibration_data(dataloader, model, class_names)
        stats = gather_class_prob_stats(model, dataloader, max_batches, progress=progress)
        mean_probs, counts = stats.class_mean_probs(), stats.counts
    if class_names is None or len(class_names) != model.num_classes:
        raise ValueError(f'{model.num_classes} class names are needed, got '
                         f'{None if class_names is None else len(class_names)}')
    class_names = [str(c) for c in class_names]
    thr = apply_calibration(model, mean_probs, counts, alpha, beta, share_exits, class_names)
    report = calibration_report(thr, mean_probs, counts, float(alpha), float(beta), class_names)
    report.update(extra_report or {})
    result = CalibrationResult(thr, mean_probs, counts, float(alpha), float(beta), class_names, report)
    print_log('[CBT] ' + result.summary(), logger=logger)
    if json_file is not None:
        write_calibration_outputs(result, json_file, plot_file, extra_files=extra_files)
    return result
