"""The demo-model study tool (its shipped variant is the demo config; log reader and class shares exact) and the
sweep and ViT-pruning benchmarks' option checks."""
import os.path as osp

from utils import ROOT, load_tool, usage_error

DEMO_CONFIG = osp.join(ROOT, 'configs', 'ee_hrnet', 'ee-fcn_hr-tiny-w16_1xb4-1k_toycity-256x512.py')


def test_bad_options_are_named(capsys):
    study = load_tool('misc/demo_schedule_study.py')
    assert 'unknown' in usage_error(capsys, study.parse_args, ['--variants', 'nope'])
    assert '--min-share' in usage_error(capsys, study.parse_args, ['--min-share', '1.5'])
    assert '--min-iou' in usage_error(capsys, study.parse_args, ['--min-iou', '101'])


def test_shipped_variant_is_the_demo_config(tmp_path):
    """The study's 'wide-lr4e-3' variant builds exactly the model and optimiser of the demo config run_demo.sh
    trains (what the study table reports is what the demo ships)."""
    from mmengine.config import Config
    study = load_tool('misc/demo_schedule_study.py')
    variant = Config.fromfile(study._write_config('wide-lr4e-3', str(tmp_path)))
    demo = Config.fromfile(DEMO_CONFIG)
    assert variant.model.to_dict() == demo.model.to_dict()
    assert variant.optim_wrapper.to_dict() == demo.optim_wrapper.to_dict()
    assert variant.train_cfg.max_iters == demo.train_cfg.max_iters == 1000
    assert variant.custom_hooks == []  # the study skips calibration; the demo keeps it
    assert demo.custom_hooks[0]['type'] == 'CBTCalibrationHook'


def test_log_reader_and_class_shares(tmp_path):
    import cv2
    import numpy as np
    study = load_tool('misc/demo_schedule_study.py')
    run = tmp_path / 'run' / '20261203_000000'
    run.mkdir(parents=True)
    (run / '20261203_000000.log').write_text('Iter(val) [50/50]  exit1.mIoU: 20.9400  exit2.mIoU: 23.0200\n'
                                             '|     road     | 94.16 | 98.0 |\n|  traffic light | 0.0 | 0.0 |\n')
    res = study._read_log(str(tmp_path / 'run'))
    assert res['exits'] == {1: 20.94, 2: 23.02}
    assert res['classes'] == {'road': 94.16, 'traffic light': 0.0}
    labels = tmp_path / 'gt' / 'city'
    labels.mkdir(parents=True)
    lab = np.zeros((4, 5), np.uint8)
    lab[0, :2] = 1
    lab[1, 0] = 255
    cv2.imwrite(str(labels / 'a_gtFine_labelTrainIds.png'), lab)
    shares = study.val_class_shares(['road', 'sidewalk', 'building'], root=str(tmp_path / 'gt'))
    assert shares == {'road': 100 * 17 / 20, 'sidewalk': 100 * 2 / 20, 'building': 0.0}


def test_sweep_benchmark_rejects_bad_options(capsys, tmp_path):
    bench = load_tool('analysis_tools/benchmark_sweep.py')
    cfg = osp.join(ROOT, 'configs', 'ee_hrnet', 'ee-fcn_hr-tiny_1xb4-1k_toycity-256x512.py')
    assert 'no such file' in usage_error(capsys, bench.parse_args, [cfg, str(tmp_path / 'missing.pth')])
    ckpt = tmp_path / 'c.pth'
    ckpt.write_bytes(b'')
    assert 'one setting expected' in usage_error(capsys, bench.parse_args, [cfg, str(ckpt), '--single', 'adpc:0.8,0.9'])


def test_vit_pruning_benchmark_rejects_bad_options(capsys):
    bench = load_tool('analysis_tools/benchmark_vit_pruning.py')
    assert '--removed' in usage_error(capsys, bench.main, ['--removed', '100'])
    assert '--repeats' in usage_error(capsys, bench.main, ['--repeats', '0'])
