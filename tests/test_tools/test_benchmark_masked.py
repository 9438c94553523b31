"""tools/analysis_tools/benchmark_masked*.py: the clock reaches every section, MAC ratios from the FLOPs counter,
plots from saved runs."""
import importlib
import json
import os.path as osp
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from utils import ROOT

import mmseg_cbt.utils.benchmark as bench_utils

TOOLS = osp.join(ROOT, 'tools', 'analysis_tools')


@pytest.fixture
def bench(monkeypatch):
    """benchmark_masked as the script sees itself: its folder first on sys.path (as ``python tools/...`` does)."""
    monkeypatch.syspath_prepend(TOOLS)
    for name in ('benchmark_masked', 'benchmark_masked_backbone'):
        monkeypatch.delitem(sys.modules, name, raising=False)
    return importlib.import_module('benchmark_masked')


def test_clock_reaches_every_section(bench, monkeypatch):
    """``--clock thread`` with a fake thread clock that advances exactly 1 s per reading: every section (single convs,
    whole backbones, paths) reads it, and every time it reports is then exactly 1000 ms (one call per sample, each
    sample two readings apart), so no section timed anything with another clock."""
    readings = []

    def fake_clock():
        readings.append(1)
        return float(len(readings))

    monkeypatch.setitem(bench_utils.CLOCKS, 'thread', fake_clock)
    old_threads = torch.get_num_threads()
    common = [
        '--clock', 'thread', '--threads', '1', '--models', 'W18s', '--input-size', '64', '128', '--stopped', '0', '50',
        '--repeats', '2', '--e2e-repeats', '2', '--max-foreign', '1.0', '--retries', '0', '--no-tune-malloc'
    ]
    try:
        for section, keys in (('a', ('dense_ms', 'masked_ms', 'index_build_ms')),
                              ('b', ('dense_stock_ms', 'dense_opt_ms', 'masked_ms', 'dense_234_ms', 'masked_234_ms')),
                              ('paths', ('dense_ms', 'simulate_ms', 'sparse_ms', 'sparse_rbf_ms'))):
            before = len(readings)
            rows = bench.main(['--sections', section] + common)
            assert rows and len(readings) > before, section
            for row in rows:
                for key in keys:
                    assert row[key] == pytest.approx(1000.0), (section, key, row[key])
    finally:
        torch.set_num_threads(old_threads)


def _hand_mac_ratio(backbone: nn.Module, x: torch.Tensor, active: torch.Tensor, stages_2_4_only: bool) -> float:
    """Independent count: every conv call of a dense backbone pass, transition / stage convs at their active output
    positions (nearest-resized mask), the stem and layer1 dense."""
    rec = []

    def hook(mod, inp, out, name):
        rec.append((name, tuple(out.shape[-2:]),
                    out.numel() * mod.kernel_size[0] * mod.kernel_size[1] * mod.in_channels // mod.groups))

    handles = [
        m.register_forward_hook(lambda mod, i, o, name=name: hook(mod, i, o, name))
        for name, m in backbone.named_modules() if isinstance(m, nn.Conv2d)
    ]
    with torch.no_grad():
        backbone.forward_stages(x)
    for h in handles:
        h.remove()
    dense = masked = 0.0
    for name, hw, macs in rec:
        if name.startswith(('transition', 'stage')):
            masked += macs * F.interpolate(active[:, None].float(), size=hw, mode='nearest').mean().item()
            dense += macs
        elif not stages_2_4_only:
            masked += macs
            dense += macs
    return masked / dense


def test_backbone_mac_ratios_come_from_the_flops_counter(bench):
    """The benchmark's MAC ratios (mmseg_cbt.analysis.count_flops) equal a hand count over the backbone's convs, for
    the whole backbone and for stages 2-4; a mask whose active fraction changes under nearest resizing."""
    import benchmark_masked_backbone as bb_bench
    model = bb_bench.build_model('W18s')
    x = torch.randn(1, 3, 64, 96)
    active = bench_utils.blob_mask(1, 16, 24, 0.4, seed=3)
    whole, s234 = bb_bench.mac_ratios(model, x, active)
    assert whole == pytest.approx(
        _hand_mac_ratio(model.backbone, x, active, False), rel=1e-6)  # float32 mask means in the hand count
    assert s234 == pytest.approx(
        _hand_mac_ratio(model.backbone, x, active, True), rel=1e-6)  # float32 mask means in the hand count
    assert 0.0 < s234 < whole < 1.0


def test_benchmark_plot_from_json(bench, tmp_path):
    """--plot-from draws sections a and b of saved runs into a PNG without timing anything; a later file replaces
    the earlier file's rows of the same section and model; a file without a/b rows is refused."""
    bm = bench
    a = [
        dict(section='a', model='W18s', channels=18, height=8, width=16, active_frac=f, ratio=r)
        for f, r in ((1.0, 1.0), (0.5, 0.9), (0.25, 0.5))
    ]
    b = [
        dict(section='b', model='W48', stopped=s, wall_ratio=w, mac_ratio=m)
        for s, w, m in ((0, 1.0, 1.0), (75, 0.36, 0.3))
    ]
    first, second = tmp_path / 'run1.json', tmp_path / 'run2.json'
    first.write_text(json.dumps(dict(meta={}, results=a + b)))
    second.write_text(json.dumps(dict(meta={}, results=[dict(r, ratio=r['ratio'] / 2) for r in a])))
    out = tmp_path / 'plots' / 'bench.png'
    rows = bm.main(['--plot-from', str(first), str(second), '--plot', str(out)])
    assert out.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    assert sorted(r['ratio'] for r in rows if r['section'] == 'a') == [0.25, 0.45, 0.5]  # run 2 replaced run 1's a
    assert len([r for r in rows if r['section'] == 'b']) == 2
    with pytest.raises(ValueError, match='section a or b'):
        bm.plot_results([dict(section='paths')], str(tmp_path / 'x.png'))
    with pytest.raises(SystemExit, match='--plot-from needs --plot'):
        bm.main(['--plot-from', str(first)])
