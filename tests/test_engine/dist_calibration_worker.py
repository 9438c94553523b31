"""One rank of the two-process CBT calibration test (started by test_distributed_calibration.py, not by pytest).

Trains the tiny toy-city model for a few iterations through mmengine's Runner under DDP (gloo on CPU, plain BN,
``broadcast_buffers=False``) with :class:`CBTCalibrationHook` on, for each scenario in turn, and saves what the test
compares: this rank's BN buffers just before the hook calibrates, and its whole model state afterwards.

CPU-only torch and mmengine 0.10's pytorch launcher: the launcher would call ``torch.cuda.set_device`` and DDP would
get ``device_ids=[LOCAL_RANK]``. Here the process group is initialised first (so the Runner skips ``init_dist``)
and the wrapper is given ``device_ids=None``; nothing in the product is patched.
"""
import argparse
import datetime
import os
import os.path as osp
import sys

import torch
import torch.distributed as torch_dist

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))  # tests/, for utils
from utils import TOY_CONFIG, dist_scenario_cfg  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument('--rank', type=int, required=True)
    p.add_argument('--world-size', type=int, required=True)
    p.add_argument('--port', type=int, required=True)
    p.add_argument('--data-root', required=True)
    p.add_argument('--out', required=True)
    p.add_argument('--scenarios', nargs='+', required=True)
    args = p.parse_args()
    os.environ.update(
        RANK=str(args.rank),
        LOCAL_RANK=str(args.rank),
        WORLD_SIZE=str(args.world_size),
        MASTER_ADDR='127.0.0.1',
        MASTER_PORT=str(args.port))
    torch.set_num_threads(1)
    torch_dist.init_process_group(
        'gloo', rank=args.rank, world_size=args.world_size, timeout=datetime.timedelta(seconds=90))
    try:
        from mmengine.config import Config
        from mmengine.hooks import Hook
        from mmengine.runner import Runner

        from mmseg.registry import HOOKS
        from mmseg.utils import register_all_modules

        register_all_modules(init_default_scope=True)
        import mmseg_cbt  # noqa: F401

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
            runner = Runner.from_cfg(cfg)
            runner.train()
            state = {k: v.detach().cpu().clone() for k, v in runner.model.module.state_dict().items()}
            torch.save(state, osp.join(work_dir, f'final_rank{args.rank}.pth'))
            torch_dist.barrier()
    finally:
        # gloo's threads must not outlive the interpreter ("terminate called without an active exception")
        torch_dist.destroy_process_group()


if __name__ == '__main__':
    main()
