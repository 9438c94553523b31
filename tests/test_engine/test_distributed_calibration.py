"""CBT calibration under DDP with real processes: two CPU ranks (gloo) train through mmengine's Runner with plain BN
and the hook on; the checkpoint's statistics and thresholds must equal, bit for bit, a single-process
re-calibration of that checkpoint. Scenarios (tests/utils.py ``DIST_SCENARIOS``): 3 calibration images split 2/1,
and masked training with 1 calibration image, so that rank 1 receives no batch."""
import json
import os.path as osp

import torch
from utils import DIST_SCENARIOS, dist_scenario_cfg, run_ranks

WORKER = osp.join(osp.dirname(osp.abspath(__file__)), 'dist_calibration_worker.py')
WORLD_SIZE = 2
TIMEOUT_S = 110


def _recalibrate(toy_cfg, data_root, work_dir, scenario, ckpt_file):
    """The checkpoint re-calibrated in this (single, non-distributed) process over the same images."""
    from mmseg.registry import MODELS

    from mmseg_cbt.calibration.calibrate import build_calibration_dataloader, calibrate_and_report
    from mmseg_cbt.utils.checkpoint import load_checkpoint_strict
    cfg = dist_scenario_cfg(toy_cfg, data_root, work_dir, scenario)
    model = MODELS.build(cfg.model)
    load_checkpoint_strict(model, ckpt_file)
    hook = cfg.custom_hooks[0]
    loader = build_calibration_dataloader(cfg, hook['dataloader'])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks ran
    try:
        calibrate_and_report(model, loader, hook['alpha'], hook['beta'], progress=False)
    finally:
        torch.set_num_threads(threads)
    return model.state_dict()


def test_two_process_calibration_matches_single_process(toy_cfg, tiny_city, tmp_path):
    run_ranks(WORKER, ['--data-root', tiny_city, '--out',
                       str(tmp_path), '--scenarios', *DIST_SCENARIOS], WORLD_SIZE, TIMEOUT_S)
    for scenario in DIST_SCENARIOS:
        work = tmp_path / scenario
        pre = [torch.load(work / f'pre_rank{r}.pth') for r in range(WORLD_SIZE)]
        # the defect's precondition: before the hook, the ranks hold different BN statistics
        assert any(not torch.equal(pre[0][k], pre[1][k]) for k in pre[0]), scenario
        ckpt_file = str(work / 'iter_3.pth')
        ckpt = torch.load(ckpt_file, map_location='cpu', weights_only=False)
        saved = ckpt['state_dict']
        assert bool(saved['cbt_calibrated'])
        # after the hook every rank holds exactly the model the checkpoint holds
        for r in range(WORLD_SIZE):
            final = torch.load(work / f'final_rank{r}.pth')
            assert final.keys() == saved.keys()
            differ = [k for k in saved if not torch.equal(final[k], saved[k])]
            assert not differ, f'{scenario}: rank {r} differs from the checkpoint in {differ[:5]}'
        single = _recalibrate(toy_cfg, tiny_city, str(tmp_path / f'single_{scenario}'), scenario, ckpt_file)
        for key in ('cbt_class_counts', 'cbt_class_mean_probs', 'cbt_thresholds', 'cbt_range'):
            assert torch.equal(single[key], saved[key]), f'{scenario}: {key} differs from one process'
        # every labelled pixel of the calibration images counted once (not padded repeats)
        assert int(saved['cbt_class_counts'].sum()) <= DIST_SCENARIOS[scenario][0] * 64 * 128
        report = json.load(open(work / 'cbt_calibration.json'))
        assert report['iteration'] == ckpt['meta']['iter'] == 3
        assert [c['count'] for c in report['classes']] == saved['cbt_class_counts'].tolist()
