"""tools/test.py with --show-dir (one exit picture per image) and the cost in its log, tools/image_demo.py."""
import glob
import json
import os.path as osp
import runpy
import sys

import mmcv
import numpy as np
import pytest
from utils import ROOT, load_tool, tiny_run_cfg, usage_error


@pytest.fixture(scope='module')
def calibrated(toy_cfg, tiny_city, tmp_path_factory):
    """A 2-iteration checkpoint with CBT thresholds in [0.9, 0.998] and the config file it was trained with."""
    from mmengine.runner import Runner
    root = tmp_path_factory.mktemp('calibrated')
    cfg = tiny_run_cfg(toy_cfg, tiny_city, root / 'train')
    Runner.from_cfg(cfg).train()
    cfg_file = str(root / 'cfg.py')
    cfg.dump(cfg_file)
    return cfg_file, str(root / 'train' / 'iter_2.pth')


def _run_test_tool(monkeypatch, argv):
    monkeypatch.setattr(sys, 'argv', [osp.join(ROOT, 'tools', 'test.py')] + argv)
    runpy.run_path(osp.join(ROOT, 'tools', 'test.py'), run_name='__main__')


def _predictions(cfg_file, ckpt, exit_mode):
    """The model of ``cfg_file`` with ``ckpt`` and its predictions on the test set (as tools/test.py makes them)."""
    import copy

    import torch
    from mmengine.config import Config
    from mmengine.runner import Runner

    from mmseg.registry import MODELS

    from mmseg_cbt.utils.checkpoint import load_checkpoint_strict
    cfg = Config.fromfile(cfg_file)
    model = MODELS.build(cfg.model)
    load_checkpoint_strict(model, ckpt, logger=None)
    model.eval().test_cfg.exit_mode = exit_mode
    loader = Runner.build_dataloader(copy.deepcopy(cfg.test_dataloader))
    outs = []
    with torch.no_grad():
        for data in loader:
            data = model.data_preprocessor(data, False)
            outs += model.predict(data['inputs'], data['data_samples'])
    return model, loader.dataset.metainfo, outs


def test_test_tool_draws_exit_pictures_and_logs_the_report_tools_gflops(calibrated, tmp_path, monkeypatch):
    from mmseg_cbt.visualization import EarlyExitSegLocalVisualizer
    cfg_file, ckpt = calibrated
    work, show = tmp_path / 'work', tmp_path / 'show'
    _run_test_tool(monkeypatch, [
        cfg_file, ckpt, '--work-dir',
        str(work), '--show-dir',
        str(show), '--cfg-options', 'model.test_cfg.exit_mode=cbt', 'visualizer.name=test_show_dir'
    ])  # a visualiser name of its own: mmengine would hand back the training run's instance (and its save_dir)
    logs = glob.glob(str(work / '*' / '*.json'))
    assert len(logs) == 1
    with open(logs[0]) as f:
        logged = json.loads(f.read().strip().splitlines()[-1])
    report = load_tool('analysis_tools/miou_vs_gflops.py').main(
        [cfg_file, ckpt, '--out-dir',
         str(tmp_path / 'report'), '--settings', 'cbt:0.9,0.998'])
    exits = report['rows'][0]['exits']
    assert len(exits) == 4
    for e in exits:
        n = e['exit']
        # the same masks counted the same way: equal to the last bit, and the same mIoU
        assert logged[f'exit{n}.GFLOPs'] == e['gflops_2_30']
        assert logged[f'exit{n}.mIoU'] == pytest.approx(e['mIoU'], abs=1e-9)
        assert 0.0 <= logged[f'exit{n}.computed'] <= 100.0
    assert logged['exit1.computed'] == 100.0 and logged['GFLOPs'] == exits[-1]['gflops_2_30']
    assert exits[0]['gflops_2_30'] < exits[-1]['gflops_2_30']

    # --show-dir: one PNG per test image, the exit picture of that image's prediction
    pngs = sorted(glob.glob(str(show / '**' / '*.png'), recursive=True))
    model, meta, outs = _predictions(cfg_file, ckpt, 'cbt')
    assert len(pngs) == len(outs) == 2
    vis = EarlyExitSegLocalVisualizer(name='test_exit_pictures', classes=meta['classes'], palette=meta['palette'])
    for out in outs:
        name = f'test_{osp.basename(out.img_path)}'
        png = [p for p in pngs if osp.basename(p).startswith(name)]
        assert len(png) == 1, (name, pngs)
        drawn = mmcv.imread(png[0], channel_order='rgb')
        want = vis.draw_exits(mmcv.imread(out.img_path, channel_order='rgb'), out)
        assert drawn.shape == want.shape and drawn.shape[1] == 4 * 4 * 100  # 4 panels of 4 inches at 100 dpi
        assert np.array_equal(drawn, want)


def test_image_demo_prints_fractions_and_gflops(calibrated, tiny_city, tmp_path, capsys):
    import torch

    from mmseg_cbt.analysis import count_flops
    tool = load_tool('image_demo.py')
    cfg_file, ckpt = calibrated
    img = sorted(glob.glob(osp.join(tiny_city, 'leftImg8bit', 'val', '*', '*.png')))[0]
    out_file = tmp_path / 'demo.png'
    err = usage_error(capsys, tool.main, [img, cfg_file, ckpt, '--exit-mode', 'cbt', '--threshold', '0.5'])
    assert '--threshold needs --exit-mode global, entropy or dtop' in err
    err = usage_error(capsys, tool.main, [img, cfg_file, ckpt, '--exit-mode', 'global', '--threshold', '2'])
    assert '--threshold must be in [0, 1], got 2.0' in err
    assert 'img not found' in usage_error(capsys, tool.main, [img + '.x', cfg_file, ckpt])
    result = tool.main(
        [img, cfg_file, ckpt, '--exit-mode', 'global', '--threshold', '0.2', '--out-file',
         str(out_file)])
    printed = capsys.readouterr().out
    rows = [line.split('|') for line in printed.splitlines() if line.strip()[:1].isdigit()]
    assert len(rows) == 4
    computed = [float(r[1]) for r in rows]
    stopped = [float(r[2]) for r in rows]
    gflops = [float(r[3]) for r in rows]
    assert computed[0] == 100.0 and sum(stopped) == pytest.approx(100.0, abs=0.03)
    assert computed == pytest.approx([100 * float(v) for v in result.exit_computed], abs=0.006)
    assert gflops == pytest.approx([float(v) / 2**30 for v in result.exit_macs], abs=6e-5)
    # the printed cost is the counter's on the same image and masks
    from mmengine.config import Config

    from mmseg.apis import init_model
    cfg = Config.fromfile(cfg_file)
    cfg.model.test_cfg.update(exit_mode='global', global_threshold=0.2)
    tool_model = init_model(cfg, ckpt, device='cpu')
    data = tool_model.data_preprocessor(_demo_data(tool_model, img), False)
    with torch.no_grad():
        _, actives = tool_model.forward_exits(data['inputs'], return_active=True)
    ref = count_flops(tool_model, data['inputs'], actives=actives)
    assert [float(v) for v in result.exit_macs] == [float(e.macs) for e in ref.exits]
    picture = mmcv.imread(str(out_file), channel_order='rgb')
    assert picture.shape[1] == 4 * 4 * 100 and picture.shape[0] > 2 * 100


def test_exit_map_pair_compares_cbt_and_adpc_at_the_checkpoints_beta(calibrated, tiny_city, tmp_path, capsys):
    tool = load_tool('misc/exit_map_pair.py')
    cfg_file, ckpt = calibrated
    img = sorted(glob.glob(osp.join(tiny_city, 'leftImg8bit', 'val', '*', '*.png')))[0]
    out_file = tmp_path / 'pair.png'
    assert '--beta must be in [0, 1]' in usage_error(capsys, tool.main,
                                                     [img, cfg_file, ckpt, '--beta', '1.5', '--out-file', 'x.png'])
    cbt, adpc = tool.main([img, cfg_file, ckpt, '--beta', '0', '--out-file', str(out_file), '--dpi', '50'])
    printed = capsys.readouterr().out
    assert '== CBT [0.9, 0.998]' in printed and '== ADP-C t=0' in printed
    assert cbt.metainfo['exit_mode'] == 'cbt' and adpc.metainfo['exit_mode'] == 'global'
    # t=0: every max softmax is above it, so every pixel stops after exit 1
    assert adpc.exit_computed.tolist() == [1.0, 0.0, 0.0, 0.0] and bool((adpc.exit_map.data == 1).all())
    assert float(adpc.exit_macs[-1]) == float(adpc.exit_macs[0]) < float(cbt.exit_macs[-1])
    picture = mmcv.imread(str(out_file), channel_order='rgb')
    assert picture.shape[1] == 3 * 4 * 50  # image and two exit maps, 4 inches each at 50 dpi


def _demo_data(model, img):
    """The batch ``mmseg.apis.inference_model`` builds for one image file."""
    from mmseg.apis.utils import _preprare_data  # what inference_model runs
    data, _ = _preprare_data(img, model)
    return data
