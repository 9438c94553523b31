"""tools/calibrate.py, tools/analysis_tools/miou_vs_gflops.py, get_flops.py and tools/test.py: options rejected at
parse time, checkpoints loaded strictly, result files replaced as a set."""
import json
import os
import os.path as osp

import pytest
import torch
from utils import ROOT, build_tiny_model, load_tool, tiny_run_cfg, usage_error


@pytest.fixture(scope='module')
def trained(toy_cfg, tiny_city, tmp_path_factory):
    """A 2-iteration checkpoint without calibration and the config file it was trained with."""
    from mmengine.runner import Runner
    root = tmp_path_factory.mktemp('trained')
    cfg = tiny_run_cfg(toy_cfg, tiny_city, root / 'train')
    cfg.custom_hooks = []
    Runner.from_cfg(cfg).train()
    cfg_file = str(root / 'cfg.py')
    cfg.dump(cfg_file)
    return cfg_file, str(root / 'train' / 'iter_2.pth')


# ------------------------------------------------------------------------------------------------ calibrate.py
def test_calibrate_tool_never_overwrites_and_remaps(trained, tmp_path):
    """A new file is written, the input untouched; --from-stats re-maps without data; the JSON equals the buffers."""
    from mmseg_cbt.calibration.thresholds import cbt_thresholds
    calibrate = load_tool('calibrate.py')
    cfg_file, src = trained
    before = open(src, 'rb').read()
    out = calibrate.main([cfg_file, src, '--alpha', '0.9', '--beta', '0.998', '--out', str(tmp_path / 'c.pth')])
    assert open(src, 'rb').read() == before
    sd = torch.load(out, map_location='cpu', weights_only=False)['state_dict']
    assert bool(sd['cbt_calibrated'])
    report = json.load(open(tmp_path / 'c_calibration.json'))
    assert torch.equal(sd['cbt_thresholds'][0], torch.tensor([c['threshold'] for c in report['classes']]))
    assert sorted(report['outputs']) == ['c.pth', 'c_calibration.json', 'c_thresholds.png']
    # re-map the stored statistics into another range: identical to the pure function on those statistics
    out2 = calibrate.main(
        [cfg_file, out, '--alpha', '0.95', '--beta', '0.99', '--from-stats', '--no-share', '--no-plot'])
    sd2 = torch.load(out2, map_location='cpu', weights_only=False)['state_dict']
    want = cbt_thresholds(sd['cbt_class_mean_probs'], 0.95, 0.99, share_exits=False, counts=sd['cbt_class_counts'])
    assert torch.equal(sd2['cbt_thresholds'], want)
    assert not bool(sd2['cbt_share_exits'])
    with pytest.raises(RuntimeError, match='no calibration statistics'):
        calibrate.main([cfg_file, src, '--alpha', '0.9', '--beta', '0.998', '--from-stats'])


def test_calibrate_tool_precision_method(trained, tmp_path):
    """--method cbt-precision: the stored thresholds equal precision_thresholds of histograms gathered directly, and
    the JSON names the method and target."""
    from mmengine.config import Config

    from mmseg.registry import MODELS

    from mmseg_cbt.calibration import PrecisionStats, precision_thresholds
    from mmseg_cbt.calibration.calibrate import build_calibration_dataloader
    from mmseg_cbt.calibration.gather import gather_exit_stats
    from mmseg_cbt.utils.checkpoint import load_checkpoint_strict
    calibrate = load_tool('calibrate.py')
    cfg_file, src = trained
    out = calibrate.main([
        cfg_file, src, '--method', 'cbt-precision', '--target', '0.6', '--alpha', '0.5', '--beta', '0.999',
        '--no-share', '--no-plot', '--out',
        str(tmp_path / 'p.pth')
    ])
    sd = torch.load(out, map_location='cpu', weights_only=False)['state_dict']
    cfg = Config.fromfile(cfg_file)
    model = MODELS.build(cfg.model)
    load_checkpoint_strict(model, src, logger=None)
    stats = PrecisionStats(model.num_exits, model.num_classes)
    gather_exit_stats(model, build_calibration_dataloader(cfg), [stats], progress=False)
    want = precision_thresholds(stats, 0.6, 0.5, 0.999)
    assert torch.equal(sd['cbt_thresholds'], want)
    assert not bool(sd['cbt_share_exits'])
    report = json.load(open(tmp_path / 'p_calibration.json'))
    assert report['method'] == 'cbt-precision-ns' and report['target'] == 0.6
    assert report['classes'][0]['threshold'] == [float(t) for t in want[:, 0]]


@pytest.mark.parametrize('args, match', [
    (['--alpha', '0.99', '--beta', '0.9'], '--alpha must be <= --beta'),
    (['--alpha', 'nan', '--beta', '0.9'], 'argument --alpha: .*outside'),
    (['--alpha', '0.9', '--beta', '2'], 'argument --beta: .*outside'),
    (['--alpha', 'abc', '--beta', '0.9'], 'argument --alpha: .*not a number'),
    (['--alpha', '0.9', '--beta', '0.99', '--max-batches', '0'], 'argument --max-batches: .*not >= 1'),
    (['--alpha', '0.4', '--beta', '0.99', '--method', 'cbt-precision'], 'needs --alpha >= 0.5'),
    (['--alpha', '0.9', '--beta', '0.99', '--target', '0.9'], '--target is only used with'),
    (['--alpha', '0.9', '--beta', '0.99', '--method', 'cbt-precision', '--from-stats'], 'drop --from-stats'),
    (['--alpha', '0.9', '--beta', '0.99', '--method', 'bogus'], 'invalid choice'),
])
def test_calibrate_tool_option_errors(trained, capsys, args, match):
    import re
    calibrate = load_tool('calibrate.py')
    cfg_file, src = trained
    assert re.search(match, usage_error(capsys, calibrate.main, [cfg_file, src] + args))


def test_calibrate_tool_refuses_its_input_and_missing_files(trained, capsys, tmp_path):
    calibrate = load_tool('calibrate.py')
    cfg_file, src = trained
    before = open(src, 'rb').read()
    assert 'never overwritten' in usage_error(capsys, calibrate.main,
                                              [cfg_file, src, '--alpha', '0.9', '--beta', '0.998', '--out', src])
    assert open(src, 'rb').read() == before
    missing = str(tmp_path / 'nope.pth')
    assert f'checkpoint not found: {missing}' in usage_error(capsys, calibrate.main,
                                                             [cfg_file, missing, '--alpha', '0.9', '--beta', '1'])


def test_calibrate_tool_rejects_checkpoints_of_other_models(toy_cfg, trained, tmp_path):
    """10 classes, no exits, a config override: errors naming the keys and the config, before any data pass; an
    old checkpoint without the calibration buffers loads as uncalibrated and is calibrated."""
    from mmseg_cbt.utils.checkpoint import CheckpointMismatchError
    calibrate = load_tool('calibrate.py')
    cfg_file, src = trained
    ten = tmp_path / 'ten.pth'
    torch.save(dict(state_dict=build_tiny_model(toy_cfg, num_classes=10).state_dict(), meta={}), ten)
    with pytest.raises(
            CheckpointMismatchError,
            match=rf'ten.pth does not fit the model built from {cfg_file}: .*'
            r'keys of another shape \(first: .*conv_seg.weight: checkpoint \(10, '):
        calibrate.main([cfg_file, str(ten), '--alpha', '0.9', '--beta', '0.998'])
    with pytest.raises(CheckpointMismatchError, match='keys of another shape'):
        calibrate.main([cfg_file, src, '--alpha', '0.9', '--beta', '0.998', '--cfg-options', 'model.num_classes=10'])
    sd = torch.load(src, map_location='cpu', weights_only=False)['state_dict']
    plain = {k: v for k, v in sd.items() if not k.startswith(('exit_heads.', 'cbt_'))}  # like mmseg's fcn_hr
    plain['auxiliary_head.conv_seg.weight'] = torch.zeros(19, 8, 1, 1)
    torch.save(dict(state_dict=plain), tmp_path / 'plain.pth')
    with pytest.raises(
            CheckpointMismatchError,
            match=r'missing keys \(first: exit_heads\.0\..*unexpected keys '
            r'\(first: auxiliary_head.conv_seg.weight\)'):
        calibrate.main([cfg_file, str(tmp_path / 'plain.pth'), '--alpha', '0.9', '--beta', '0.998'])
    old = {k: v for k, v in sd.items() if not k.startswith('cbt_')}
    torch.save(dict(state_dict=old, meta={}), tmp_path / 'old.pth')
    out = calibrate.main(
        [cfg_file,
         str(tmp_path / 'old.pth'), '--alpha', '0.9', '--beta', '0.998', '--no-plot', '--max-batches', '1'])
    assert bool(torch.load(out, map_location='cpu', weights_only=False)['state_dict']['cbt_calibrated'])


def test_calibrate_tool_replaces_its_outputs_as_a_set(trained, tmp_path, monkeypatch):
    """An interrupt while writing leaves the previous set; a run without a chart removes the previous run's chart
    (which that run listed as its own) and nothing else."""
    from mmseg_cbt.calibration import visualization
    calibrate = load_tool('calibrate.py')
    cfg_file, src = trained
    out = str(tmp_path / 'c.pth')
    argv = [cfg_file, src, '--alpha', '0.9', '--beta', '0.998', '--out', out, '--max-batches', '2']
    calibrate.main(argv)
    (tmp_path / 'notes.txt').write_text('mine')
    first = {f: (tmp_path / f).read_bytes() for f in ('c.pth', 'c_calibration.json', 'c_thresholds.png')}

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(visualization, 'plot_thresholds', interrupted)
    with pytest.raises(KeyboardInterrupt):
        calibrate.main(argv[:3] + ['0.95'] + argv[4:])
    assert {f: (tmp_path / f).read_bytes() for f in first} == first
    assert sorted(os.listdir(tmp_path)) == sorted(list(first) + ['notes.txt'])  # no temporary left
    monkeypatch.undo()
    calibrate.main(argv[:3] + ['0.95'] + argv[4:] + ['--no-plot'])
    assert sorted(os.listdir(tmp_path)) == ['c.pth', 'c_calibration.json', 'notes.txt']
    assert json.load(open(tmp_path / 'c_calibration.json'))['alpha'] == 0.95


# ------------------------------------------------------------------------------------------- miou_vs_gflops.py
def test_miou_vs_gflops_dtop_setting():
    """``dtop:T,K`` selects DToP's rule with its threshold and top-k (K defaults to 5, T to 0.9)."""
    tool = load_tool('analysis_tools/miou_vs_gflops.py')
    assert tool.parse_setting('dtop:0.95,3') == ('DToP t=0.95 k=3', 'dtop', dict(threshold=0.95, topk=3))
    assert tool.parse_setting('dtop:0.8') == ('DToP t=0.8 k=5', 'dtop', dict(threshold=0.8, topk=5))
    assert tool.parse_setting('dtop')[2] == dict(threshold=0.9, topk=5)


@pytest.mark.parametrize('settings, match', [
    (['adpc:-1'], r"'adpc:-1'.*outside \[0, 1\]"),
    (['adpc:abc'], r"'adpc:abc' \(the ADP-C threshold.*not a number"),
    (['dense', 'cbt:0.99,0.9'], r"'cbt:0.99,0.9': expected 0 < ALPHA <= BETA"),
    (['cbt:0.9'], r"'cbt:0.9': expected cbt:ALPHA,BETA"),
    (['cbtns:0.5,nan'], r'outside'),
    (['dtop:1.5'], r"'dtop:1.5'.*outside \[0, 1\]"),
    (['dtop:0.9,-1'], r'K of dtop:T,K must be an integer >= 0'),
    (['dtop:0.9,5,1'], r'expected dtop:T or dtop:T,K'),
])
def test_miou_vs_gflops_rejects_settings_before_any_work(trained, capsys, tmp_path, settings, match):
    import re
    tool = load_tool('analysis_tools/miou_vs_gflops.py')
    cfg_file, src = trained
    err = usage_error(capsys, tool.main, [cfg_file, src, '--out-dir', str(tmp_path / 'r'), '--settings'] + settings)
    assert 'argument --settings' in err and re.search(match, err)
    assert not osp.exists(tmp_path / 'r')


def test_miou_vs_gflops_strict_loading_and_report_set(toy_cfg, trained, capsys, tmp_path, monkeypatch):
    tool = load_tool('analysis_tools/miou_vs_gflops.py')
    from mmseg_cbt.utils.checkpoint import CheckpointMismatchError
    cfg_file, src = trained
    out_dir = tmp_path / 'report'
    assert 'not >= 1' in usage_error(capsys, tool.main, [cfg_file, src, '--max-images', '0'])
    ten = tmp_path / 'ten.pth'
    torch.save(dict(state_dict=build_tiny_model(toy_cfg, num_classes=10).state_dict()), ten)
    with pytest.raises(CheckpointMismatchError, match='ten.pth does not fit'):
        tool.main([cfg_file, str(ten), '--out-dir', str(out_dir), '--settings', 'dense'])
    empty = tmp_path / 'empty.pth'
    empty.write_bytes(b'')
    with pytest.raises(ValueError, match=r'empty.pth is empty \(0 bytes\)'):
        tool.main([cfg_file, str(empty), '--out-dir', str(out_dir), '--settings', 'dense'])
    assert not osp.exists(out_dir)

    argv = [cfg_file, src, '--out-dir', str(out_dir), '--settings', 'dense', '--max-images', '1']
    tool.main(argv)
    names = sorted(f'miou_vs_gflops.{e}' for e in ('csv', 'json', 'png', 'txt'))
    assert sorted(os.listdir(out_dir)) == names
    first = {f: (out_dir / f).read_bytes() for f in names}

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(tool, 'plot', interrupted)  # the last file of the set
    with pytest.raises(KeyboardInterrupt):
        tool.main(argv[:-2] + ['adpc:0.5', '--max-images', '1'])
    assert {f: (out_dir / f).read_bytes() for f in names} == first
    assert sorted(os.listdir(out_dir)) == names


# ----------------------------------------------------------------------------------- get_flops.py and test.py
def test_get_flops_shape_checks(capsys):
    tool = load_tool('analysis_tools/get_flops.py')
    config = osp.join(ROOT, 'configs', 'ee_hrnet', 'ee-fcn_hr-tiny_1xb4-1k_toycity-256x512.py')
    assert '--shape must be positive' in usage_error(capsys, tool.main, [config, '--shape', '0', '0'])
    assert '--reference values must be positive' in usage_error(capsys, tool.main, [config, '--reference', '0'])
    with pytest.raises(ValueError, match=r'input 7x9 is smaller than this network runs on: every side must be >= '):
        tool.main([config, '--shape', '7', '9'])


def test_test_tool_checks_the_checkpoint_strictly(toy_cfg, trained, tmp_path):
    from mmseg_cbt.utils.checkpoint import CheckpointMismatchError
    tool = load_tool('test.py')
    cfg_file, src = trained
    tool.check_checkpoint([cfg_file, src, '--work-dir', str(tmp_path)])  # the right one passes
    ten = tmp_path / 'ten.pth'
    torch.save(dict(state_dict=build_tiny_model(toy_cfg, num_classes=10).state_dict()), ten)
    with pytest.raises(CheckpointMismatchError, match='keys of another shape'):
        tool.check_checkpoint([cfg_file, str(ten)])


# ------------------------------------------------------------------------------------------------ sweep_stop_rules.py
def test_sweep_tool_end_to_end(trained, tmp_path, capsys):
    """The sweep tool on a calibrated checkpoint: every family's rows, the dense row, one file set; options are
    checked before any work."""
    calibrate = load_tool('calibrate.py')
    sweep = load_tool('analysis_tools/sweep_stop_rules.py')
    cfg_file, src = trained
    ckpt = calibrate.main([cfg_file, src, '--alpha', '0.9', '--beta', '0.998', '--out', str(tmp_path / 'c.pth')])
    out_dir = tmp_path / 'sweep'
    report = sweep.main([
        cfg_file, ckpt, '--out-dir',
        str(out_dir), '--sweep', 'adpc:0.3,0.6', 'cbt-alpha:0.5,0.9@beta=0.998', 'precision:0.6@alpha=0.5,beta=0.99',
        '--train-images', '2', '--precision-bins', '64', '--match-adpc', '0.6'
    ])
    assert [r['setting'] for r in report['rows']] == [
        'ADP-C t=0.3', 'ADP-C t=0.6', 'CBT [0.5, 0.998]', 'CBT [0.9, 0.998]', 'cbt-precision p=0.6 [0.5, 0.99]'
    ]
    dense = report['dense']['gflops_2_30']
    assert all(r['gflops_2_30'] <= dense + 1e-12 for r in report['rows'])
    assert sorted(os.listdir(out_dir)) == sorted([
        'stop_rule_sweep.json', 'stop_rule_sweep.csv', 'stop_rule_sweep.txt', 'stop_rule_sweep.png',
        'stop_rule_sweep_precision_stats.pth'
    ])
    saved = json.load(open(out_dir / 'stop_rule_sweep.json'))
    assert saved['rows'][0]['confusion_final'] == report['rows'][0]['confusion_final']
    # a bad family is a usage error before the model is even built
    err = usage_error(capsys, sweep.main, [cfg_file, ckpt, '--sweep', 'adpc:1.5'])
    assert 'must be in [0, 1]' in err
