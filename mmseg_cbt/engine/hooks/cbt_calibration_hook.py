"""Hook computing CBT per-class thresholds from training pixels and storing them in the model."""
import os.path as osp
from typing import Optional

from mmengine.dist import is_main_process
from mmengine.hooks import Hook
from mmengine.logging import print_log
from mmengine.model import is_model_wrapper
from mmengine.runner import EpochBasedTrainLoop

from mmseg.registry import HOOKS

from mmseg_cbt.calibration.calibrate import (apply_calibration, build_calibration_dataloader,
                                             calibration_report, gather_class_prob_stats, write_json_atomic)
from mmseg_cbt.calibration.thresholds import _check_alpha_beta

__all__ = ['CBTCalibrationHook']


@HOOKS.register_module()
class CBTCalibrationHook(Hook):
    """Calibrates Class Based Thresholds (CBT) from training data, like mmpretrain's ``PreciseBNHook`` gathers BN
    statistics: bounded (``max_batches``), under ``no_grad`` in eval mode, with exact sums and counts that are
    all-reduced across ranks.

    When it runs: at the end of training (the last iteration of an iteration-based loop, the last epoch of an
    epoch-based one) and, if ``interval > 0``, every ``interval`` iterations (or epochs). Its priority (``LOW``)
    puts it before ``CheckpointHook`` (``VERY_LOW``) at the same point, so the checkpoint saved there already holds
    the thresholds (persistent buffers of the segmentor) and ``tools/test.py`` on it uses them. It also writes
    ``cbt_calibration.json`` (statistics, thresholds, class order) and ``cbt_thresholds.png`` to the work dir.

    Args:
        alpha (float): Threshold of the easiest class, in (0, 1].
        beta (float): Threshold of the hardest class, in [alpha, 1].
        share_exits (bool): CBT (True, one threshold vector for all exits) or CBT-ns (False, one per exit).
        interval (int): Also calibrate every ``interval`` iterations/epochs; -1 = only at the end.
        dataloader (dict, optional): Dataloader config; default: the training split with the test pipeline.
        max_batches (int, optional): Bound on the batches read per rank (default: the whole split).
        plot (bool): Write the sorted bar chart of the thresholds.
        progress (bool): Progress bar while gathering.
    """

    priority = 'LOW'

    def __init__(self,
                 alpha: float = 0.99,
                 beta: float = 0.998,
                 share_exits: bool = True,
                 interval: int = -1,
                 dataloader: Optional[dict] = None,
                 max_batches: Optional[int] = None,
                 plot: bool = True,
                 progress: bool = True) -> None:
        _check_alpha_beta(alpha, beta)
        if max_batches is not None and max_batches < 1:
            raise ValueError(f'max_batches must be >= 1 or None, got {max_batches}')
        self.alpha = float(alpha)
        self.beta = float(beta)
        self.share_exits = share_exits
        self.interval = interval
        self.dataloader_cfg = dataloader
        self.max_batches = max_batches
        self.plot = plot
        self.progress = progress
        self._loader = None
        self._last_calibrated = None

    def _by_epoch(self, runner) -> bool:
        return isinstance(runner.train_loop, EpochBasedTrainLoop)

    def after_train_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
        if self._by_epoch(runner):
            return
        if self.is_last_train_iter(runner) or (self.interval > 0 and self.every_n_train_iters(runner, self.interval)):
            self.calibrate(runner)

    def after_train_epoch(self, runner) -> None:
        if not self._by_epoch(runner):
            return
        if self.is_last_train_epoch(runner) or (self.interval > 0 and self.every_n_epochs(runner, self.interval)):
            self.calibrate(runner)

    def after_train(self, runner) -> None:
        # A run that never reached a calibration point inside the loop (e.g. resumed at max_iters) still gets one.
        if self._last_calibrated is None:
            self.calibrate(runner)

    def calibrate(self, runner) -> None:
        """Gathers statistics, computes thresholds, stores them in the model and writes JSON/PNG next to the
        checkpoints."""
        model = runner.model.module if is_model_wrapper(runner.model) else runner.model
        if self._loader is None:
            self._loader = build_calibration_dataloader(runner.cfg, self.dataloader_cfg)
        print_log(f'[CBTCalibrationHook] gathering class statistics on {len(self._loader)} batches'
                  + (f' (max {self.max_batches})' if self.max_batches else ''), logger='current')
        stats = gather_class_prob_stats(model, self._loader, self.max_batches, progress=self.progress)
        class_names = list(runner.train_dataloader.dataset.metainfo.get('classes', [])) or \
            [str(k) for k in range(model.num_classes)]
        if len(class_names) != model.num_classes:
            raise ValueError(f'num_classes mismatch: the dataset has {len(class_names)} classes, the model '
                             f'{model.num_classes}')
        mean_probs, counts = stats.class_mean_probs(), stats.counts
        thr = apply_calibration(model, mean_probs, counts, self.alpha, self.beta, self.share_exits, class_names)
        report = calibration_report(thr, mean_probs, counts, self.alpha, self.beta, class_names)
        report['iteration'] = runner.iter + 1
        self._last_calibrated = runner.iter + 1
        thr_of = {c['name']: c['threshold'] for c in report['classes']}
        order = ', '.join(f'{name}={thr_of[name]}' for name in report['class_order_easy_to_hard'])
        print_log(f'[CBTCalibrationHook] {report["method"]} thresholds in [{self.alpha}, {self.beta}] '
                  f'(easy -> hard): {order}', logger='current')
        if is_main_process():
            out = osp.join(runner.work_dir, 'cbt_calibration.json')
            write_json_atomic(report, out)
            if self.plot:
                from mmseg_cbt.calibration.visualization import plot_thresholds
                plot_thresholds(thr, class_names, osp.join(runner.work_dir, 'cbt_thresholds.png'), self.alpha,
                                self.beta)
            print_log(f'[CBTCalibrationHook] wrote {out}', logger='current')
