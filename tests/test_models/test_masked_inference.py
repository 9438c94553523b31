"""Masked inference: the simulated ("dense then mask") path and, where available, the sparse path against it."""
import pytest
import torch
from utils import build_tiny_model, randomise_bn

from mmseg_cbt.models.masked import FILL_MODES as FILLS
from mmseg_cbt.models.masked import forward_head_masked


@pytest.fixture(scope='module')
def model(toy_cfg):
    m = build_tiny_model(toy_cfg, exit_mode='global')
    randomise_bn(m)
    return m.eval()


def _threshold_for(model, x, stop_fraction):
    with torch.no_grad():
        p = torch.softmax(model.forward_exits(x, exit_mode='dense')[0], 1).max(1).values
    return float(torch.quantile(p.flatten(), 1 - stop_fraction))


@pytest.mark.parametrize('fill', FILLS)
def test_nothing_stopped_equals_dense(model, fill):
    x = torch.randn(2, 3, 250, 330)  # odd sizes: every branch has odd dims
    model.test_cfg.update(global_threshold=1.0, fill=fill)  # max prob never exceeds 1: nothing stops
    with torch.no_grad():
        dense = model.forward_exits(x, exit_mode='dense')
        sim = model.forward_exits(x, feature_mask='simulate')
    for d, s in zip(dense, sim):
        assert (d - s).abs().max() <= 1e-4


def test_copy_fill_keeps_stopped_features(model):
    """With 'copy', a stopped pixel of branch 0 (no transition conv) keeps its stage-2 feature through stage 3;
    with 'zeros' it is 0; active pixels see their windows' fill values only near the boundary."""
    from mmseg_cbt.models.masked import MaskContext
    bb = model.backbone
    x = torch.randn(2, 3, 128, 160)
    with torch.no_grad():
        s2 = bb.forward_stage(2, bb.forward_stage(1, [x]))
        active = torch.zeros(2, 32, 40, dtype=torch.bool)
        active[0, :, :20] = True
        active[1, 10:, 5:30] = True
        for fill, expect in (('copy', lambda t: t), ('zeros', torch.zeros_like)):
            s3 = bb.forward_stage_masked(3, list(s2), active, fill=fill)
            stopped = ~MaskContext(active).mask(s3[0].shape[-2:]).expand_as(s3[0])
            assert torch.equal(s3[0][stopped], expect(s2[0])[stopped])
            # far inside the active region nothing differs from the dense stage
            dense3 = bb.forward_stage(3, list(s2))
            assert torch.allclose(s3[0][0, :, 8:24, 2:10], dense3[0][0, :, 8:24, 2:10], atol=1e-4)


def test_simulated_masks_change_only_near_stopped_pixels(model):
    x = torch.randn(1, 3, 128, 128)
    model.test_cfg.update(global_threshold=_threshold_for(model, x, 0.5), fill='copy')
    with torch.no_grad():
        none, act_none = model.forward_exits(x, feature_mask='none', return_active=True)
        sim, act = model.forward_exits(x, feature_mask='simulate', return_active=True)
    assert 0.2 < act[1].float().mean() < 0.8
    assert torch.equal(act[1], act_none[1])  # exit 1 is dense in both: same first mask
    # logits of stopped pixels are copied from the exit where they stopped
    for n in range(1, 4):
        stopped = ~act[n].unsqueeze(1).expand_as(sim[n])
        assert torch.equal(sim[n][stopped], sim[n - 1][stopped])
    # masking the features changes the logits of active pixels next to stopped ones, not of those far away
    a = act[1][0]
    interior = a.clone()
    for dy in range(-6, 7):
        for dx in range(-6, 7):
            interior &= torch.roll(a, (dy, dx), (0, 1))
    diff = (sim[1] - none[1]).abs().amax(1)[0]
    assert diff[a].max() > 1e-3
    if interior.any():
        assert diff[interior].max() < diff[a].max()


def test_bad_fill_is_rejected(model):
    from mmseg_cbt.models.masked import MaskContext
    with pytest.raises(ValueError, match='fill'):
        MaskContext(torch.ones(1, 4, 4, dtype=torch.bool), 'nearest')
    with pytest.raises(ValueError, match='bool'):
        MaskContext(torch.ones(1, 4, 4), 'copy')


def test_masked_training_matches_simulated_inference(toy_cfg):
    """train_cfg.masked_training: nothing stopped -> the plain loss; with stops, exit 2 is trained on exactly the
    simulated masked path that inference uses (same mask rule, same fill), and gradients reach every exit."""
    from utils import demo_batch
    model = build_tiny_model(toy_cfg)
    randomise_bn(model)
    model.train()
    imgs, samples = demo_batch(19, n=2, h=64, w=96)
    plain = model.loss(imgs, samples)
    model.train_cfg = dict(masked_training=dict(exit_mode='global', global_threshold=1.0, fill='copy'))
    same = model.loss(imgs, samples)
    for k in plain:
        assert torch.equal(plain[k], same[k]), k
    # a threshold that stops about half of the pixels at exit 1 (BN in eval mode: deterministic forward)
    model.eval()
    with torch.no_grad():
        p = torch.softmax(model.forward_exits(imgs, exit_mode='dense')[0], 1).max(1).values
    thr = float(torch.quantile(p.flatten(), 0.5))
    model.train_cfg = dict(masked_training=dict(exit_mode='global', global_threshold=thr, fill='zeros'))
    losses = model.loss(imgs, samples)
    sum(v for k, v in losses.items() if 'loss' in k).backward()
    for head in model.exits:
        assert head.conv_seg.weight.grad is not None and head.conv_seg.weight.grad.abs().sum() > 0
    with torch.no_grad():
        bb = model.backbone
        f1 = bb.forward_stage(1, [imgs])
        active = ~(torch.softmax(model.exits[0](f1), 1).max(1).values > thr)
        f2 = bb.forward_stage_masked(2, f1, active, fill='zeros')
        want = model.exits[1].loss_by_feat(forward_head_masked(model.exits[1], f2, active, fill='zeros'),
                                           samples)['loss_ce']
    assert 0.3 < active.float().mean() < 0.7
    torch.testing.assert_close(losses['exit2.loss_ce'].detach(), want)
    assert not torch.equal(losses['exit2.loss_ce'].detach(), plain['exit2.loss_ce'].detach())
    model.train_cfg = dict(masked_training=dict(exit_mode='dense'))
    with pytest.raises(ValueError, match='masked_training'):
        model.loss(imgs, samples)


def _blob_mask(n, h, w, frac, seed=0):
    g = torch.Generator().manual_seed(seed)
    noise = torch.nn.functional.avg_pool2d(torch.rand(n, 1, h, w, generator=g), 5, 1, 2)[:, 0]
    return noise > torch.quantile(noise.flatten(), 1 - frac)


@pytest.mark.parametrize('fill', FILLS)
@pytest.mark.parametrize('size', ((128, 160), (250, 330)))
def test_sparse_equals_simulated_oracle(model, fill, size):
    """Every stage output (all branches, every position) and every exit's logits of the sparse path equal the
    simulated 'dense conv, then mask, same fill' path; batch of 2 images with different masks, odd sizes."""
    bb = model.backbone
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        feats = bb.forward_stage(1, [x])
        h4, w4 = feats[0].shape[-2:]
        active = _blob_mask(2, h4, w4, 0.4, seed=1)
        active[1] = _blob_mask(1, h4, w4, 0.25, seed=2)[0]
        sim_f, sp_f = feats, feats
        for stage in (2, 3, 4):
            sim_f = bb.forward_stage_masked(stage, sim_f, active, sparse=False, fill=fill)
            sp_f = bb.forward_stage_masked(stage, sp_f, active, sparse=True, fill=fill)
            for a, b in zip(sim_f, sp_f):
                assert a.shape == b.shape
                assert (a - b).abs().max() <= 1e-4, (stage, fill)
            head = model.exits[stage - 1]
            la = forward_head_masked(head, sim_f, active, sparse=False, fill=fill)
            lb = forward_head_masked(head, sp_f, active, sparse=True, fill=fill)
            assert (la - lb).abs().max() <= 1e-4
            active = active & _blob_mask(2, h4, w4, 0.7, seed=stage)


def test_sparse_segmentor_matches_simulated(model):
    x = torch.randn(2, 3, 128, 192)
    model.test_cfg.update(global_threshold=_threshold_for(model, x, 0.6), fill='copy')
    with torch.no_grad():
        sim, a1 = model.forward_exits(x, feature_mask='simulate', return_active=True)
        sp, a2 = model.forward_exits(x, feature_mask='sparse', return_active=True)
        model.test_cfg.global_threshold = 1.0
        dense = model.forward_exits(x, exit_mode='dense')
        nothing = model.forward_exits(x, feature_mask='sparse')
    for a, b in zip(a1[1:], a2[1:]):
        assert torch.equal(a, b)
    for a, b in zip(sim, sp):
        assert (a - b).abs().max() <= 1e-4
    for a, b in zip(dense, nothing):
        assert (a - b).abs().max() <= 1e-4


def test_sparse_rejects_training_and_bad_fill(model):
    bb = model.backbone
    feats = [torch.randn(1, 64, 16, 16)]
    active = torch.ones(1, 16, 16, dtype=torch.bool)
    active[:, :4] = False
    with pytest.raises(ValueError, match='fill'):
        bb.forward_stage_masked(2, feats, active, sparse=True, fill='nearest')
    bb.train()
    try:
        with pytest.raises(RuntimeError, match='inference-only'):
            bb.forward_stage_masked(2, feats, active, sparse=True, fill='copy')
    finally:
        bb.eval()


def test_optimized_model_sparse_equals_unfused_oracle(model):
    """optimize_for_inference (BN folded into the convs, channels-last) keeps the dense outputs, and the sparse
    path on the folded model (BNs replaced by Identity) equals the simulated oracle of the original model."""
    import copy

    from mmseg_cbt.utils import optimize_for_inference
    opt = optimize_for_inference(copy.deepcopy(model))
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in opt.backbone.modules())
    x = torch.randn(2, 3, 250, 330)
    with torch.no_grad():
        for a, b in zip(model.forward_exits(x, exit_mode='dense'), opt.forward_exits(x, exit_mode='dense')):
            assert (a - b).abs().max() <= 1e-4
        feats = model.backbone.forward_stage(1, [x])
        feats_o = opt.backbone.forward_stage(1, [x.contiguous(memory_format=torch.channels_last)])
        h4, w4 = feats[0].shape[-2:]
        active = _blob_mask(2, h4, w4, 0.4, seed=3)
        for stage in (2, 3, 4):
            feats = model.backbone.forward_stage_masked(stage, feats, active, sparse=False, fill='copy')
            feats_o = opt.backbone.forward_stage_masked(stage, feats_o, active, sparse=True, fill='copy')
            for a, b in zip(feats, feats_o):
                assert (a - b).abs().max() <= 1e-4, stage
            la = forward_head_masked(model.exits[stage - 1], feats, active, sparse=False)
            lb = forward_head_masked(opt.exits[stage - 1], feats_o, active, sparse=True)
            assert (la - lb).abs().max() <= 1e-4
    model.train()
    try:
        with pytest.raises(RuntimeError, match='eval'):
            optimize_for_inference(model)
    finally:
        model.eval()


def test_tune_malloc_is_idempotent():
    import sys

    from mmseg_cbt.utils import tune_malloc
    first = tune_malloc()
    assert isinstance(first, bool) and tune_malloc() is first
    if sys.platform.startswith('linux') and 'glibc' in ' '.join(__import__('platform').libc_ver()):
        assert first
    big = torch.ones(40 << 20, dtype=torch.uint8)  # > glibc's largest mmap threshold: served from the heap now
    assert int(big.sum()) == 40 << 20


def test_sparse_rbf_support_tables():
    """rbf in the sparse path: the fill is computed on its support only (stopped positions within Chebyshev
    distance 3 of an active one), with ADP-C's normalised kernel weights; the rest of the stopped positions are the
    'far' rows that hold 0."""
    from mmseg_cbt.models.masked import rbf_kernel
    from mmseg_cbt.models.masked.sparse_context import SparseContext
    active = torch.zeros(1, 9, 11, dtype=torch.bool)
    active[0, 4, 5] = True  # one active pixel in the middle
    active[0, 0, 0] = True  # and one in the corner (window clipped by the border)
    ctx = SparseContext(active, 'rbf')
    mat, support_rows, far_rows = ctx.rbf_tables((9, 11))
    dense = mat.to_dense()
    wp = 13
    grid = torch.zeros(9, 11, dtype=torch.long)
    grid.view(-1)[:] = torch.arange(99)
    expect = set()
    for y in range(9):
        for x in range(11):
            if not active[0, y, x] and (max(abs(y - 4), abs(x - 5)) <= 3 or max(y, x) <= 3):
                expect.add((y + 1) * wp + x + 1)
    assert set(support_rows.tolist()) == expect
    assert support_rows.numel() + far_rows.numel() + 2 == 99
    k = rbf_kernel()
    rows = {r: i for i, r in enumerate(support_rows.tolist())}
    # index order of the active pixels: (0, 0) first, then (4, 5)
    assert torch.isclose(dense[rows[(3 + 1) * wp + 5 + 1], 1], k[3 + 1, 3 + 0])  # q=(3,5) reads p=(4,5) at d=(1,0)
    assert torch.isclose(dense[rows[(2 + 1) * wp + 1 + 1], 0], k[3 - 2, 3 - 1])  # q=(2,1) reads p=(0,0) at d=(-2,-1)
    assert dense[rows[(2 + 1) * wp + 1 + 1], 1] == 0  # (2,1) is 4 columns from (4,5): out of its window
    assert torch.isclose(dense.sum(), k.sum() * 2 - (k.sum() - k[3:, 3:].sum()))  # the corner pixel's clipped window


def test_report_tool_optimize_keeps_results(toy_cfg, tiny_city, tmp_path):
    """tools/analysis_tools/miou_vs_gflops.py --optimize (tune_malloc + BN folding + channels-last) gives the same
    mIoU and GFLOPs per exit as without it, with sparse masked inference, and says so in its report."""
    import importlib.util
    import os.path as osp

    from utils import ROOT, tiny_run_cfg
    spec = importlib.util.spec_from_file_location('miou_tool',
                                                  osp.join(ROOT, 'tools', 'analysis_tools', 'miou_vs_gflops.py'))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    cfg = tiny_run_cfg(toy_cfg, tiny_city, tmp_path / 'run')
    cfg_file = str(tmp_path / 'cfg.py')
    cfg.dump(cfg_file)
    model = build_tiny_model(toy_cfg)
    randomise_bn(model)
    ckpt = str(tmp_path / 'model.pth')
    torch.save({'state_dict': model.state_dict(), 'meta': {}}, ckpt)
    common = [
        cfg_file, ckpt, '--settings', 'dense', 'adpc:0.06', '--max-images', '3', '--device', 'cpu', '--feature-mask',
        'sparse'
    ]
    plain = tool.main(common + ['--out-dir', str(tmp_path / 'plain')])
    opt = tool.main(common + ['--out-dir', str(tmp_path / 'opt'), '--optimize'])
    assert plain['optimized'] is False and opt['optimized'] is True
    assert 'optimize_for_inference' in opt['note']
    for a, b in zip(plain['rows'], opt['rows']):
        for ea, eb in zip(a['exits'], b['exits']):
            assert abs(ea['mIoU'] - eb['mIoU']) <= 1e-6
            assert ea['gflops_2_30'] == eb['gflops_2_30']
    stopped = plain['rows'][1]['exits']
    assert stopped[-1]['gflops_2_30'] < plain['rows'][0]['exits'][-1]['gflops_2_30']  # the masks stop something


def test_sparse_max_active_switches_to_simulated(model, monkeypatch):
    """feature_mask='sparse' runs a stage/exit sparsely only while at most test_cfg.sparse_max_active of the pixels
    are active (the simulated path, same semantics, is faster above); both give the same logits."""
    x = torch.randn(1, 3, 128, 192)
    bb = model.backbone
    calls = []
    import mmseg_cbt.models.segmentors.early_exit_encoder_decoder as eed
    orig_stage, orig_head = bb.forward_stage_masked, eed.forward_head_masked

    def stage(stage_idx, feats, active, sparse=False, fill='copy'):
        calls.append(('stage', round(float(active.float().mean()), 4), sparse))
        return orig_stage(stage_idx, feats, active, sparse=sparse, fill=fill)

    def head(h, feats, active, sparse=False, fill='copy'):
        calls.append(('head', round(float(active.float().mean()), 4), sparse))
        return orig_head(h, feats, active, sparse=sparse, fill=fill)

    monkeypatch.setattr(bb, 'forward_stage_masked', stage)
    monkeypatch.setattr(eed, 'forward_head_masked', head)
    model.test_cfg.update(global_threshold=_threshold_for(model, x, 0.5), fill='copy')
    results = {}
    try:
        for limit in (1.0, 0.0, 0.45):
            calls.clear()
            model.test_cfg.sparse_max_active = limit
            with torch.no_grad():
                results[limit] = model.forward_exits(x, feature_mask='sparse')
            assert calls and all(sparse == (frac <= limit) for _, frac, sparse in calls), (limit, calls)
    finally:
        model.test_cfg.pop('sparse_max_active', None)
    assert any(s for _, _, s in calls) or all(f > 0.45 for _, f, _ in calls)
    for a, b in zip(results[1.0], results[0.0]):
        assert (a - b).abs().max() <= 1e-4


@pytest.mark.parametrize('fill', ('copy', 'rbf'))
def test_sparse_equals_oracle_on_both_cpu_paths(model, fill, monkeypatch):
    """The masked stages through the compiled CPU kernel (default) and through the pure-PyTorch path
    (MMSEG_CBT_CPU_EXT=0) both equal the simulated oracle at every position (250x330, batch 2)."""
    from utils import require_cpu_ext
    require_cpu_ext()
    bb = model.backbone
    x = torch.randn(2, 3, 250, 330)
    outs = {}
    with torch.no_grad():
        feats = bb.forward_stage(1, [x])
        h4, w4 = feats[0].shape[-2:]
        active = _blob_mask(2, h4, w4, 0.35, seed=4)
        for env in ('1', '0', 'oracle'):
            monkeypatch.setenv('MMSEG_CBT_CPU_EXT', '0' if env == '0' else '1')
            f = feats
            for stage in (2, 3, 4):
                f = bb.forward_stage_masked(stage, f, active, sparse=env != 'oracle', fill=fill)
            outs[env] = f
    for a, b, c in zip(outs['1'], outs['0'], outs['oracle']):
        assert (a - c).abs().max() <= 1e-4 and (b - c).abs().max() <= 1e-4


def test_sparse_max_active_default_follows_cpu_kernel(model, monkeypatch):
    """Default limit: 0.9 active when CPU tensors run the compiled kernel with its direct algorithm, 0.8 with its
    GEMM algorithm only (the measured crossovers against the simulated path), 0.6 with the PyTorch path alone; an
    explicit test_cfg value wins."""
    from utils import require_cpu_ext
    ext = require_cpu_ext()
    active = torch.zeros(1, 10, 10, dtype=torch.bool)
    model.test_cfg.pop('sparse_max_active', None)
    active.view(-1)[:85] = True  # 85 % active
    assert model._use_sparse(active, 'sparse') == ext.has_direct()
    from mmseg_cbt.ops import cpu_algorithm
    with cpu_algorithm('gemm'):  # GEMM algorithm only
        assert not model._use_sparse(active, 'sparse')
        active.view(-1)[70:] = False  # 70 %
        assert model._use_sparse(active, 'sparse')
    assert not model._use_sparse(active, 'simulate')
    monkeypatch.setenv('MMSEG_CBT_CPU_EXT', '0')
    assert not model._use_sparse(active, 'sparse')
    active.view(-1)[55:] = False
    assert model._use_sparse(active, 'sparse')  # 55 %
    model.test_cfg.sparse_max_active = 0.5
    try:
        assert not model._use_sparse(active, 'sparse')
    finally:
        model.test_cfg.pop('sparse_max_active', None)
