"""One rank of the two-process CBT calibration test (started by test_distributed_calibration.py, not by pytest).

Trains the tiny toy-city model for a few iterations through mmengine's Runner under DDP (gloo on CPU, plain BN,
``broadcast_buffers=False``) with :class:`CBTCalibrationHook` on, for each scenario in turn, and saves what the test
compares: this rank's BN buffers just before the hook calibrates, and its whole model state afterwards.

CPU-only torch and mmengine 0.10's pytorch launcher: the launcher would call ``torch.cuda.set_device`` and DDP would
get ``device_ids=[LOCAL_RANK]``. Here the process group is initialised first (so the Runner skips ``init_dist``)
and the wrapper is given ``device_ids=None``; nothing in the product is patched.
"""
import os.path as osp
import sys

import torch
import torch.distributed as torch_dist

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))  # tests/, for utils
from utils import TOY_CONFIG, dist_scenario_cfg, finish_rank, start_rank  # noqa: E402


def _train(runner, out_file: str) -> None:
    """Trains and saves the final state (the runner, whose DDP wrapper holds the process group, dies here)."""
    runner.train()
    torch.save({k: v.detach().cpu().clone() for k, v in runner.model.module.state_dict().items()}, out_file)


def main() -> None:
    args = start_rank(lambda p: p.add_argument('--scenarios', nargs='+', required=True))
    try:
        from mmengine.config import Config
        from mmengine.hooks import Hook
        from mmengine.runner import Runner

        from mmseg.registry import HOOKS

        @HOOKS.register_module(force=True)
        class BNProbeHook(Hook):
            """Saves this rank's BN running statistics where the calibration hook is about to run."""
            priority = 'NORMAL'  # before CBTCalibrationHook (LOW) at the same point

            def __init__(self, out_file: str) -> None:
                self.out_file = out_file

            def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None) -> None:
                if self.is_last_train_iter(runner):
                    model = runner.model.module
                    torch.save({k: v.clone() for k, v in model.named_buffers() if 'running_' in k}, self.out_file)

        toy_cfg = Config.fromfile(TOY_CONFIG)
        for scenario in args.scenarios:
            work_dir = osp.join(args.out, scenario)
            cfg = dist_scenario_cfg(toy_cfg, args.data_root, work_dir, scenario)
            cfg.launcher = 'pytorch'
            cfg.model_wrapper_cfg = dict(type='MMDistributedDataParallel', device_ids=None, broadcast_buffers=False)
            cfg.custom_hooks.append(dict(type='BNProbeHook', out_file=osp.join(work_dir, f'pre_rank{args.rank}.pth')))
            _train(Runner.from_cfg(cfg), osp.join(work_dir, f'final_rank{args.rank}.pth'))
            torch_dist.barrier()
    finally:
        finish_rank()


if __name__ == '__main__':
    main()
