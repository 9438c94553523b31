"""EarlyExitViT: mmseg checkpoint compatibility, real token removal against the simulated oracle, stop rules."""
import pytest
import torch
from utils import TOY_VIT_ATM_CONFIG, TOY_VIT_CONFIG, build_tiny_vit, demo_batch, train_tiny_vit

TOL = 1e-4
# not a multiple of the patch size (8): the patch embedding pads to a 8 x 12 grid
H, W = 60, 90


def _vit_kwargs():
    return dict(img_size=(64, 64), patch_size=8, embed_dims=64, num_layers=6, num_heads=4, final_norm=True)


def test_strict_load_and_same_forward_as_mmseg_vit():
    """The state dict of mmseg's VisionTransformer loads strictly; the stages reproduce its outputs."""
    from mmseg.models.backbones import VisionTransformer

    from mmseg_cbt.models.backbones import EarlyExitViT
    torch.manual_seed(0)
    ref = VisionTransformer(out_indices=(1, 3, 5), **_vit_kwargs())
    ref.init_weights()
    ref.eval()
    vit = EarlyExitViT(exit_after=(1, 3, 5), **_vit_kwargs())
    vit.load_state_dict(ref.state_dict(), strict=True)
    assert set(vit.state_dict()) == set(ref.state_dict())
    vit.eval()
    x = torch.randn(2, 3, H, W)
    with torch.no_grad():
        outs = ref(x)
        states = vit.forward_stages(x)
    assert states[0].hw == (8, 12)
    for o, s in zip(outs, states):
        assert (o - s.feature_map()).abs().max() <= TOL
    # every parameter belongs to exactly one stage
    names = [n for s in range(1, 4) for n in vit.stage_modules(s)]
    for p in dict(vit.named_parameters()):
        assert sum(p == n or p.startswith(n + '.') for n in names) == 1, p
    with pytest.raises(ValueError, match='exit_after'):
        EarlyExitViT(exit_after=(1, 3, 4), **_vit_kwargs())


def _masks(model, x, frac=(0.4, 0.7), seed=0):
    """Per-image random grid masks with different active fractions."""
    g = torch.Generator().manual_seed(seed)
    state = model.backbone.forward_stage(1, [x])
    h, w = state.hw
    return state, torch.stack([torch.rand(h, w, generator=g) < f for f in frac])


@pytest.mark.parametrize('max_waste', [1.0, float('inf')], ids=['per-image-attention', 'padded-attention'])
def test_pruned_blocks_equal_dense_and_oracle(max_waste, monkeypatch):
    """Nothing stopped: the pruned blocks equal mmseg's dense blocks. With stopped tokens (batch 2, different
    counts, through both attention layouts): every active token equals the simulated oracle, and stopped tokens
    keep their features."""
    from mmseg_cbt.models.masked import vit_tokens
    from mmseg_cbt.models.masked.vit_tokens import simulated_blocks, sparse_blocks, token_keep
    monkeypatch.setattr(vit_tokens, 'PADDED_ATTENTION_MAX_WASTE', max_waste)
    frac = (0.4, 0.7)
    model = build_tiny_vit()
    vit = model.backbone
    x = torch.randn(2, 3, H, W)
    with torch.no_grad():
        state, active = _masks(model, x, frac)
        layers = [vit.layers[i] for i in vit.stage_blocks(2)]
        dense = state.tokens
        for layer in layers:  # mmseg's own block forward
            dense = layer(dense)
        assert (vit.forward_stage(2, state).tokens - dense).abs().max() <= TOL
        all_keep = torch.ones(state.tokens.shape[:2], dtype=torch.bool)
        assert (sparse_blocks(layers, state.tokens, all_keep) - dense).abs().max() <= TOL
        keep = token_keep(state, active)
        assert keep[:, 0].all() and keep.sum(1)[0] != keep.sum(1)[1]
        assert vit_tokens.padded_attention_waste(keep.sum(1).tolist()) > 1.0
        sparse = sparse_blocks(layers, state.tokens, keep)
        oracle = simulated_blocks(layers, state.tokens, keep)
        assert (sparse - oracle).abs().max() <= TOL
        assert torch.equal(sparse[~keep], state.tokens[~keep])
        assert torch.equal(oracle[~keep], state.tokens[~keep])
        # a stopped token is no key: changing it changes no active token
        poked = state.tokens.clone()
        poked[~keep] += 10.0
        assert (sparse_blocks(layers, poked, keep)[keep] - sparse[keep]).abs().max() <= TOL
        # the last stage applies final_norm to active tokens only
        last = vit.forward_stage_masked(3, state, active, sparse=True)
        assert (last.tokens - vit.forward_stage_masked(3, state, active, sparse=False).tokens).abs().max() <= TOL
        assert last.sparse and torch.equal(last.active, active)


@pytest.mark.parametrize('config', [TOY_VIT_CONFIG, TOY_VIT_ATM_CONFIG], ids=['token-head', 'atm-head'])
@pytest.mark.parametrize('mode', ['global', 'dtop'])
def test_segmentor_sparse_equals_simulated(mode, config):
    """Every exit's scores and the stop masks of the pruned path equal the simulated oracle's (batch 2, input not
    a multiple of the patch size), with per-token exits and with DToP's attention-to-mask head at every exit;
    stopped tokens keep the scores of their exit; nothing stopped = dense."""
    from mmseg_cbt.models.masked.vit_stop_rules import exit_scores
    model = build_tiny_vit(config=config)
    x = torch.randn(2, 3, H, W)
    with torch.no_grad():
        dense = model.forward_exits(x, exit_mode='dense')
        probs = exit_scores(model.exits[0], dense[0]).amax(1)
        thr = float(probs.flatten().median())
        model.test_cfg.update(global_threshold=thr, dtop_threshold=thr, dtop_topk=2)
        sparse, act_s = model.forward_exits(x, exit_mode=mode, feature_mask='sparse', return_active=True)
        oracle, act_o = model.forward_exits(x, exit_mode=mode, feature_mask='simulate', return_active=True)
        model.test_cfg.update(global_threshold=1.0, dtop_threshold=1.0)
        none_stopped = model.forward_exits(x, exit_mode=mode, feature_mask='sparse')
    assert act_s[0] is None and all(torch.equal(a, b) for a, b in zip(act_s[1:], act_o[1:]))
    frac = act_s[1].flatten(1).float().mean(1)
    assert 0 < float(frac.min()) and float(frac.max()) < 1 and frac[0] != frac[1]
    for s, o in zip(sparse, oracle):
        assert s.shape == (2, 19, 8, 12)
        assert (s - o).abs().max() <= TOL
    assert torch.equal(sparse[0], dense[0])
    assert not torch.equal(sparse[1], dense[1]) and float(act_s[2].float().mean()) < float(act_s[1].float().mean())
    stopped = ~act_s[1].unsqueeze(1).expand_as(sparse[1])
    assert torch.equal(sparse[1][stopped], sparse[0][stopped])
    for a, b in zip(none_stopped, dense):
        assert (a - b).abs().max() <= TOL


def test_cbt_alpha_equals_beta_gives_global_masks():
    """CBT thresholds calibrated with alpha == beta reproduce the global rule's stop masks exactly."""
    from mmseg_cbt.calibration.thresholds import cbt_thresholds
    model = build_tiny_vit()
    x = torch.randn(2, 3, H, W)
    with torch.no_grad():
        dense = model.forward_exits(x, exit_mode='dense')
        thr = float(torch.softmax(dense[0], dim=1).amax(1).flatten().median())
        stats = torch.rand(3, 19, 19, dtype=torch.float64)
        model.set_cbt_calibration(cbt_thresholds(stats, thr, thr), thr, thr)
        model.test_cfg.update(global_threshold=thr)
        for n in range(2):
            cbt = model.stop_mask(dense[n], n, 'cbt')
            assert 0 < int(cbt.sum()) < cbt.numel()
            assert torch.equal(cbt, model.stop_mask(dense[n], n, 'global'))
        _, act_c = model.forward_exits(x, exit_mode='cbt', return_active=True)
        _, act_g = model.forward_exits(x, exit_mode='global', return_active=True)
    assert all(torch.equal(a, b) for a, b in zip(act_c[1:], act_g[1:]))


def test_dtop_topk_retention_hand_example():
    """DToP's rule on a hand-worked 2-class, 2 x 4 example, with top-2 retention, with and without prior stops."""
    from mmseg_cbt.models.masked.vit_stop_rules import dtop_stop_mask
    c0 = [0.9, 0.8, 0.7, 0.65, 0.1, 0.2, 0.3, 0.5]
    c1 = [0.1, 0.2, 0.3, 0.35, 0.9, 0.8, 0.7, 0.5]
    scores = torch.tensor([c0, c1]).view(1, 2, 2, 4)
    # confident (> 0.6): 0-6; predicted class 0 at {0, 1, 2, 3, 7} (7: tie -> class 0), class 1 at {4, 5, 6};
    # top-2 kept: class 0 -> 0, 1; class 1 -> 4, 5; so 2, 3, 6 stop
    want = torch.zeros(8, dtype=torch.bool)
    want[[2, 3, 6]] = True
    assert torch.equal(dtop_stop_mask(scores, 0.6, topk=2).flatten(), want)
    # without retention every confident position stops
    assert torch.equal(dtop_stop_mask(scores, 0.6, topk=0).flatten(), torch.arange(8) < 7)
    # position 0 already stopped: it neither stops again nor counts for class 0, whose top 2 are now 1 and 2
    active = torch.ones(1, 2, 4, dtype=torch.bool)
    active[0, 0, 0] = False
    want = torch.zeros(8, dtype=torch.bool)
    want[[3, 6]] = True
    assert torch.equal(dtop_stop_mask(scores, 0.6, topk=2, active=active).flatten(), want)


def test_options_checked():
    """Bad DToP options and fills fail with a message naming them."""
    from mmengine.config import Config

    from mmseg.registry import MODELS
    cfg = Config.fromfile(TOY_VIT_CONFIG).model
    cfg.test_cfg.dtop_topk = -1
    with pytest.raises(ValueError, match='test_cfg.dtop_topk'):
        MODELS.build(cfg)
    cfg.test_cfg.dtop_topk = 5
    cfg.test_cfg.dtop_threshold = 1.5
    with pytest.raises(ValueError, match='dtop_threshold'):
        MODELS.build(cfg)
    model = build_tiny_vit()
    state, active = _masks(model, torch.randn(2, 3, H, W))
    with pytest.raises(ValueError, match='fill'):
        model.backbone.forward_stage_masked(2, state, active, fill='rbf')


def test_tiny_config_trains_with_runner(tiny_city, tmp_path):
    """Two iterations of the tiny ViT config through mmengine's Runner (with calibration and validation)."""
    runner, sd = train_tiny_vit(TOY_VIT_CONFIG, tiny_city, tmp_path)
    assert bool(sd['cbt_calibrated'])
    scalars = runner.message_hub.log_scalars
    assert all(f'train/exit{n}.loss_ce' in scalars and f'val/exit{n}.mIoU' in scalars for n in (1, 2, 3))
    assert scalars['val/mIoU'].current() == scalars['val/exit3.mIoU'].current()


def test_masked_training_with_dtop_rule():
    """Fine-tuning with pruning active (DToP's second phase): losses at every exit, gradients reach the backbone,
    and tokens really stop during the forward."""
    from mmengine.config import Config

    from mmseg.registry import MODELS
    cfg = Config.fromfile(TOY_VIT_CONFIG).model
    cfg.train_cfg = dict(masked_training=dict(exit_mode='dtop', dtop_threshold=0.06, dtop_topk=1))
    torch.manual_seed(0)
    model = MODELS.build(cfg)
    model.train()
    imgs, samples = demo_batch(19, n=2, h=64, w=64)
    seen = []
    orig = model.backbone.forward_stage_masked
    model.backbone.forward_stage_masked = lambda s, f, a, **kw: (seen.append(float(a.float().mean())),
                                                                 orig(s, f, a, **kw))[1]
    losses = model.loss(imgs, samples)
    assert {f'exit{n}.loss_ce' for n in (1, 2, 3)} <= set(losses)
    assert seen and all(0 < f < 1 for f in seen)
    sum(v for k, v in losses.items() if 'loss' in k).backward()
    assert model.backbone.layers[5].ffn.layers[1].weight.grad.abs().sum() > 0
