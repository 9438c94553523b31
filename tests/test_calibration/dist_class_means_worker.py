"""One rank of the two-process class-mean test (started by test_distributed_class_means.py, not by pytest).

Builds the tiny toy-city model (each rank with other BN statistics: the gathering must take rank 0's), gathers the
class-mean statistics of the three early exit points over the first ``--images`` training images split over the
ranks without padding, and saves what every rank ends up with.
"""
import os.path as osp
import sys

import torch

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))  # tests/, for utils
import utils  # noqa: E402


def main() -> None:
    args = utils.start_rank(lambda p: p.add_argument('--images', type=int, nargs='+', required=True))
    try:
        from mmengine.config import Config

        from mmseg_cbt.calibration import backbone_exit_features, gather_class_feature_stats
        from mmseg_cbt.calibration.calibrate import build_calibration_dataloader

        toy_cfg = Config.fromfile(utils.TOY_CONFIG)
        model = utils.build_tiny_model(toy_cfg)
        utils.randomise_bn(model, seed=1 + args.rank)  # rank 0's statistics must win
        model.eval()
        for n in args.images:
            loader = build_calibration_dataloader(toy_cfg, utils.class_mean_loader_cfg(toy_cfg, args.data_root, n))
            stats = gather_class_feature_stats(
                model, loader, 3, lambda x: backbone_exit_features(model, x, [1, 2, 3]), progress=False)
            torch.save(
                dict(
                    sums=[stats.fixed_point_sums(p) for p in range(3)],
                    counts=stats.counts,
                    sq_norms=stats.sq_norms,
                    batches=len(loader)), osp.join(args.out, f'stats_{n}_rank{args.rank}.pth'))
    finally:
        utils.finish_rank()


if __name__ == '__main__':
    main()
