"""Class-aware initialisation of RH exits (weight = class mean, bias = -||mean||^2 / 2, mixed by alpha), its hook
with the backbone and final exit frozen, and the E2CM conversion hook at the end of training a plain model."""
import copy
import os.path as osp

import pytest
import torch
from utils import PLAIN_TOY_CONFIG, build_tiny_model, randomise_bn, shrink_run_cfg, tiny_run_cfg

from mmseg_cbt.calibration.calibrate import build_calibration_dataloader
from mmseg_cbt.calibration.class_aware_init import class_aware_init, classifier_inputs, init_classifier_from_means


def test_alpha_one_predicts_the_nearest_class_mean(toy_cfg, tiny_city, tmp_path):
    model = build_tiny_model(toy_cfg)
    randomise_bn(model)
    model.eval()
    loader = build_calibration_dataloader(tiny_run_cfg(toy_cfg, tiny_city, tmp_path))
    out = class_aware_init(model, loader, alpha=1.0, progress=False)
    assert out['exits'] == [1, 2, 3]
    data = model.data_preprocessor(next(iter(copy.deepcopy(loader))), False)
    with torch.no_grad():
        feats = classifier_inputs(model, data['inputs'], [0, 1, 2])
        for i, x in enumerate(feats):
            conv = model.exit_heads[i].conv_seg
            means = conv.weight[:, :, 0, 0]
            present = torch.ones(len(means), dtype=torch.bool)
            present[out['empty_classes'][i]] = False
            assert bool(present.any()) and not bool(present.all())  # the tiny set lacks some classes
            assert torch.allclose(conv.bias[present], -0.5 * means[present].square().sum(1), rtol=1e-5, atol=1e-6)
            assert bool((means[~present] == 0).all())
            assert float(conv.bias[~present].max()) < float(conv.bias[present].min())
            means = means[present]
            d2 = ((x[:, None] - means[None, :, :, None, None])**2).sum(2)
            logits = model.exit_heads[i].cls_seg(x)
            assert bool(present[logits.argmax(1)].all())  # a class without pixels never wins
            logits = logits[:, present]
            # argmin distance = argmax (M.x - ||M||^2/2), up to float ties
            picked = d2.gather(1, logits.argmax(1, keepdim=True))
            assert torch.allclose(picked, d2.min(1, keepdim=True).values, rtol=1e-4, atol=1e-4)


def test_alpha_mixes_with_the_current_initialisation():
    conv = torch.nn.Conv2d(3, 2, 1)
    w0, b0 = conv.weight.detach().clone(), conv.bias.detach().clone()
    means = torch.tensor([[1.0, 2.0, 2.0], [0.0, 0.0, 3.0]])
    with pytest.warns(UserWarning, match=r'classes \[1\] have no training pixels'):
        empty = init_classifier_from_means(conv, means, torch.tensor([5, 0]), alpha=0.6)
    assert empty == [1]
    assert torch.allclose(conv.weight[0, :, 0, 0], 0.6 * means[0] + 0.4 * w0[0, :, 0, 0])
    assert torch.allclose(conv.bias[0], 0.6 * -4.5 + 0.4 * b0[0])
    # no pixels: class-aware weight 0, bias b_min - 1 - |b_min| = -4.5 - 1 - 4.5
    assert torch.allclose(conv.weight[1], 0.4 * w0[1]) and torch.allclose(conv.bias[1], 0.6 * -10.0 + 0.4 * b0[1])
    with pytest.raises(ValueError, match=r'alpha must be in \[0, 1\]'):
        init_classifier_from_means(conv, means, torch.tensor([5, 1]), alpha=1.5)


def test_hooks_initialise_and_keep_the_trained_parts_fixed(toy_cfg, tiny_city, tmp_path):
    from mmengine.hooks import Hook
    from mmengine.runner import Runner

    from mmseg.registry import HOOKS
    seen = {}

    @HOOKS.register_module(force=True)
    class _SnapshotHook(Hook):
        priority = 'LOWEST'  # after the weights are initialised and the class-aware hook ran

        def before_train(self, runner):
            seen.update({k: v.detach().clone() for k, v in runner.model.state_dict().items()})

    cfg = tiny_run_cfg(toy_cfg, tiny_city, tmp_path / 'ft', max_iters=2)
    cfg.custom_hooks = [
        dict(type='EarlyExitFreezeHook', modules=['backbone', 'decode_head']),
        dict(type='ClassAwareInitHook', alpha=1.0, progress=False),
        dict(type='_SnapshotHook'),
    ]
    runner = Runner.from_cfg(cfg)
    runner.train()
    before, after = seen, runner.model.state_dict()
    w, b = before['exit_heads.1.conv_seg.weight'][:, :, 0, 0], before['exit_heads.1.conv_seg.bias']
    present = w.abs().sum(1) > 0
    assert bool(present.any())  # the hook ran before training: class-aware rows
    assert torch.allclose(b[present], -0.5 * w[present].square().sum(1), rtol=1e-5, atol=1e-6)
    for k in before:
        if k.startswith(('backbone.', 'decode_head.')):
            assert torch.equal(before[k], after[k]), k  # parameters and BN statistics
    assert not torch.equal(before['exit_heads.0.conv_seg.weight'], after['exit_heads.0.conv_seg.weight'])
    assert not torch.equal(before['exit_heads.0.down_convs.0.conv.weight'],
                           after['exit_heads.0.down_convs.0.conv.weight'])


def test_conversion_hook_writes_the_e2cm_model_of_the_trained_one(tiny_city, tmp_path):
    from mmengine.config import Config
    from mmengine.runner import Runner

    from mmseg.registry import MODELS

    from mmseg_cbt.utils.checkpoint import load_checkpoint_strict
    cfg = shrink_run_cfg(Config.fromfile(PLAIN_TOY_CONFIG), tiny_city, tmp_path / 'plain')
    cfg.custom_hooks = [dict(type='E2CMConversionHook', exits=[2, 3], progress=False)]
    runner = Runner.from_cfg(cfg)
    runner.train()
    out, out_cfg = osp.join(cfg.work_dir, 'e2cm.pth'), osp.join(cfg.work_dir, 'e2cm.py')
    new_cfg = Config.fromfile(out_cfg)
    model = MODELS.build(new_cfg.model)
    ckpt = load_checkpoint_strict(model, out, config=out_cfg)
    assert ckpt['meta']['e2cm']['stop_exits'] == [2, 3] and ckpt['meta']['e2cm']['iteration'] == 2
    model.eval()
    plain = runner.model.eval()
    x = torch.randn(1, 3, 64, 128)
    metas = [dict(img_shape=(64, 128))]
    with torch.no_grad():
        assert torch.equal(model.encode_decode(x, metas), plain.encode_decode(x, metas))
    assert all(int(h.class_counts.sum()) > 0 for h in model.exit_heads)
