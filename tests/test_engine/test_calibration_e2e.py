"""CBT calibration end to end: statistics gathering against a hand computation, the hook inside mmseg's runner
(checkpoints, failures, resume), and the model's stop masks against the thresholds of each exit."""
import copy
import json
import os
import os.path as osp

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from utils import build_tiny_model, randomise_bn, tiny_run_cfg


def _loader(cfg, indices=None):
    from mmengine.dataset import pseudo_collate
    from torch.utils.data import DataLoader, Subset

    from mmseg_cbt.calibration.calibrate import build_calibration_dataloader
    full = build_calibration_dataloader(cfg)
    if indices is None:
        return full
    return DataLoader(Subset(full.dataset, indices), batch_size=1, collate_fn=pseudo_collate)


def _reference_statistics(model, dataset):
    """Per exit and class the float64 mean softmax and the pixel counts, computed directly: the labels read from
    the PNG files, the exits' dense logits resized bilinearly to the label size, softmax, boolean selection."""
    k_classes = model.num_classes
    sums = torch.zeros(model.num_exits, k_classes, k_classes, dtype=torch.float64)
    counts = torch.zeros(k_classes, dtype=torch.int64)
    for i in range(len(dataset)):
        label = torch.from_numpy(np.array(Image.open(dataset.get_data_info(i)['seg_map_path']))).long()
        batch = model.data_preprocessor(dict(inputs=[dataset[i]['inputs']], data_samples=None), False)
        assert tuple(batch['inputs'].shape[2:]) == tuple(label.shape)  # the test pipeline keeps the label size
        with torch.no_grad():
            exits = model.exit_logits(batch['inputs'], exit_mode='dense')
        for n, logits in enumerate(exits):
            probs = F.interpolate(logits, size=tuple(label.shape), mode='bilinear', align_corners=False)[0]
            probs = probs.double().softmax(dim=0)  # (K, H, W)
            for k in range(k_classes):
                sums[n, k] += probs[:, label == k].sum(dim=1)
        counts += torch.bincount(label[label < k_classes].flatten(), minlength=k_classes)
    return sums / counts.clamp(min=1).view(1, -1, 1).double(), counts


def test_gather_matches_hand_computed_statistics(toy_cfg, tiny_city, tmp_path):
    """Gathered statistics equal an independent computation: pixel counts exactly (every labelled pixel once), the
    mean softmax of every exit within the fixed-point resolution (so reversed or shifted exits fail); a split of
    the data over two 'ranks' merges to the same bits."""
    from mmseg_cbt.calibration.calibrate import gather_class_prob_stats
    cfg = tiny_run_cfg(toy_cfg, tiny_city, tmp_path)
    model = build_tiny_model(toy_cfg)
    randomise_bn(model)
    loader = _loader(cfg)
    full = gather_class_prob_stats(model, loader, progress=False)
    ref_means, ref_counts = _reference_statistics(model.eval(), loader.dataset)
    model.train()
    assert torch.equal(full.counts, ref_counts)
    assert int(ref_counts.sum()) > 0.5 * 4 * 64 * 128 and int((ref_counts > 0).sum()) >= 5
    means = full.class_mean_probs()
    present = ref_counts > 0
    assert (means[:, present] - ref_means[:, present]).abs().max() < 1e-6
    # the exits differ from each other by far more than that: an exit mix-up cannot pass
    assert (ref_means[0, present] - ref_means[-1, present]).abs().max() > 1e-3
    a = gather_class_prob_stats(model, _loader(cfg, [0, 2]), progress=False)
    b = gather_class_prob_stats(model, _loader(cfg, [3, 1]), progress=False)
    merged = a.merge(b)
    assert torch.equal(merged.fixed_point_sums, full.fixed_point_sums)
    assert torch.equal(merged.counts, full.counts)
    assert model.training  # the training mode is restored


def test_gather_errors(toy_cfg, tiny_city, tmp_path):
    from mmseg_cbt.calibration.calibrate import gather_class_prob_stats
    model = build_tiny_model(toy_cfg)
    with pytest.raises(ValueError, match='empty'):
        gather_class_prob_stats(model, [], progress=False)
    with pytest.raises(TypeError, match='not an early-exit segmentor'):
        gather_class_prob_stats(torch.nn.Linear(2, 2), [], progress=False)
    with pytest.raises(ValueError, match='max_batches'):
        gather_class_prob_stats(model, [1], max_batches=0, progress=False)


def test_cbt_stop_masks_follow_each_exits_thresholds(toy_cfg):
    """Pixel by pixel: after exit n a pixel stops iff it was active and some class k has softmax_k > T[n, k] for
    the thresholds of exit n itself (CBT-ns, a different vector per exit, chosen so that every exit stops some
    pixels and keeps others, and so that the next exit's thresholds would give another mask)."""
    from utils import demo_batch
    model = build_tiny_model(toy_cfg, exit_mode='cbt', feature_mask='simulate', fill='copy')
    randomise_bn(model)
    model.eval()
    imgs, _ = demo_batch(model.num_classes, n=2, h=64, w=128)
    n_exits, k_classes = model.num_exits, model.num_classes
    with torch.no_grad():
        dense = [lg.softmax(1) for lg in model.exit_logits(imgs, exit_mode='dense')]
    thr = torch.ones(n_exits, k_classes)
    for n in range(n_exits - 1):
        # per class, the median of its own probability where it is the argmax: about half of those pixels stop
        probs, top = dense[n], dense[n].argmax(1)
        for k in range(k_classes):
            if bool((top == k).any()):
                thr[n, k] = probs[:, k][top == k].median()
    model.set_cbt_calibration(thr, 0.5, 1.0)
    with torch.no_grad():
        logits, actives = model.forward_exits(imgs, return_active=True)
    assert actives[0] is None
    active = torch.ones(imgs.shape[0], *logits[0].shape[2:], dtype=torch.bool)
    for n in range(n_exits - 1):
        probs = logits[n].softmax(1)
        stop = (probs > thr[n].view(1, -1, 1, 1)).any(1)
        expected = active & ~stop
        assert torch.equal(actives[n + 1], expected), f'stop mask after exit {n + 1}'
        assert 0 < int((active & stop).sum()) < int(active.sum())  # some active pixels stop, some go on
        other = active & ~(probs > thr[n + 1].view(1, -1, 1, 1)).any(1)
        assert not torch.equal(other, expected)  # the next exit's thresholds would be caught
        # a stopped pixel keeps the logits of the exit where it stopped (copy aggregation)
        gone = active & stop
        assert torch.equal(logits[n + 1].permute(0, 2, 3, 1)[gone], logits[n].permute(0, 2, 3, 1)[gone])
        active = expected


def test_hook_in_runner_then_test_with_stop_masks(toy_cfg, tiny_city, tmp_path):
    """Train with the hook through mmengine's Runner: the saved checkpoint holds the thresholds and records them
    in its meta, the JSON states the same thresholds and the checkpoint's iteration, and testing the checkpoint
    with exit_mode='cbt' uses them (per-exit mIoU reported)."""
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
    assert report['iteration'] == ckpt['meta']['iter'] == 2
    assert ckpt['meta']['cbt_calibration'] == dict(
        iteration=2, alpha=0.9, beta=0.998, share_exits=True, method='CBT', calibration_method='cbt', target=None)
    assert sorted(report['outputs']) == ['cbt_calibration.json', 'cbt_thresholds.png']
    assert osp.getsize(tmp_path / 'train' / 'cbt_thresholds.png') > 1000
    assert sd['cbt_class_counts'].tolist() == [c['count'] for c in report['classes']]

    test_cfg = copy.deepcopy(cfg)
    test_cfg.work_dir = str(tmp_path / 'test')
    test_cfg.load_from = str(tmp_path / 'train' / 'iter_2.pth')
    test_cfg.model.test_cfg.exit_mode = 'cbt'
    test_cfg.model.test_cfg.feature_mask = 'simulate'
    test_cfg.custom_hooks = []
    metrics = Runner.from_cfg(test_cfg).test()
    for n in range(1, 5):
        assert f'exit{n}.mIoU' in metrics
    assert metrics['mIoU'] == metrics['exit4.mIoU']


@pytest.mark.parametrize('kw, match', [
    (dict(method='cbt-precision', alpha=0.4, beta=0.99), r'alpha must be in \[0.5, 1\]'),
    (dict(method='cbt-precision', target=1.5, alpha=0.5, beta=0.99), r'target precision must be in \(0, 1\]'),
    (dict(method='cbt', target=0.9), 'only used with'),
    (dict(method='minmax'), 'method must be one of'),
])
def test_hook_method_options_checked_at_build(kw, match):
    from mmseg_cbt.engine.hooks import CBTCalibrationHook
    with pytest.raises(ValueError, match=match):
        CBTCalibrationHook(**kw)
    hook = CBTCalibrationHook(method='cbt-precision', alpha=0.5, beta=0.999)
    assert hook.target == 0.99  # the documented default
    record = dict(iteration=2, alpha=0.5, beta=0.999, share_exits=True, calibration_method='cbt', target=None)
    assert not hook._matches(record, dict(iteration=2))  # a CBT calibration is not this hook's: recalibrate
    record.update(calibration_method='cbt-precision', target=0.99)
    assert hook._matches(record, dict(iteration=2))


def test_empty_calibration_data_fails_before_training(toy_cfg, tiny_city, tmp_path):
    """A calibration dataloader on an empty folder is an error in before_train: no iteration runs."""
    from mmengine.runner import Runner
    empty = tmp_path / 'empty'
    (empty / 'leftImg8bit' / 'train').mkdir(parents=True)
    (empty / 'gtFine' / 'train').mkdir(parents=True)
    cfg = tiny_run_cfg(toy_cfg, tiny_city, tmp_path / 'run')
    loader = copy.deepcopy(cfg.test_dataloader)
    loader.dataset.data_root = str(empty)
    loader.dataset.data_prefix = dict(img_path='leftImg8bit/train', seg_map_path='gtFine/train')
    cfg.custom_hooks[0]['dataloader'] = loader
    runner = Runner.from_cfg(cfg)
    with pytest.raises(ValueError, match='calibration dataset is empty'):
        runner.train()
    assert runner.iter == 0


def test_calibration_failure_keeps_last_checkpoint(toy_cfg, tiny_city, tmp_path, monkeypatch):
    """A calibration that fails at the last iteration is raised only after that iteration's checkpoint is written
    (uncalibrated, with no stale JSON)."""
    from mmengine.runner import Runner

    from mmseg_cbt.engine.hooks import cbt_calibration_hook as hook_module

    def broken(*args, **kwargs):
        raise RuntimeError('disk full while gathering')

    monkeypatch.setattr(hook_module, 'calibrate_and_report', broken)
    cfg = tiny_run_cfg(toy_cfg, tiny_city, tmp_path / 'run')
    with pytest.raises(RuntimeError, match='calibration failed.*disk full'):
        Runner.from_cfg(cfg).train()
    sd = torch.load(tmp_path / 'run' / 'iter_2.pth', map_location='cpu', weights_only=False)['state_dict']
    assert not bool(sd['cbt_calibrated'])
    assert not osp.exists(tmp_path / 'run' / 'cbt_calibration.json')


def test_resume_through_mmengine_runner(toy_cfg, tiny_city, tmp_path):
    """mmengine 0.10 + torch >= 2.6: a run resumes from its own checkpoint (safe globals registered by
    mmseg_cbt), continues the iteration count and recalibrates at its new end; buffers equal the JSON."""
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
    report = json.load(open(tmp_path / 'run' / 'cbt_calibration.json'))
    assert report['iteration'] == 4 == ckpt['meta']['cbt_calibration']['iteration']
    assert ckpt['state_dict']['cbt_class_counts'].tolist() == [c['count'] for c in report['classes']]
    assert torch.equal(ckpt['state_dict']['cbt_thresholds'][0],
                       torch.tensor([c['threshold'] for c in report['classes']]))


def test_resume_finished_run_json_matches_checkpoint(toy_cfg, tiny_city, tmp_path):
    """Resuming a finished run: with the same settings nothing is recomputed and the checkpoint is untouched (the
    JSON keeps the checkpoint's iteration, not one more); with another alpha the run recalibrates and saves that
    iteration's checkpoint again, so JSON and checkpoint agree."""
    from mmengine.runner import Runner
    work = tmp_path / 'run'
    cfg = tiny_run_cfg(toy_cfg, tiny_city, work)
    Runner.from_cfg(copy.deepcopy(cfg)).train()
    before = (work / 'iter_2.pth').read_bytes()
    cfg.resume = True
    Runner.from_cfg(copy.deepcopy(cfg)).train()
    assert (work / 'iter_2.pth').read_bytes() == before
    assert json.load(open(work / 'cbt_calibration.json'))['iteration'] == 2

    cfg.custom_hooks = [dict(type='CBTCalibrationHook', alpha=0.95, beta=0.998, progress=False)]
    Runner.from_cfg(copy.deepcopy(cfg)).train()
    ckpt = torch.load(work / 'iter_2.pth', map_location='cpu', weights_only=False)
    report = json.load(open(work / 'cbt_calibration.json'))
    assert report['alpha'] == 0.95 and report['iteration'] == 2 and ckpt['meta']['iter'] == 2
    assert ckpt['meta']['cbt_calibration']['alpha'] == 0.95
    thr = torch.tensor([c['threshold'] for c in report['classes']])
    assert torch.equal(ckpt['state_dict']['cbt_thresholds'][0], thr)
    assert float(thr.min()) == pytest.approx(0.95)
    assert not [f for f in os.listdir(work) if f.startswith('.')]  # no temporary file left
