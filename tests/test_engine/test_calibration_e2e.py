"""CBT calibration end to end: statistics gathering, the hook inside mmseg's runner, checkpoints, the tool."""
import copy
import json
import os.path as osp
import sys

import pytest
import torch

from utils import ROOT, build_tiny_model, tiny_run_cfg


def _loader(cfg, indices=None):
    from mmengine.dataset import pseudo_collate
    from torch.utils.data import DataLoader, Subset

    from mmseg_cbt.calibration.calibrate import build_calibration_dataloader
    full = build_calibration_dataloader(cfg)
    if indices is None:
        return full
    return DataLoader(Subset(full.dataset, indices), batch_size=1, collate_fn=pseudo_collate)


def test_gather_two_ranks_equal_single_pass(toy_cfg, tiny_city, tmp_path):
    """Statistics over the data split in two parts and summed equal the single pass, bit for bit."""
    from mmseg_cbt.calibration.calibrate import gather_class_prob_stats
    cfg = tiny_run_cfg(toy_cfg, tiny_city, tmp_path)
    model = build_tiny_model(toy_cfg)
    full = gather_class_prob_stats(model, _loader(cfg), progress=False)
    a = gather_class_prob_stats(model, _loader(cfg, [0, 2]), progress=False)
    b = gather_class_prob_stats(model, _loader(cfg, [3, 1]), progress=False)
    merged = a.merge(b)
    assert torch.equal(merged.fixed_point_sums, full.fixed_point_sums)
    assert torch.equal(merged.counts, full.counts)
    assert torch.equal(merged.class_mean_probs(), full.class_mean_probs())
    # every labelled pixel of the 4 training images is counted once (64x128 labels, ignore excluded)
    assert int(full.counts.sum()) > 0.8 * 4 * 64 * 128
    assert model.training  # the training mode is restored


def test_gather_errors(toy_cfg, tiny_city, tmp_path):
    from mmseg_cbt.calibration.calibrate import gather_class_prob_stats
    model = build_tiny_model(toy_cfg)
    with pytest.raises(ValueError, match='empty'):
        gather_class_prob_stats(model, [], progress=False)
    with pytest.raises(TypeError, match='not an early-exit segmentor'):
        gather_class_prob_stats(torch.nn.Linear(2, 2), [], progress=False)


def test_hook_in_runner_then_test_with_stop_masks(toy_cfg, tiny_city, tmp_path):
    """Train with the hook through mmengine's Runner: the saved checkpoint holds the thresholds and testing it with
    exit_mode='cbt' uses them (per-exit mIoU reported)."""
    from mmengine.runner import Runner
    cfg = tiny_run_cfg(toy_cfg, tiny_city, tmp_path / 'train')
    runner = Runner.from_cfg(cfg)
    runner.train()
    ckpt = torch.load(tmp_path / 'train' / 'iter_2.pth', map_location='cpu', weights_only=False)
    sd = ckpt['state_dict']
    assert bool(sd['cbt_calibrated'])
    report = json.load(open(tmp_path / 'train' / 'cbt_calibration.json'))
    thr = torch.tensor([c['threshold'] for c in report['classes']])
    assert torch.equal(sd['cbt_thresholds'], thr.expand(4, 19).float())
    assert float(thr.min()) == pytest.approx(0.9) and float(thr.max()) == pytest.approx(0.998)
    assert osp.getsize(tmp_path / 'train' / 'cbt_thresholds.png') > 1000
    assert int(sd['cbt_class_counts'].sum()) == sum(c['count'] for c in report['classes'])

    test_cfg = copy.deepcopy(cfg)
    test_cfg.work_dir = str(tmp_path / 'test')
    test_cfg.load_from = str(tmp_path / 'train' / 'iter_2.pth')
    test_cfg.model.test_cfg.exit_mode = 'cbt'
    test_cfg.custom_hooks = []
    metrics = Runner.from_cfg(test_cfg).test()
    for n in range(1, 5):
        assert f'exit{n}.mIoU' in metrics
    assert metrics['mIoU'] == metrics['exit4.mIoU']


def test_calibrate_tool_never_overwrites_and_remaps(toy_cfg, tiny_city, tmp_path):
    """tools/calibrate.py: new file written, input untouched; --from-stats re-maps without data; errors."""
    from mmengine.runner import Runner

    from mmseg_cbt.calibration.thresholds import cbt_thresholds
    cfg = tiny_run_cfg(toy_cfg, tiny_city, tmp_path / 'train')
    cfg.custom_hooks = []
    Runner.from_cfg(cfg).train()
    src = str(tmp_path / 'train' / 'iter_2.pth')
    cfg_file = str(tmp_path / 'cfg.py')
    cfg.dump(cfg_file)
    before = open(src, 'rb').read()
    sys.path.insert(0, osp.join(ROOT, 'tools'))
    import calibrate
    out = calibrate.main([cfg_file, src, '--alpha', '0.9', '--beta', '0.998', '--out', str(tmp_path / 'c.pth')])
    assert open(src, 'rb').read() == before
    sd = torch.load(out, map_location='cpu', weights_only=False)['state_dict']
    assert bool(sd['cbt_calibrated'])
    # re-map the stored statistics into another range: identical to the pure function on those statistics
    out2 = calibrate.main([cfg_file, out, '--alpha', '0.95', '--beta', '0.99', '--from-stats', '--no-share',
                           '--no-plot'])
    sd2 = torch.load(out2, map_location='cpu', weights_only=False)['state_dict']
    want = cbt_thresholds(sd['cbt_class_mean_probs'], 0.95, 0.99, share_exits=False, counts=sd['cbt_class_counts'])
    assert torch.equal(sd2['cbt_thresholds'], want)
    assert not bool(sd2['cbt_share_exits'])
    with pytest.raises(ValueError, match='alpha'):
        calibrate.main([cfg_file, src, '--alpha', '0.99', '--beta', '0.9'])
    with pytest.raises(ValueError, match='never overwritten'):
        calibrate.main([cfg_file, out, '--alpha', '0.9', '--beta', '0.998', '--from-stats', '--out', out])
    with pytest.raises(RuntimeError, match='no calibration statistics'):
        calibrate.main([cfg_file, src, '--alpha', '0.9', '--beta', '0.998', '--from-stats'])


def test_resume_through_mmengine_runner(toy_cfg, tiny_city, tmp_path):
    """mmengine 0.10 + torch >= 2.6: a run resumes from its own checkpoint (safe globals registered by
    mmseg_cbt), continues the iteration count and recalibrates at its new end."""
    from mmengine.runner import Runner
    cfg = tiny_run_cfg(toy_cfg, tiny_city, tmp_path / 'run')
    Runner.from_cfg(copy.deepcopy(cfg)).train()
    cfg.resume = True
    cfg.train_cfg.max_iters = 4
    cfg.train_cfg.val_interval = 4
    cfg.default_hooks.checkpoint.interval = 2
    cfg.param_scheduler = [dict(type='ConstantLR', factor=1.0, by_epoch=False, begin=0, end=4)]
    runner = Runner.from_cfg(cfg)
    runner.train()
    assert runner.iter == 4
    ckpt = torch.load(tmp_path / 'run' / 'iter_4.pth', map_location='cpu', weights_only=False)
    assert ckpt['meta']['iter'] == 4 and bool(ckpt['state_dict']['cbt_calibrated'])
    assert json.load(open(tmp_path / 'run' / 'cbt_calibration.json'))['iteration'] == 4
