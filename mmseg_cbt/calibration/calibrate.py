"""Calibration of a model: gather statistics over data, turn them into thresholds, store them in the model, report
them (log, JSON, plot).

:func:`calibrate_and_report` is the one algorithm that :class:`~mmseg_cbt.engine.hooks.CBTCalibrationHook` and
``tools/calibrate.py`` both call (as mmpretrain's ``PreciseBNHook`` calls one function), so both give the same
thresholds, report and files for the same model and data. Two methods map statistics to per-class thresholds in
``[alpha, beta]``: ``'cbt'``, CBT's min-max map of class margins (Görmez & Koyuncu, IEEE SPL 2024), and
``'cbt-precision'``, the lowest threshold at which the pixels that stop as a class reach a target precision
(:mod:`mmseg_cbt.calibration.precision`). The data pass and its distributed rules are in
:mod:`mmseg_cbt.calibration.gather`.
"""
import os.path as osp
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
from mmengine.dist import is_main_process
from mmengine.logging import print_log
from torch import Tensor, nn

from ..utils.io import OUTPUTS_KEY, atomic_file_set, read_json_outputs, write_json
from .gather import (_check_early_exit, _unwrap, broadcast_model_state, build_calibration_dataloader,
                     check_calibration_data, gather_class_prob_stats, gather_exit_stats)
from .precision import DEFAULT_PRECISION_BINS, PRECISION_METHOD, PrecisionStats, precision_thresholds
from .stats import ClassProbStats
from .thresholds import _check_alpha_beta, cbt_thresholds, class_margins

__all__ = [
    'CALIBRATION_METHODS', 'CalibrationResult', 'calibrate_and_report', 'gather_class_prob_stats', 'apply_calibration',
    'calibration_report', 'calibration_result_from_model', 'build_calibration_dataloader', 'broadcast_model_state',
    'check_calibration_data', 'write_calibration_outputs', 'check_calibration_method'
]

#: Threshold methods of the hook and tool: CBT's min-max map of margins, and the precision target.
CALIBRATION_METHODS = ('cbt', PRECISION_METHOD)


def check_calibration_method(method: str,
                             target: Optional[float] = None,
                             alpha: float = 0.5,
                             beta: float = 1.0) -> None:
    """Checks a calibration method and its parameters before any work.

    Args:
        method (str): One of :data:`CALIBRATION_METHODS`.
        target (float, optional): ``'cbt-precision'``: target precision in (0, 1].
        alpha (float): Lower end of the range.
        beta (float): Upper end of the range.

    Raises:
        ValueError: Naming the option, its value and what is allowed.
    """
    if method not in CALIBRATION_METHODS:
        raise ValueError(f'method must be one of {CALIBRATION_METHODS}, got {method!r}')
    if method == PRECISION_METHOD:
        from .precision import check_precision_options
        check_precision_options(target, alpha, beta)


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


def calibration_report(thresholds: torch.Tensor,
                       class_mean_probs: torch.Tensor,
                       counts: torch.Tensor,
                       alpha: float,
                       beta: float,
                       class_names: Sequence[str],
                       method: str = 'cbt') -> Dict[str, Any]:
    """A JSON-serialisable summary: per class its pixel count, margin, threshold(s) and per-exit mean softmax.

    ``method`` (``'cbt'`` or ``'cbt-precision'``) names the report's ``method``: ``CBT`` / ``CBT-ns`` (thresholds
    shared by the exits or per exit) for the first, ``cbt-precision`` / ``cbt-precision-ns`` for the second.
    """
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
        method=_method_name(method, share),
        alpha=alpha,
        beta=beta,
        share_exits=share,
        num_exits=int(class_mean_probs.shape[0]),
        class_order_easy_to_hard=[class_names[k] for k in order],
        classes=classes)


def _method_name(method: str, share: bool) -> str:
    base = 'CBT' if method == 'cbt' else method
    return base if share else base + '-ns'


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
                                  extra_report: Optional[Dict[str, Any]] = None,
                                  method: str = 'cbt') -> CalibrationResult:
    """The calibration a model already holds (its ``cbt_*`` buffers), as :func:`calibrate_and_report` returns it.

    Args:
        model (nn.Module): A calibrated early-exit segmentor (possibly wrapped).
        class_names (Sequence[str]): K names.
        alpha (float): The range it was calibrated with (the buffers hold it in float32 only).
        beta (float): See ``alpha``.
        extra_report (dict, optional): Fields added to the report.
        method (str): The method the thresholds were computed with (the buffers do not record it).

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
    report = calibration_report(thr, mean_probs, counts, float(alpha), float(beta), class_names, method)
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
                         logger: Optional[str] = 'current',
                         method: str = 'cbt',
                         target: Optional[float] = None,
                         num_bins: int = DEFAULT_PRECISION_BINS) -> CalibrationResult:
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
        method (str): ``'cbt'`` (CBT's min-max map of class margins) or ``'cbt-precision'`` (per exit and class the
            lowest threshold whose stopped training pixels reach precision ``target``, clipped into ``[alpha, beta]``;
            its histograms are gathered in the same pass and not stored, so ``from_stats`` is refused).
        target (float, optional): ``'cbt-precision'``: the target precision in (0, 1].
        num_bins (int): ``'cbt-precision'``: confidence bins of the histograms (a power of two).

    Returns:
        CalibrationResult: Thresholds, statistics and report.
    """
    _check_alpha_beta(alpha, beta)
    check_calibration_method(method, target, alpha, beta)
    model = _check_early_exit(model)
    precision = method == PRECISION_METHOD
    if precision and from_stats:
        raise ValueError(f'method={PRECISION_METHOD!r} needs a pass over the calibration data (its confidence '
                         'histograms are not stored in the checkpoint): drop from_stats / --from-stats')
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
        if precision:
            ignore_index = getattr(model.decode_head, 'ignore_index', 255)
            stats = ClassProbStats(model.num_exits, model.num_classes, ignore_index=ignore_index)
            hist = PrecisionStats(model.num_exits, model.num_classes, num_bins, ignore_index)
            gather_exit_stats(model, dataloader, [stats, hist], max_batches, progress=progress)
            if int(stats.counts.sum()) == 0:
                raise ValueError('the calibration data holds no labelled pixel: thresholds cannot be computed')
        else:
            stats = gather_class_prob_stats(model, dataloader, max_batches, progress=progress)
        mean_probs, counts = stats.class_mean_probs(), stats.counts
    if class_names is None or len(class_names) != model.num_classes:
        raise ValueError(f'{model.num_classes} class names are needed, got '
                         f'{None if class_names is None else len(class_names)}')
    class_names = [str(c) for c in class_names]
    if precision:
        thr = precision_thresholds(hist, target, alpha, beta, share_exits=share_exits, class_names=class_names)
        model.set_cbt_calibration(thr, alpha, beta, class_mean_probs=mean_probs, class_counts=counts)
    else:
        thr = apply_calibration(model, mean_probs, counts, alpha, beta, share_exits, class_names)
    report = calibration_report(thr, mean_probs, counts, float(alpha), float(beta), class_names, method)
    if precision:
        report.update(target=float(target), precision_bins=int(num_bins))
    report.update(extra_report or {})
    result = CalibrationResult(thr, mean_probs, counts, float(alpha), float(beta), class_names, report)
    print_log('[CBT] ' + result.summary(), logger=logger)
    if json_file is not None:
        write_calibration_outputs(result, json_file, plot_file, extra_files=extra_files)
    return result
