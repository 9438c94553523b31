"""Hook computing CBT per-class thresholds from training pixels and storing them in the model."""
import os
import os.path as osp
from typing import Any, Dict, Optional

from mmengine.dist import is_main_process
from mmengine.hooks import CheckpointHook, Hook
from mmengine.logging import print_log
from mmengine.model import is_model_wrapper
from mmengine.runner import EpochBasedTrainLoop

from mmseg.registry import HOOKS

from mmseg_cbt.calibration.calibrate import (CalibrationResult, build_calibration_dataloader, calibrate_and_report,
                                             calibration_result_from_model, check_calibration_data,
                                             check_calibration_method, write_calibration_outputs)
from mmseg_cbt.calibration.thresholds import _check_alpha_beta

__all__ = ['CBTCalibrationHook']

#: Key of a checkpoint's ``meta`` that records the calibration its buffers hold.
META_KEY = 'cbt_calibration'
JSON_NAME = 'cbt_calibration.json'
PLOT_NAME = 'cbt_thresholds.png'


@HOOKS.register_module()
class CBTCalibrationHook(Hook):
    """Calibrates Class Based Thresholds (CBT) from training data, like mmpretrain's ``PreciseBNHook`` gathers BN
    statistics: a thin hook around one function (:func:`~mmseg_cbt.calibration.calibrate_and_report`), bounded
    (``max_batches``), under ``no_grad`` in eval mode, with exact sums that are all-reduced across ranks after every
    rank has taken rank 0's model, so the thresholds are those of the model the checkpoint holds.

    When it runs: at the end of training (the last iteration of an iteration-based loop, the last epoch of an
    epoch-based one) and, if ``interval > 0``, every ``interval`` iterations (or epochs). Its priority (``LOW``)
    puts it before ``CheckpointHook`` (``VERY_LOW``) at the same point, so the checkpoint saved there holds the
    thresholds (persistent buffers of the segmentor) and ``tools/test.py`` on it uses them.

    Guarantees:

    * The calibration data is built and checked in ``before_train`` (empty dataset, class count): an error comes
      before the first iteration, not after the last.
    * A failure while calibrating never costs a checkpoint: it is logged, the checkpoint of that iteration is
      written (with the previous calibration, or none), and the error is raised right after.
    * ``cbt_calibration.json`` (statistics, thresholds, class order, the ``iteration`` of the calibrated model) and
      ``cbt_thresholds.png`` are written, as one set, when a checkpoint holding a new calibration is saved (or at
      the end when none is), and the checkpoint's ``meta['cbt_calibration']`` records the same iteration and range.
    * Resuming: a run resumed at its end whose checkpoint already holds this hook's calibration only rewrites the
      JSON from the checkpoint's buffers; otherwise (another ``alpha``/``beta``/``share_exits``, or an
      uncalibrated checkpoint) it recalibrates and saves the checkpoint of that iteration again (atomically), so
      the JSON and the last checkpoint never disagree.

    Args:
        alpha (float): Threshold of the easiest class, in (0, 1].
        beta (float): Threshold of the hardest class, in [alpha, 1].
        share_exits (bool): CBT (True, one threshold vector for all exits) or CBT-ns (False, one per exit).
        method (str): ``'cbt'`` (CBT's min-max map of class margins) or ``'cbt-precision'`` (per class the lowest
            threshold whose stopped training pixels are correct with precision ``target``, clipped into
            ``[alpha, beta]``; alpha >= 0.5).
        target (float, optional): The target precision of ``'cbt-precision'``, in (0, 1]. Defaults to 0.99.
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
                 progress: bool = True,
                 method: str = 'cbt',
                 target: Optional[float] = None) -> None:
        _check_alpha_beta(alpha, beta)
        if method == 'cbt-precision' and target is None:
            target = 0.99
        try:
            check_calibration_method(method, target, alpha, beta)
        except ValueError as e:
            raise ValueError(f'CBTCalibrationHook: {e}') from None
        if method == 'cbt' and target is not None:
            raise ValueError(f"CBTCalibrationHook: target={target!r} is only used with method='cbt-precision'")
        if max_batches is not None and (not isinstance(max_batches, int) or max_batches < 1):
            raise ValueError(f'CBTCalibrationHook: max_batches must be an integer >= 1 or None, got {max_batches!r}')
        if not isinstance(interval, int) or (interval < 1 and interval != -1):
            raise ValueError(f'CBTCalibrationHook: interval must be -1 (only at the end) or an integer >= 1, got '
                             f'{interval!r}')
        self.alpha = float(alpha)
        self.beta = float(beta)
        self.share_exits = bool(share_exits)
        self.method = method
        self.target = None if target is None else float(target)
        self.interval = interval
        self.dataloader_cfg = dataloader
        self.max_batches = max_batches
        self.plot = plot
        self.progress = progress
        self._loader = None
        self._class_names = None
        self._result: Optional[CalibrationResult] = None  # the calibration the model holds, made by this run
        self._record: Optional[Dict[str, Any]] = None  # its meta record (iteration, range)
        self._written = False  # whether the work-dir files describe self._result
        self._loaded: Optional[Dict[str, Any]] = None  # the record of a loaded / resumed checkpoint
        self._pending: Optional[BaseException] = None  # a calibration error raised after the checkpoint

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _model(runner):
        return runner.model.module if is_model_wrapper(runner.model) else runner.model

    def _by_epoch(self, runner) -> bool:
        return isinstance(runner.train_loop, EpochBasedTrainLoop)

    def _state(self, runner, in_loop: bool) -> Dict[str, int]:
        """The training state that a checkpoint saved now would record (mmengine's own numbering)."""
        if self._by_epoch(runner):
            return dict(iteration=runner.iter, epoch=runner.epoch + 1 if in_loop else runner.epoch)
        # inside after_train_iter the counter is not yet incremented; CheckpointHook names the file iter + 1
        return dict(iteration=runner.iter + 1 if in_loop else runner.iter)

    def _matches(self, record: Optional[Dict[str, Any]], state: Dict[str, int]) -> bool:
        return (record is not None and record.get('iteration') == state['iteration']
                and record.get('alpha') == self.alpha and record.get('beta') == self.beta
                and record.get('share_exits') == self.share_exits
                and record.get('calibration_method', 'cbt') == self.method and record.get('target') == self.target)

    def _prepare(self, runner) -> None:
        if self._loader is None:
            self._loader = build_calibration_dataloader(runner.cfg, self.dataloader_cfg)
            self._class_names = check_calibration_data(self._loader, self._model(runner))

    # ------------------------------------------------------------------ hook points
    def before_train(self, runner) -> None:
        """Builds and checks the calibration data before the first iteration."""
        self._prepare(runner)
        print_log(
            f'[CBTCalibrationHook] calibration data: {len(self._loader.dataset)} images, '
            f'{len(self._class_names)} classes',
            logger='current')

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        self._loaded = (checkpoint.get('meta') or {}).get(META_KEY)

    def after_train_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
        if self._by_epoch(runner):
            return
        if self.is_last_train_iter(runner) or (self.interval > 0 and self.every_n_train_iters(runner, self.interval)):
            self._calibrate_deferring_errors(runner, self._state(runner, in_loop=True))

    def after_train_epoch(self, runner) -> None:
        if not self._by_epoch(runner):
            return
        if self.is_last_train_epoch(runner) or (self.interval > 0 and self.every_n_epochs(runner, self.interval)):
            self._calibrate_deferring_errors(runner, self._state(runner, in_loop=True))

    def before_train_iter(self, runner, batch_idx: int, data_batch=None) -> None:
        self._raise_pending()

    def before_train_epoch(self, runner) -> None:
        self._raise_pending()

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        """Records the calibration the model holds in the checkpoint's meta and writes the work-dir files."""
        if self._record is None:
            return
        checkpoint.setdefault('meta', {})[META_KEY] = dict(self._record)
        if not self._written:
            self._write(runner)

    def after_train(self, runner) -> None:
        self._raise_pending()
        state = self._state(runner, in_loop=False)
        if self._matches(self._record, state):
            if not self._written:  # no checkpoint was saved after the last calibration
                self._write(runner)
            return
        model = self._model(runner)
        if self._record is None and self._matches(self._loaded, state) and model.is_calibrated:
            # resumed at the end: the checkpoint already holds this calibration; the JSON is rebuilt from it
            self._prepare(runner)
            self._result = calibration_result_from_model(
                model, self._class_names, self.alpha, self.beta, extra_report=state, method=self.method)
            self._record, self._written = dict(self._loaded), False
            print_log(
                f'[CBTCalibrationHook] the checkpoint of iteration {state["iteration"]} already holds this '
                'calibration; nothing to recompute',
                logger='current')
            self._write(runner)
            return
        # the model was never calibrated in this state (resumed at the end with other settings or from an
        # uncalibrated checkpoint, or stopped early): calibrate it and save its checkpoint again
        self.calibrate(runner, state)
        if not self._save_checkpoint(runner, state):
            self._write(runner)

    # ------------------------------------------------------------------ work
    def calibrate(self, runner, state: Optional[Dict[str, int]] = None) -> CalibrationResult:
        """Gathers statistics, computes thresholds and stores them in the model (every rank must call it).

        The work-dir files are written with the next checkpoint (or at the end of training).

        Args:
            runner (Runner): The runner.
            state (dict, optional): ``iteration`` (and ``epoch``) of the model; default: the current one.

        Returns:
            CalibrationResult: Thresholds, statistics and report.
        """
        self._prepare(runner)
        state = dict(state or self._state(runner, in_loop=False))
        print_log(
            f'[CBTCalibrationHook] gathering class statistics at iteration {state["iteration"]} on '
            f'{len(self._loader)} batches per rank' + (f' (max {self.max_batches})' if self.max_batches else ''),
            logger='current')
        result = calibrate_and_report(
            self._model(runner),
            self._loader,
            self.alpha,
            self.beta,
            self.share_exits,
            self._class_names,
            self.max_batches,
            progress=self.progress,
            extra_report=state,
            method=self.method,
            target=self.target)
        self._result, self._written = result, False
        self._record = dict(
            state,
            alpha=self.alpha,
            beta=self.beta,
            share_exits=self.share_exits,
            method=result.report['method'],
            calibration_method=self.method,
            target=self.target)
        return result

    def _calibrate_deferring_errors(self, runner, state: Dict[str, int]) -> None:
        try:
            self.calibrate(runner, state)
        except Exception as e:  # raised after CheckpointHook has saved this iteration
            self._pending = e
            held = (f'the calibration of iteration {self._record["iteration"]}' if self._record else 'no calibration')
            print_log(f'[CBTCalibrationHook] calibration failed at iteration {state["iteration"]}: '
                      f'{type(e).__name__}: {e}. The checkpoint of this iteration is still written (holding {held}); '
                      'the error is raised after it',
                      logger='current',
                      level=40)  # logging.ERROR

    def _raise_pending(self) -> None:
        if self._pending is not None:
            error, self._pending = self._pending, None
            raise RuntimeError(f'CBTCalibrationHook: calibration failed ({type(error).__name__}: {error}); the '
                               'checkpoint of that iteration was written without it. Fix the cause and resume the '
                               'run, or calibrate the checkpoint with tools/calibrate.py') from error

    def _write(self, runner) -> None:
        if self._result is None:
            return
        json_file = osp.join(runner.work_dir, JSON_NAME)
        write_calibration_outputs(
            self._result,
            json_file,
            osp.join(runner.work_dir, PLOT_NAME) if self.plot else None,
            extra_report=dict(self._record or {}))
        self._written = True
        if is_main_process():
            print_log(f'[CBTCalibrationHook] wrote {json_file}', logger='current')

    def _save_checkpoint(self, runner, state: Dict[str, int]) -> bool:
        """Saves the checkpoint of the current state as CheckpointHook names it; an existing file (the one a finished
        run was resumed from) is replaced atomically. Returns False when the run has no CheckpointHook."""
        hook = next((h for h in runner.hooks if isinstance(h, CheckpointHook)), None)
        if hook is None or getattr(hook, 'out_dir', None) is None:
            return False
        step = state['epoch'] if hook.by_epoch and 'epoch' in state else state['iteration']
        meta = dict(epoch=runner.epoch, iter=runner.iter)
        filename = hook.filename_tmpl.format(step)
        path = osp.join(hook.out_dir, filename)
        if '://' in str(hook.out_dir) or not osp.isfile(path):
            hook._save_checkpoint_with_step(runner, step, meta)  # a new file: mmengine's own bookkeeping
        else:
            tmp_name = f'.{filename}.tmp'
            runner.save_checkpoint(
                hook.out_dir,
                tmp_name,
                save_optimizer=hook.save_optimizer,
                save_param_scheduler=hook.save_param_scheduler,
                meta=meta,
                by_epoch=hook.by_epoch,
                backend_args=hook.backend_args)
            if is_main_process():
                os.replace(osp.join(hook.out_dir, tmp_name), path)
        print_log(f'[CBTCalibrationHook] saved {path} with the new calibration', logger='current')
        return True
