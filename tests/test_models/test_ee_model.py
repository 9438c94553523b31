"""Early-exit HRNet backbone, RH exits, the early-exit segmentor and the per-exit metric."""
import copy
import glob
import os.path as osp

import pytest
import torch
from mmengine.optim import OptimWrapper
from utils import ROOT, build_tiny_model, demo_batch, randomise_bn

HR_EXTRA = dict(
    stage1=dict(num_modules=1, num_branches=1, block='BOTTLENECK', num_blocks=(2, ), num_channels=(16, )),
    stage2=dict(num_modules=1, num_branches=2, block='BASIC', num_blocks=(1, 2), num_channels=(8, 16)),
    stage3=dict(num_modules=2, num_branches=3, block='BASIC', num_blocks=(1, 1, 2), num_channels=(8, 16, 24)),
    stage4=dict(num_modules=2, num_branches=4, block='BASIC', num_blocks=(1, 1, 1, 1), num_channels=(8, 16, 24, 32)))


def test_backbone_matches_mmseg_hrnet_exactly():
    from mmseg.models.backbones import HRNet

    from mmseg_cbt.models import EarlyExitHRNet
    torch.manual_seed(0)
    ref = HRNet(copy.deepcopy(HR_EXTRA))
    ref.init_weights()
    randomise_bn(ref)
    ee = EarlyExitHRNet(copy.deepcopy(HR_EXTRA))
    # a stock HRNet state dict loads strictly: the module tree is identical
    ee.load_state_dict(ref.state_dict(), strict=True)
    assert set(ee.state_dict()) == set(ref.state_dict())
    ref.eval(), ee.eval()
    x = torch.randn(2, 3, 61, 83)  # odd size on purpose
    with torch.no_grad():
        want = ref(x)
        one_call = ee(x)
        stages = ee.forward_stages(x)
        # stage by stage, by hand
        feats = [x]
        for s in range(1, 5):
            feats = ee.forward_stage(s, feats)
    assert len(want) == len(one_call) == len(stages[-1]) == len(feats) == 4
    for a, b, c, d in zip(want, one_call, stages[-1], feats):
        assert torch.equal(a, b) and torch.equal(a, c) and torch.equal(a, d)
    assert [len(s) for s in stages] == [1, 2, 3, 4]
    assert [[t.shape[1] for t in s] for s in stages] == ee.stage_out_channels() == \
        [[64], [8, 16], [8, 16, 24], [8, 16, 24, 32]]
    with pytest.raises(ValueError, match='stage must be in'):
        ee.forward_stage(5, feats)


def test_rh_head_structure_and_shapes():
    from mmseg_cbt.models import EarlyExitRHHead
    head = EarlyExitRHHead(num_down=3, num_up=2, in_channels=[8, 16], in_index=[0, 1], channels=12, num_classes=5)
    assert len(head.down_convs) == 3 and len(head.up_convs) == 2
    assert head.down_convs[0].conv.in_channels == 24 and head.down_convs[0].conv.kernel_size == (1, 1)
    assert all(c.conv.in_channels == 12 for c in list(head.down_convs[1:]) + list(head.up_convs))
    assert head.conv_seg.in_channels == 12 and head.conv_seg.out_channels == 5
    feats = [torch.randn(2, 8, 33, 45), torch.randn(2, 16, 17, 23)]
    assert head(feats).shape == (2, 5, 33, 45)  # logits at the first branch's (1/4) resolution
    with pytest.raises(ValueError, match='num_down'):
        EarlyExitRHHead(num_down=1, num_up=1, in_channels=[8], in_index=[0], channels=4, num_classes=2)


def test_stock_encoder_decoder_checkpoint_loads(toy_cfg):
    """A stock mmseg EncoderDecoder (HRNet + FCNHead) checkpoint fills backbone and final exit exactly."""
    from mmseg.registry import MODELS
    cfg = copy.deepcopy(toy_cfg.model)
    stock_cfg = dict(
        type='EncoderDecoder',
        data_preprocessor=cfg.data_preprocessor,
        backbone=dict(cfg.backbone, type='HRNet'),
        decode_head=cfg.decode_head,
        test_cfg=dict(mode='whole'))
    stock = MODELS.build(stock_cfg)
    model = build_tiny_model(toy_cfg)
    missing, unexpected = model.load_state_dict(stock.state_dict(), strict=False)
    assert not unexpected
    assert all(k.startswith(('exit_heads.', 'cbt_')) for k in missing)
    stock.eval(), model.eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model.forward_exits(x)[-1], stock._forward(x))


def test_segmentor_loss_one_term_per_exit_and_gradients(toy_cfg):
    model = build_tiny_model(toy_cfg)
    model.train()
    imgs, samples = demo_batch(19)
    losses = model.loss(imgs, samples)
    loss_keys = sorted(k for k in losses if 'loss' in k)
    assert loss_keys == [f'exit{n}.loss_ce' for n in range(1, 5)]
    assert all(f'exit{n}.acc_seg' in losses for n in range(1, 5))
    sum(losses[k] for k in loss_keys).backward()
    for n, head in enumerate(model.exits):
        assert head.conv_seg.weight.grad is not None and head.conv_seg.weight.grad.abs().sum() > 0, n
    assert model.backbone.conv1.weight.grad.abs().sum() > 0


def test_exit_loss_weights_and_ignore_index(toy_cfg):
    model = build_tiny_model(toy_cfg)
    model.train()
    imgs, samples = demo_batch(19)
    torch.manual_seed(0)
    base = model.loss(imgs, samples)
    model.exit_loss_weights = [0.5, 1.0, 2.0, 0.0]
    torch.manual_seed(0)
    weighted = model.loss(imgs, samples)
    for n, w in enumerate([0.5, 1.0, 2.0, 0.0], start=1):
        torch.testing.assert_close(weighted[f'exit{n}.loss_ce'], base[f'exit{n}.loss_ce'] * w)
    # all-ignore labels: no loss from any pixel
    for s in samples:
        s.gt_sem_seg.data[:] = 255
    ign = model.loss(imgs, samples)
    assert all(float(ign[f'exit{n}.loss_ce']) == 0.0 for n in range(1, 5))


def test_segmentor_modes_like_mmseg(toy_cfg):
    """loss / train_step / val_step / predict / tensor, as mmseg's own segmentor tests exercise a segmentor."""
    model = build_tiny_model(toy_cfg)
    imgs, samples = demo_batch(19)
    data = dict(inputs=list(imgs * 50 + 100), data_samples=samples)
    optim = OptimWrapper(torch.optim.SGD(model.parameters(), lr=0.01))
    model.train()
    out = model.train_step(data, optim)
    assert 'loss' in out and all(f'exit{n}.loss_ce' in out for n in range(1, 5))
    model.eval()
    with torch.no_grad():
        preds = model.val_step(data)
        assert len(preds) == 2
        for p in preds:
            assert p.pred_sem_seg.data.shape == (1, 64, 96)
            for n in range(1, 5):
                m = getattr(p, f'exit{n}_pred_sem_seg').data
                assert m.shape == (1, 64, 96) and m.dtype == torch.int64
            assert torch.equal(p.exit4_pred_sem_seg.data, p.pred_sem_seg.data)
        pre = model.data_preprocessor(data, False)
        tensor_out = model(pre['inputs'], pre['data_samples'], mode='tensor')
        exits = model.exit_logits(pre['inputs'])
        assert isinstance(tensor_out, torch.Tensor) and tensor_out.shape == (2, 19, 16, 24)
        assert torch.equal(tensor_out, exits[-1]) and len(exits) == 4
        # predict without data samples
        res = model.predict(pre['inputs'])
        assert res[0].exit1_pred_sem_seg.data.shape == (1, 64, 96)


def test_stop_masks_and_copy_aggregation(toy_cfg):
    model = build_tiny_model(toy_cfg, exit_mode='global')
    randomise_bn(model)
    model.eval()
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        dense = model.forward_exits(x, exit_mode='dense')
        # a threshold that stops about 30 % of the pixels at exit 1
        thr = float(torch.quantile(torch.softmax(dense[0], 1).max(1).values.flatten(), 0.7))
        model.test_cfg.global_threshold = thr
        # post-hoc early exit: dense features, only the logits of stopped pixels frozen
        logits, actives = model.forward_exits(x, feature_mask='none', return_active=True)
    assert actives[0] is None
    # exit 1 is always dense; later exits: active pixels equal the dense logits, stopped ones copy the previous exit
    assert torch.equal(logits[0], dense[0])
    for n in range(1, 4):
        act = actives[n]
        assert act is not None and act.shape == (2, 16, 24)
        a = act.unsqueeze(1).expand_as(dense[n])
        assert torch.equal(logits[n][a], dense[n][a])
        assert torch.equal(logits[n][~a], logits[n - 1][~a])
        # cumulative masks, built from the global rule on the exit's own probabilities
        prev = torch.ones_like(act) if actives[n - 1] is None else actives[n - 1]
        stop = torch.softmax(logits[n - 1], 1).max(1).values > thr
        assert torch.equal(act, prev & ~stop)
    assert 0.6 < actives[1].float().mean() < 0.8
    assert actives[3].float().mean() <= actives[2].float().mean() <= actives[1].float().mean()


def test_uncalibrated_cbt_mode_is_a_clear_error(toy_cfg):
    model = build_tiny_model(toy_cfg, exit_mode='cbt')
    model.eval()
    with pytest.raises(RuntimeError, match='never calibrated'):
        model.forward_exits(torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match='exit_mode'):
        model.forward_exits(torch.randn(1, 3, 32, 32), exit_mode='bogus')


def test_num_classes_mismatch_is_rejected(toy_cfg):
    from mmseg.registry import MODELS
    cfg = copy.deepcopy(toy_cfg.model)
    cfg.exit_heads[1].num_classes = 7
    with pytest.raises(ValueError, match='num_classes mismatch'):
        MODELS.build(cfg)
    cfg = copy.deepcopy(toy_cfg.model)
    cfg.exit_heads = cfg.exit_heads[:2]
    with pytest.raises(ValueError, match='exit_heads'):
        MODELS.build(cfg)


def test_per_exit_metric_on_hand_made_predictions():
    from mmengine.structures import PixelData

    from mmseg.structures import SegDataSample

    from mmseg_cbt.evaluation import EarlyExitIoUMetric
    metric = EarlyExitIoUMetric()
    metric.dataset_meta = dict(classes=('a', 'b'))
    gt = torch.tensor([[0, 0, 1, 1]])
    p1 = torch.tensor([[0, 1, 1, 1]])  # a: I=1,U=2 -> .5 ; b: I=2,U=3 -> .667 ; mIoU 58.33 ; aAcc 75
    p2 = torch.tensor([[0, 0, 1, 1]])  # perfect
    s = SegDataSample(
        gt_sem_seg=PixelData(data=gt),
        pred_sem_seg=PixelData(data=p2),
        exit1_pred_sem_seg=PixelData(data=p1),
        exit2_pred_sem_seg=PixelData(data=p2))
    metric.process({}, [s.to_dict()])
    res = metric.evaluate(1)
    assert res['exit1.mIoU'] == pytest.approx(58.33)
    assert res['exit1.aAcc'] == pytest.approx(75.0)
    assert res['exit1.mAcc'] == pytest.approx(75.0)  # a: 1/2, b: 2/2
    assert res['exit2.mIoU'] == res['mIoU'] == pytest.approx(100.0)
    assert res['aAcc'] == pytest.approx(100.0)


@pytest.mark.parametrize('path', sorted(glob.glob(osp.join(ROOT, 'configs', '**', '*.py'), recursive=True)))
def test_every_config_parses_and_builds(path):
    from mmengine.config import Config

    from mmseg.registry import MODELS
    cfg = Config.fromfile(path)
    if 'model' not in cfg:  # dataset/runtime fragments
        return
    assert cfg.custom_imports == dict(imports=['mmseg_cbt'], allow_failed_imports=False)
    if cfg.model.type == 'EncoderDecoder':  # a plain model for tools/e2cm.py: its converted form must build
        from mmseg_cbt.calibration.e2cm import e2cm_config
        cfg = e2cm_config(cfg)
    cfg.model.pretrained = None
    model = MODELS.build(cfg.model)
    assert type(model).__name__ == 'EarlyExitEncoderDecoder'
    assert model.num_exits == (3 if type(model.backbone).__name__ == 'EarlyExitViT' else 4)  # DToP: 3 exits
    expect_k = 150 if 'ade20k' in path else 19
    assert all(h.num_classes == expect_k for h in model.exits)


def test_everything_stopped_skips_the_rest(toy_cfg):
    """When every pixel stops at exit 1, later exits are copies and no later stage runs."""
    model = build_tiny_model(toy_cfg, exit_mode='global', global_threshold=0.0)
    model.eval()
    calls = []
    model.backbone.stage2.register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        for fm in ('none', 'simulate', 'sparse'):
            logits, actives = model.forward_exits(torch.randn(1, 3, 64, 64), feature_mask=fm, return_active=True)
            assert len(logits) == len(actives) == 4
            assert all(torch.equal(lg, logits[0]) for lg in logits)
            assert all(not a.any() for a in actives[1:])
    assert not calls
