"""GFLOPs counter (mmseg_cbt.analysis.flops) and tools/analysis_tools/get_flops.py.

The tiny toy model at 128x256 is counted three independent ways: by hand from its layer shapes (below), with
our hook counter, and with mmengine's counter; the masked counts are checked against hand-made masks whose
active regions stay exact fractions at every branch resolution under nearest resizing.
"""
import importlib.util
import json
import os
import os.path as osp
from typing import List, Tuple

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from utils import ROOT, build_tiny_model

H, W = 128, 256  # input; the branches are at 1/4 .. 1/32 of it
R0, R1, R2, R3 = (32, 64), (16, 32), (8, 16), (4, 8)
K = 19  # classes of the toy config
W48_EE_CONFIG = osp.join(ROOT, 'configs', 'ee_hrnet', 'ee-fcn_hr48_4xb2-80k_cityscapes-512x1024.py')

Conv = Tuple[int, int, int, Tuple[int, int]]  # (C_in, C_out, kernel, output (h, w))


def _macs(convs: List[Conv]) -> int:
    return sum(cin * cout * k * k * hw[0] * hw[1] for cin, cout, k, hw in convs)


def _fill(convs: List[Conv], p: float) -> float:
    # ADP-C's RBF fill charge per masked conv: (1 - p) p C_out 49 H W
    return sum((1 - p) * p * cout * 49 * hw[0] * hw[1] for _, cout, _, hw in convs)


def _basic_branches(chans, sizes) -> List[Conv]:
    # one BasicBlock per branch: two 3x3 convs C->C at the branch resolution
    return [(c, c, 3, hw) for c, hw in zip(chans, sizes) for _ in range(2)]


# The toy model's convs at 128x256, written out from the config (HRNet widths 8/16/32/64, one block per branch,
# bottleneck stage 1 of width 16 (-> 64), RH exits of width 32, FCN head of width 120), per exit: (stage, head).
HAND = {
    1: (
        [
            (3, 64, 3, (64, 128)),
            (64, 64, 3, R0),  # stem: two stride-2 3x3 convs
            (64, 16, 1, R0),
            (16, 16, 3, R0),
            (16, 64, 1, R0)
        ],  # layer1 bottleneck (64 == 16 * 4: no downsample)
        [
            (64, 32, 1, R1),
            (32, 32, 1, R2),
            (32, 32, 1, R3),  # 3 down steps
            (32, 32, 1, R2),
            (32, 32, 1, R1),  # 2 up steps
            (32, K, 1, R0)
        ]),  # classifier after the last upsample
    2: (
        [(64, 8, 3, R0), (64, 16, 3, R1)]  # transition1: 64 -> 8 at 1/4, new branch 64 -> 16 stride 2
        + _basic_branches((8, 16), (R0, R1)) + [
            (16, 8, 1, R1),  # fuse into branch 0: 1x1 at the source resolution, then upsampled
            (8, 16, 3, R1)
        ],  # fuse into branch 1: 3x3 stride 2
        [(24, 32, 1, R1), (32, 32, 1, R2), (32, 32, 1, R1), (32, K, 1, R0)]),
    3: (
        [(16, 32, 3, R2)]  # transition2: only the new branch
        + _basic_branches((8, 16, 32), (R0, R1, R2)) + [
            (16, 8, 1, R1),
            (32, 8, 1, R2),  # -> branch 0
            (8, 16, 3, R1),
            (32, 16, 1, R2),  # -> branch 1
            (8, 8, 3, R1),
            (8, 32, 3, R2),
            (16, 32, 3, R2)
        ],  # -> branch 2 (two stride-2 steps from branch 0)
        [(56, 32, 1, R1), (32, K, 1, R0)]),
    4: (
        [(32, 64, 3, R3)]  # transition3
        + _basic_branches((8, 16, 32, 64), (R0, R1, R2, R3)) + [(16, 8, 1, R1), (32, 8, 1, R2), (64, 8, 1, R3),
                                                                (8, 16, 3, R1), (32, 16, 1, R2), (64, 16, 1, R3),
                                                                (8, 8, 3, R1), (8, 32, 3, R2), (16, 32, 3, R2),
                                                                (64, 32, 1, R3), (8, 8, 3, R1), (8, 8, 3, R2),
                                                                (8, 64, 3, R3), (16, 16, 3, R2), (16, 64, 3, R3),
                                                                (32, 64, 3, R3)],
        [(120, 120, 1, R0), (120, K, 1, R0)]),  # FCNHead: one 1x1 conv + classifier
}


def _unit(e: int) -> List[Conv]:
    return HAND[e][0] + HAND[e][1]


@pytest.fixture(scope='module')
def tiny(toy_cfg):
    return build_tiny_model(toy_cfg).eval()


class _ExitPrefix(nn.Module):
    """Runs stages 1..n and exits 1..n and returns all their logits (so mmengine's jit trace keeps them)."""

    def __init__(self, seg: nn.Module, n: int) -> None:
        super().__init__()
        self.seg = seg
        self.n = n

    def forward(self, x):
        feats, outs = [x], []
        for i in range(self.n):
            feats = self.seg.backbone.forward_stage(i + 1, feats)
            outs.append(self.seg.exits[i](feats))
        return tuple(outs)


def test_dense_counts_by_hand(tiny):
    from mmseg_cbt.analysis import count_flops
    res = count_flops(tiny, torch.randn(2, 3, H, W), exit_mode='dense')
    assert res.early_exit and res.num_images == 2 and res.input_shapes == [(H, W), (H, W)]
    running = 0
    for e in (1, 2, 3, 4):
        ex = res.exits[e - 1]
        only = _macs(_unit(e))
        running += only
        assert ex.exit == e
        assert ex.macs_exit_only_per_image == [only, only]  # exact integers, every image
        assert ex.macs_per_image == [running, running]  # cumulative = running sum
        assert ex.backbone_macs_per_image == [_macs(HAND[e][0])] * 2
        assert ex.macs == running and ex.macs_exit_only == only
        assert ex.fill_macs_per_image == [0, 0]
        # units, both always present
        assert ex.gflops_1e9 == running / 1e9 and ex.gflops_2_30 == running / 2**30
        assert ex.gflops_exit_only_1e9 == only / 1e9 and ex.gflops_exit_only_2_30 == only / 1024**3
    # parameters: per exit they add up to everything that runs at inference
    n_params = sum(p.numel() for p in tiny.parameters())
    assert res.total.params == n_params and sum(e.params_exit_only for e in res.exits) == n_params
    d = res.to_dict()
    assert [x['exit'] for x in d['exits']] == [1, 2, 3, 4]
    assert d['total']['macs'] == res.exits[-1].macs and d['units']['gflops_2_30'] == 'MACs / 2**30'
    assert d['exits'][2]['gflops_2_30_per_image'] == [res.exits[2].macs / 2**30] * 2
    table = res.table(per_exit=True)
    assert 'GFLOPs (1e9)' in table and 'GFLOPs (2^30)' in table and 'exit only' in table


def test_dense_equals_mmengine(tiny):
    """Our hook count == the conv+linear part of what mmengine's get_model_complexity_info counts, per exit."""
    from mmengine.analysis import FlopAnalyzer, get_model_complexity_info

    from mmseg_cbt.analysis import MMENGINE_CONV_LINEAR_OPS, count_flops
    x = torch.randn(1, 3, H, W)
    ours = [e.macs for e in count_flops(tiny, x, exit_mode='dense').exits]
    # mmengine on stage-wise wrappers (exit n = stages 1..n + heads 1..n), by operator. (The one-trace variant,
    # mmengine_exit_macs, is checked in test_tool_tiny_json through --check-mmengine.)
    for n in (4, 3, 2, 1):
        prefix = _ExitPrefix(tiny, n).eval()
        with torch.no_grad():
            analyzer = FlopAnalyzer(prefix, (x, ))
            analyzer.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
            by_op = analyzer.by_operator()
        # mmengine also counts BN and upsampling, which the papers' convention leaves out ...
        assert by_op['batch_norm'] > 0 and by_op['upsample_bilinear2d'] > 0
        # ... its conv/linear part is exactly ours (and the hand count)
        assert sum(by_op.get(op, 0) for op in MMENGINE_CONV_LINEAR_OPS) == ours[n - 1] == _macs(
            sum((_unit(e) for e in range(1, n + 1)), []))
    # and the number get_model_complexity_info reports is that analyzer's total (same engine, same trace; checked
    # on the cheapest wrapper, exit 1, which also has BN and upsampling)
    with torch.no_grad():
        info = get_model_complexity_info(prefix, inputs=(x, ), show_table=False, show_arch=False)
    assert info['flops'] == sum(by_op.values())


def _block(top: int, left: int, bottom: int, right: int) -> torch.Tensor:
    m = torch.zeros(R0, dtype=torch.bool)
    m[top:bottom, left:right] = True
    return m


# Hand-made masks at 1/4 resolution (32x64), cumulative like the model's. Every active region is a block whose
# edges fall on multiples of 8 rows / 8 columns, so nearest resizing to 16x32, 8x16 and 4x8 keeps the same active
# fraction at every conv output: image 0: 1/4 then 1/16, 1/16; image 1: all, then 1/2, then 1/4.
ACTIVES = [
    None,
    torch.stack([_block(0, 0, 16, 32), _block(0, 0, 32, 64)]),
    torch.stack([_block(0, 0, 8, 16), _block(0, 0, 16, 64)]),
    torch.stack([_block(0, 0, 8, 16), _block(0, 0, 16, 32)]),
]
P = {2: (1 / 4, 1.0), 3: (1 / 16, 1 / 2), 4: (1 / 16, 1 / 4)}  # fraction still computed, per exit and image


def test_masked_counts_by_hand(toy_cfg, monkeypatch):
    from mmseg_cbt.analysis import count_flops
    model = build_tiny_model(toy_cfg, fill='rbf').eval()
    dense_forward = model.forward_exits

    def fake_forward_exits(inputs, exit_mode=None, feature_mask=None, return_active=False):
        # the real (dense) network runs, so the counter's hooks see it; the masks are ours
        logits = dense_forward(inputs, exit_mode='dense', feature_mask='none')
        return (logits, ACTIVES) if return_active else logits

    monkeypatch.setattr(model, 'forward_exits', fake_forward_exits)
    x = torch.randn(2, 3, H, W)
    results = {
        # fill from test_cfg, masks from the (patched) model
        'rbf': count_flops(model, x, exit_mode='global'),
        # fill overridden, masks passed directly
        'copy': count_flops(model, x, exit_mode='global', fill='copy', actives=ACTIVES),
        'zeros': count_flops(model, x, exit_mode='global', fill='zeros', actives=ACTIVES),
    }
    for fill, res in results.items():
        assert res.fill == fill and res.exit_mode == 'global'
        want_cum = [_macs(_unit(1))] * 2
        assert res.exits[0].macs_exit_only_per_image == want_cum  # stage 1 and exit 1 are always dense
        for e in (2, 3, 4):
            want_only = []
            for img in (0, 1):
                p = P[e][img]
                extra = _fill(_unit(e), p) if fill == 'rbf' else 0.0  # 'copy' and 'zeros' cost nothing
                want_only.append(_macs(_unit(e)) * p + extra)
                want_cum[img] = want_cum[img] + want_only[-1]
                assert res.exits[e - 1].fill_macs_per_image[img] == pytest.approx(extra, rel=1e-12, abs=1e-9)
            ex = res.exits[e - 1]
            assert ex.macs_exit_only_per_image == pytest.approx(want_only, rel=1e-12)
            assert ex.macs_per_image == pytest.approx(want_cum, rel=1e-12)
            assert ex.macs == pytest.approx(sum(want_cum) / 2, rel=1e-12)  # mean over the batch
            assert ex.gflops_1e9 == pytest.approx(sum(want_cum) / 2 / 1e9, rel=1e-12)
            assert ex.gflops_2_30 == pytest.approx(sum(want_cum) / 2 / 2**30, rel=1e-12)
    rbf = results['rbf']
    assert rbf.exits[1].fill_macs_per_image[1] == 0  # p = 1: nothing to fill
    assert rbf.exits[3].fill_macs_per_image[0] > 0
    # spot check one term by hand: exit 4's classifier (19 x 32 x 64 outputs) at p = 1/16 for image 0
    assert _fill([(120, K, 1, R0)], 1 / 16) == (15 / 16) * (1 / 16) * K * 49 * 32 * 64


def test_global_threshold_extremes(toy_cfg):
    """Real stop masks: threshold 1 stops nothing (= dense), threshold 0 stops everything after exit 1."""
    from mmseg_cbt.analysis import count_flops
    model = build_tiny_model(toy_cfg).eval()
    x = torch.randn(1, 3, 64, 128)
    dense = [e.macs_per_image for e in count_flops(model, x, exit_mode='dense').exits]
    model.test_cfg['global_threshold'] = 1.0
    none_stop = count_flops(model, x, exit_mode='global')
    for got, want in zip(none_stop.exits, dense):
        assert got.macs_per_image == pytest.approx(want, rel=1e-12)
    model.test_cfg['global_threshold'] = 0.0
    all_stop = count_flops(model, x, exit_mode='global')
    assert [e.macs_per_image for e in all_stop.exits] == [dense[0]] * 4
    assert all(v == 0 for e in all_stop.exits[1:] for v in e.macs_exit_only_per_image)


def test_average_over_dataloader(tiny, monkeypatch):
    import mmengine.utils
    from mmengine.structures import PixelData

    from mmseg.structures import SegDataSample

    from mmseg_cbt.analysis import average_flops, count_flops

    def batch(n, h, w):
        imgs = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8) for _ in range(n)]
        samples = [
            SegDataSample(
                gt_sem_seg=PixelData(data=torch.zeros(1, h, w, dtype=torch.long)),
                metainfo=dict(img_shape=(h, w), ori_shape=(h, w))) for _ in range(n)
        ]
        return dict(inputs=imgs, data_samples=samples)

    class Loader:
        dataset = [None] * 3  # what the progress bar sizes itself from

        def __iter__(self):
            yield batch(2, 64, 96)
            yield batch(1, 96, 128)

    updates = []

    class RecordingBar(mmengine.utils.ProgressBar):

        def update(self, num_tasks=1):
            updates.append(num_tasks)
            super().update(num_tasks)

    monkeypatch.setattr(mmengine.utils, 'ProgressBar', RecordingBar)
    res = average_flops(tiny, Loader(), exit_mode='dense')
    a = count_flops(tiny, torch.zeros(1, 3, 64, 96)).exits
    b = count_flops(tiny, torch.zeros(1, 3, 96, 128)).exits
    assert res.num_images == 3 and res.input_shapes == [(64, 96), (64, 96), (96, 128)]
    for e in range(4):
        per = [a[e].macs, a[e].macs, b[e].macs]
        assert res.exits[e].macs_per_image == per
        assert res.exits[e].macs == pytest.approx(sum(per) / 3, rel=1e-15)
    assert updates == [2, 1]  # the progress bar advanced per image
    one = average_flops(tiny, Loader(), exit_mode='dense', max_images=1, progress=False)
    assert one.num_images == 1 and one.exits[0].macs_per_image == [a[0].macs]


def test_attribution_and_meta_device(tiny):
    from mmseg_cbt.analysis import attribute_module, count_flops
    assert attribute_module('backbone.conv1', tiny) == (1, 'backbone')
    assert attribute_module('backbone.bn2.weight', tiny) == (1, 'backbone')  # stem norms: parameters of stage 1
    assert attribute_module('backbone.layer1.0.conv2', tiny) == (1, 'backbone')
    assert attribute_module('backbone.transition1.1.0', tiny) == (2, 'backbone')
    assert attribute_module('backbone.stage3.0.fuse_layers.2.0.0.conv', tiny) == (3, 'backbone')
    assert attribute_module('backbone.stage30', tiny) is None  # a prefix match needs the dot
    assert attribute_module('exit_heads.2.conv_seg', tiny) == (3, 'head')
    assert attribute_module('decode_head.convs.0.conv', tiny) == (4, 'head')
    assert attribute_module('auxiliary_head.conv_seg', tiny) is None
    # odd input size; the meta device (no arithmetic) gives the same integers as a real pass
    cpu = count_flops(tiny, torch.zeros(1, 3, 67, 131))
    import copy
    meta = count_flops(copy.deepcopy(tiny).to('meta'), torch.zeros(1, 3, 67, 131, device='meta'))
    assert [e.macs_per_image for e in meta.exits] == [e.macs_per_image for e in cpu.exits]


def _load_tool():
    spec = importlib.util.spec_from_file_location('get_flops_tool',
                                                  osp.join(ROOT, 'tools', 'analysis_tools', 'get_flops.py'))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_tool_tiny_json(tmp_path, capsys):
    tool = _load_tool()
    out = tmp_path / 'sub' / 'flops.json'
    cfg_file = osp.join(ROOT, 'configs', 'ee_hrnet', 'ee-fcn_hr-tiny_1xb4-1k_toycity-256x512.py')
    ret = tool.main([cfg_file, '--shape', str(H), str(W), '--per-exit', '--json', str(out), '--check-mmengine'])
    printed = capsys.readouterr().out
    assert 'GFLOPs (2^30)' in printed and 'EQUAL' in printed and 'exit only' in printed
    data = json.loads(out.read_text())
    assert data == json.loads(json.dumps(ret))
    assert os.listdir(out.parent) == ['flops.json']  # no temporary file left behind
    assert data['shape'] == [H, W] and data['mmengine_equal'] is True
    assert [e['exit'] for e in data['exits']] == [1, 2, 3, 4]
    assert data['mmengine_macs'] == [e['macs'] for e in data['exits']]
    for got in data['exits']:
        want = _macs(sum((_unit(e) for e in range(1, got['exit'] + 1)), []))  # cumulative, by hand
        assert got['macs'] == want and got['gflops_1e9'] == want / 1e9 and got['gflops_2_30'] == want / 2**30
    assert data['total']['macs'] == data['exits'][-1]['macs']


def test_tool_w48_matches_published(capsys):
    """Dense W48 at 2048x1024 on the meta device (seconds): ADP-C's 41.9/105.6/368.0/701.3 and HRNetV2's 696.2."""
    tool = _load_tool()
    ee = tool.main([W48_EE_CONFIG, '--shape', '1024', '2048'])
    pub = [41.9, 105.6, 368.0, 701.3]
    assert [e['exit'] for e in ee['exits']] == [1, 2, 3, 4]
    for e, p in zip(ee['exits'], pub):
        assert e['gflops_2_30'] == pytest.approx(p, rel=0.015)
    assert [r['published_gflops_2_30'] for r in ee['reference']['rows']] == pub
    plain = tool.main(['mmseg::hrnet/fcn_hr48_4xb2-80k_cityscapes-512x1024.py', '--shape', '1024', '2048'])
    assert plain['exits'] == [] and plain['early_exit'] is False
    assert plain['total']['gflops_2_30'] == pytest.approx(696.2, rel=0.015)
    assert plain['reference']['rows'][0]['published_gflops_2_30'] == 696.2
    printed = capsys.readouterr().out
    assert 'rel. diff' in printed and 'total' in printed


def test_group_fractions_equal_the_nearest_resized_mask_mean():
    """The grouped fractions equal the mean of the mask resized with nearest interpolation, bit for bit."""
    from mmseg_cbt.analysis import EarlyExitFlopCounter
    gen = torch.Generator().manual_seed(0)
    active = torch.rand(2, 16, 24, generator=gen) < 0.4
    sizes = [(16, 24), (8, 12), (4, 6), (7, 9), (32, 48), (5, 24), ()]
    positional = {(1, hw): None for hw in sizes}
    got = EarlyExitFlopCounter._group_fractions(positional, [None, active])
    for hw in sizes:
        m = active.float().unsqueeze(1)
        if hw:
            m = F.interpolate(m, size=hw, mode='nearest')
        assert got[1, hw] == m.flatten(1).double().mean(dim=1).tolist(), hw
    assert EarlyExitFlopCounter._group_fractions(positional, [None, None]) == {}
