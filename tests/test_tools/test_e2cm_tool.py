"""tools/e2cm.py: a plain mmseg HRNet FCN checkpoint becomes an early-exit model with class-mean exits whose final
exit predicts exactly what the original predicts; it then calibrates (tools/calibrate.py) and tests per exit
(tools/test.py). Bad inputs are rejected before any work."""
import copy
import glob
import os.path as osp
import sys

import pytest
import torch
from utils import PLAIN_TOY_CONFIG, load_tool, randomise_bn, shrink_run_cfg


@pytest.fixture(scope='module')
def plain(tiny_city, tmp_path_factory):
    """A plain mmseg EncoderDecoder checkpoint (random weights, non-trivial BN) and its config file."""
    from mmseg.registry import MODELS
    root = tmp_path_factory.mktemp('plain')
    from mmengine.config import Config
    cfg = shrink_run_cfg(Config.fromfile(PLAIN_TOY_CONFIG), tiny_city, root)
    torch.manual_seed(0)
    model = MODELS.build(cfg.model)
    randomise_bn(model)
    cfg_file, ckpt = str(root / 'plain.py'), str(root / 'plain.pth')
    cfg.dump(cfg_file)
    torch.save(dict(meta=dict(), state_dict=model.state_dict()), ckpt)
    return cfg_file, ckpt, model.eval()


@pytest.fixture(scope='module')
def converted(plain, tmp_path_factory):
    cfg_file, ckpt, _ = plain
    out = str(tmp_path_factory.mktemp('e2cm') / 'e2cm.pth')
    return load_tool('e2cm.py').main([cfg_file, ckpt, '--out', out, '--no-progress'])


def test_final_exit_equals_the_original_model(plain, converted):
    from mmengine.config import Config

    from mmseg.registry import MODELS

    from mmseg_cbt.calibration.calibrate import build_calibration_dataloader
    from mmseg_cbt.utils.checkpoint import load_checkpoint_strict
    cfg_file, _, original = plain
    out, out_cfg = converted
    cfg = Config.fromfile(out_cfg)
    assert cfg.model.type == 'EarlyExitEncoderDecoder' and cfg.model.backbone.type == 'EarlyExitHRNet'
    model = MODELS.build(cfg.model)
    ckpt = load_checkpoint_strict(model, out, config=out_cfg)
    model.eval()
    assert ckpt['meta']['e2cm']['exits'] == [1, 2, 3]
    assert all(t > 0 for t in ckpt['meta']['e2cm']['temperatures'])
    loader = build_calibration_dataloader(Config.fromfile(cfg_file), dict(Config.fromfile(cfg_file).val_dataloader))
    with torch.no_grad():
        for data in loader:
            batch = original.data_preprocessor(copy.deepcopy(data), False)
            want = original.predict(batch['inputs'], copy.deepcopy(batch['data_samples']))
            got = model.predict(batch['inputs'], copy.deepcopy(batch['data_samples']))
            for w, g in zip(want, got):
                assert torch.equal(w.seg_logits.data, g.seg_logits.data)
                assert torch.equal(w.pred_sem_seg.data, g.pred_sem_seg.data)
                assert torch.equal(g.exit4_pred_sem_seg.data, w.pred_sem_seg.data)
    # the class-mean exits hold what one direct pass over the training split gives
    from mmseg_cbt.calibration import backbone_exit_features, gather_class_feature_stats
    train = build_calibration_dataloader(Config.fromfile(cfg_file))
    stats = gather_class_feature_stats(
        model, train, 3, lambda x: backbone_exit_features(model, x, [1, 2, 3]), progress=False)
    for p, head in enumerate(model.exit_heads):
        assert torch.equal(head.class_means, stats.class_means(p).float())
        assert torch.equal(head.class_counts, stats.counts[p])
        assert float(head.temperature) == pytest.approx(stats.fitted_temperature(p), rel=1e-6)


def test_calibrate_and_test_tools_run_on_the_result(converted, tmp_path, monkeypatch):
    out, out_cfg = converted
    cal = str(tmp_path / 'cbt.pth')
    load_tool('calibrate.py').main([out_cfg, out, '--alpha', '0.9', '--beta', '0.998', '--out', cal, '--no-plot'])
    state = torch.load(cal, map_location='cpu', weights_only=False)['state_dict']
    assert bool(state['cbt_calibrated'])
    thr = state['cbt_thresholds'][0]
    assert float(thr.min()) >= 0.9 - 1e-6 and float(thr.max()) <= 0.998 + 1e-6
    test_tool = load_tool('test.py')
    work = str(tmp_path / 'test')
    argv = [out_cfg, cal, '--work-dir', work, '--cfg-options', 'model.test_cfg.exit_mode=cbt']
    test_tool.check_checkpoint(argv)
    monkeypatch.setattr(sys, 'argv', ['test.py'] + argv)
    try:
        test_tool.run_mmseg_tool('test.py')
    finally:
        test_tool.finish_distributed()
    log = open(sorted(glob.glob(osp.join(work, '*', '*.log')))[-1]).read()
    for n in (1, 2, 3, 4):
        assert f'exit{n}.mIoU' in log


def test_bad_inputs_are_rejected_before_any_work(plain, converted, tmp_path, capsys):
    cfg_file, ckpt, _ = plain
    out, out_cfg = converted
    tool = load_tool('e2cm.py')

    def usage(argv):
        with pytest.raises(SystemExit):
            tool.main(argv)
        return capsys.readouterr().err

    assert 'never overwritten' in usage([cfg_file, ckpt, '--out', ckpt])
    assert 'never overwritten' in usage([cfg_file, ckpt, '--out', str(tmp_path / 'x.pth'), '--out-config', cfg_file])
    assert 'not a finite number > 0' in usage([cfg_file, ckpt, '--out', 'x.pth', '--temperature', '-1'])
    # a checkpoint that is not an mmseg segmentor's
    junk = str(tmp_path / 'junk.pth')
    torch.save(dict(state_dict=dict(weight=torch.zeros(2))), junk)
    with pytest.raises(ValueError, match='is not an mmseg segmentor checkpoint'):
        tool.main([cfg_file, junk, '--out', str(tmp_path / 'a.pth')])
    # an early-exit config is not a plain segmentor
    with pytest.raises(ValueError, match='E2CM converts a plain mmseg EncoderDecoder'):
        tool.main([out_cfg, out, '--out', str(tmp_path / 'b.pth')])
    with pytest.raises(ValueError, match=r'exits must be distinct stages in \[1, 3\]'):
        tool.main([cfg_file, ckpt, '--out', str(tmp_path / 'c.pth'), '--exits', '4'])
    assert not glob.glob(str(tmp_path / '*.py'))  # nothing written by the failed runs


def test_mmseg_wheel_config_converts_and_loads_its_weights():
    """mmseg's own fcn_hr18s Cityscapes config (from the installed wheel) becomes an E2CM model into which the
    plain model's state dict loads strictly."""
    from mmengine.config import Config

    import mmseg
    from mmseg.registry import MODELS

    from mmseg_cbt.calibration.e2cm import e2cm_config, load_plain_weights
    wheel = osp.join(osp.dirname(mmseg.__file__), '.mim', 'configs', 'hrnet')
    cfg = Config.fromfile(osp.join(wheel, 'fcn_hr18s_4xb2-40k_cityscapes-512x1024.py'))
    cfg.model.pretrained = None
    cfg.model.backbone.norm_cfg = cfg.model.decode_head.norm_cfg = dict(type='BN', requires_grad=True)
    plain = MODELS.build(cfg.model)
    new = e2cm_config(cfg, exits=[1, 3])
    assert [h.in_channels for h in new.model.exit_heads] == [[256], [18, 36], [18, 36, 72]]
    assert [h.stop_pixels for h in new.model.exit_heads] == [True, False, True]
    assert new.val_evaluator.type == 'EarlyExitIoUMetric'
    new.model.backbone.norm_cfg = new.model.decode_head.norm_cfg = dict(type='BN', requires_grad=True)
    model = MODELS.build(new.model)
    load_plain_weights(model, plain.state_dict())
    got = model.state_dict()
    assert all(torch.equal(got[k], v) for k, v in plain.state_dict().items())
