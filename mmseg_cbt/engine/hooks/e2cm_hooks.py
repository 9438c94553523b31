"""Hooks around class means: E2CM conversion at the end of training, class-aware exit initialisation before it,
and freezing the trained parts while exits are fine-tuned."""
import os.path as osp
from typing import Optional, Sequence, Union

from mmengine.hooks import Hook
from mmengine.logging import print_log
from mmengine.model import is_model_wrapper

from mmseg.registry import HOOKS

__all__ = ['E2CMConversionHook', 'ClassAwareInitHook', 'EarlyExitFreezeHook']


def _unwrap(model):
    return model.module if is_model_wrapper(model) else model


@HOOKS.register_module()
class E2CMConversionHook(Hook):
    """At the end of training a plain mmseg segmentor, also writes its E2CM early-exit version (class-mean exits,
    no training) as ``<work_dir>/<name>.pth`` and ``<work_dir>/<name>.py``, exactly as ``tools/e2cm.py`` would
    from the final checkpoint (:func:`~mmseg_cbt.calibration.e2cm.convert_plain_segmentor`: one pass over the
    training split read with the test pipeline). The trained model itself is not changed. The config is checked
    in ``before_train``, so an unsupported model fails before the first iteration.

    Args:
        exits (Sequence[int], optional): Stages whose exits may stop pixels (default: all early stages).
        temperature (str | float): ``'fit'`` or a number > 0.
        max_batches (int, optional): Bound on the batches read per rank.
        name (str): Base name of the two files.
        progress (bool): Progress bar.
    """

    priority = 'LOW'

    def __init__(self,
                 exits: Optional[Sequence[int]] = None,
                 temperature: Union[str, float] = 'fit',
                 max_batches: Optional[int] = None,
                 name: str = 'e2cm',
                 progress: bool = True) -> None:
        if temperature != 'fit' and not (isinstance(temperature, (int, float)) and 0 < temperature < float('inf')):
            raise ValueError(f'E2CMConversionHook: temperature must be "fit" or a finite number > 0, '
                             f'got {temperature!r}')
        if max_batches is not None and (not isinstance(max_batches, int) or max_batches < 1):
            raise ValueError(f'E2CMConversionHook: max_batches must be an integer >= 1 or None, got {max_batches!r}')
        self.exits = exits
        self.temperature = temperature
        self.max_batches = max_batches
        self.name = str(name)
        self.progress = progress

    def before_train(self, runner) -> None:
        from mmseg_cbt.calibration.e2cm import check_plain_segmentor_cfg, e2cm_config
        check_plain_segmentor_cfg(runner.cfg.model, where='E2CMConversionHook')
        e2cm_config(runner.cfg, self.exits)  # the exits are checked here, not after training

    def after_train(self, runner) -> None:
        from mmseg_cbt.calibration.calibrate import build_calibration_dataloader
        from mmseg_cbt.calibration.e2cm import convert_plain_segmentor, save_e2cm
        plain = _unwrap(runner.model)
        loader = build_calibration_dataloader(runner.cfg)
        state = {k: v.detach().clone() for k, v in plain.state_dict().items()}
        model, new_cfg, record = convert_plain_segmentor(
            runner.cfg,
            state,
            loader,
            self.exits,
            self.temperature,
            self.max_batches,
            progress=self.progress,
            source='the trained model',
            device=next(plain.parameters()).device)
        record.update(iteration=runner.iter, epoch=runner.epoch)
        out = osp.join(runner.work_dir, self.name + '.pth')
        out_cfg = osp.join(runner.work_dir, self.name + '.py')
        save_e2cm(model, new_cfg, dict(dataset_meta=dict(classes=tuple(record['classes'])), e2cm=record), out, out_cfg)
        print_log(
            f'[E2CMConversionHook] E2CM model of iteration {runner.iter}: {out} ({out_cfg}); one pass of '
            f'{record["seconds"]:.1f} s',
            logger='current')


@HOOKS.register_module()
class ClassAwareInitHook(Hook):
    """Initialises the classifiers of the early exits from the class means of their inputs before the first
    iteration (after ``load_from``), :func:`~mmseg_cbt.calibration.class_aware_init.class_aware_init`: weight
    ``alpha x M_k + (1 - alpha) x default``, bias ``alpha x (-||M_k||^2 / 2) + (1 - alpha) x default``. A resumed
    run (iteration > 0) is left alone.

    Args:
        alpha (float): Weight of the class-aware values, in [0, 1].
        exits (Sequence[int], optional): 1-based early exits (default: every one with a trainable classifier).
        dataloader (dict, optional): Data config; default: the training split with the test pipeline.
        max_batches (int, optional): Bound on the batches read per rank.
        progress (bool): Progress bar.
    """

    priority = 'VERY_HIGH'

    def __init__(self,
                 alpha: float = 1.0,
                 exits: Optional[Sequence[int]] = None,
                 dataloader: Optional[dict] = None,
                 max_batches: Optional[int] = None,
                 progress: bool = True) -> None:
        if not isinstance(alpha, (int, float)) or not 0.0 <= float(alpha) <= 1.0:
            raise ValueError(f'ClassAwareInitHook: alpha must be in [0, 1], got {alpha!r}')
        self.alpha = float(alpha)
        self.exits = exits
        self.dataloader = dataloader
        self.max_batches = max_batches
        self.progress = progress

    def before_train(self, runner) -> None:
        if runner.iter > 0:
            return
        from mmseg_cbt.calibration.calibrate import build_calibration_dataloader
        from mmseg_cbt.calibration.class_aware_init import class_aware_init
        loader = build_calibration_dataloader(runner.cfg, self.dataloader)
        out = class_aware_init(
            runner.model, loader, self.alpha, self.exits, max_batches=self.max_batches, progress=self.progress)
        print_log(
            f'[ClassAwareInitHook] classifiers of exits {out["exits"]} initialised from class means '
            f'(alpha={self.alpha})',
            logger='current')


@HOOKS.register_module()
class EarlyExitFreezeHook(Hook):
    """Keeps sub-modules of the model fixed while the rest trains (e.g. the backbone and the final exit while
    early exits are fine-tuned): their parameters get ``requires_grad=False`` before training and they are put in
    eval mode (BN statistics fixed) before every iteration.

    Under DDP the wrapper must be built with ``find_unused_parameters=True`` (the frozen parameters were registered
    with it before this hook ran); this is checked before the first iteration.

    Args:
        modules (Sequence[str]): Attribute paths of the modules, e.g. ``('backbone', 'decode_head')``.
    """

    priority = 'VERY_HIGH'

    def __init__(self, modules: Sequence[str] = ('backbone', 'decode_head')) -> None:
        if isinstance(modules, str) or not modules:
            raise ValueError(f'EarlyExitFreezeHook: modules must be a non-empty list of names, got {modules!r}')
        self.modules = list(modules)

    def _frozen(self, runner):
        model = _unwrap(runner.model)
        out = []
        for name in self.modules:
            try:
                out.append(model.get_submodule(name))
            except AttributeError:
                raise ValueError(f'EarlyExitFreezeHook: the model has no sub-module {name!r}') from None
        return out

    def before_train(self, runner) -> None:
        wrapped = runner.model
        if is_model_wrapper(wrapped) and hasattr(wrapped, 'find_unused_parameters') and \
                not wrapped.find_unused_parameters:
            raise ValueError('EarlyExitFreezeHook under DDP needs model_wrapper_cfg=dict(type='
                             '"MMDistributedDataParallel", find_unused_parameters=True)')
        for module in self._frozen(runner):
            for p in module.parameters():
                p.requires_grad_(False)

    def before_train_iter(self, runner, batch_idx: int, data_batch=None) -> None:
        for module in self._frozen(runner):
            module.eval()
