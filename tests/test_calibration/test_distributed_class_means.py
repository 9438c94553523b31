"""Class-mean statistics across two real processes (gloo on CPU) equal one pass, bit for bit: 3 images split 2/1,
and 1 image, so that rank 1 receives no batch and takes the widths from rank 0."""
import os.path as osp

import torch
from utils import build_tiny_model, class_mean_loader_cfg, randomise_bn, run_ranks

WORKER = osp.join(osp.dirname(osp.abspath(__file__)), 'dist_class_means_worker.py')
IMAGES = (3, 1)


def test_two_processes_equal_one_pass(toy_cfg, tiny_city, tmp_path):
    from mmseg_cbt.calibration import backbone_exit_features, gather_class_feature_stats
    from mmseg_cbt.calibration.calibrate import build_calibration_dataloader
    run_ranks(WORKER, ['--data-root', tiny_city, '--out', str(tmp_path), '--images', *map(str, IMAGES)])
    model = build_tiny_model(toy_cfg)
    randomise_bn(model, seed=1)  # rank 0's model
    model.eval()
    for n in IMAGES:
        ranks = [torch.load(tmp_path / f'stats_{n}_rank{r}.pth') for r in range(2)]
        assert [r['batches'] for r in ranks] == ([2, 1] if n == 3 else [1, 0])
        loader = build_calibration_dataloader(toy_cfg, class_mean_loader_cfg(toy_cfg, tiny_city, n))
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # as the ranks ran
        try:
            one = gather_class_feature_stats(
                model, loader, 3, lambda x: backbone_exit_features(model, x, [1, 2, 3]), progress=False)
        finally:
            torch.set_num_threads(threads)
        for r, got in enumerate(ranks):
            for p in range(3):
                assert torch.equal(got['sums'][p], one.fixed_point_sums(p)), (n, r, p)
            assert torch.equal(got['counts'], one.counts), (n, r)
            assert torch.allclose(got['sq_norms'], one.sq_norms, rtol=1e-9, atol=0), (n, r)
        assert int(one.counts[0].sum()) > 0
