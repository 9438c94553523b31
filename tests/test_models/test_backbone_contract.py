"""The early-exit backbone contract (EarlyExitHRNet), the runner-parameterised head forward and the option checks."""
import copy

import pytest
import torch
from mmengine.registry import MODELS
from utils import build_tiny_model, randomise_bn


@pytest.fixture(scope='module')
def tiny(toy_cfg):
    model = build_tiny_model(toy_cfg).eval()
    randomise_bn(model)
    return model


def test_hrnet_implements_the_contract(tiny):
    from mmseg_cbt.models.backbones.base import EarlyExitBackboneMixin
    bb = tiny.backbone
    assert isinstance(bb, EarlyExitBackboneMixin) and bb.num_stages == tiny.num_exits == 4
    # every backbone parameter and buffer belongs to exactly one stage's modules
    owners = {}
    for stage in range(1, bb.num_stages + 1):
        for name in bb.stage_modules(stage):
            for key in getattr(bb, name).state_dict():
                assert f'{name}.{key}' not in owners, f'{name}.{key} in two stages'
                owners[f'{name}.{key}'] = stage
    assert set(owners) == set(bb.state_dict())
    assert owners[f'{bb.norm1_name}.weight'] == 1 and owners['transition1.0.0.weight'] == 2
    assert owners['stage4.0.fuse_layers.0.1.0.weight'] == 4
    with pytest.raises(ValueError, match='stage must be in'):
        bb.stage_modules(5)


def test_exit_feature_is_what_the_heads_read(tiny):
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        outs = tiny.backbone.forward_stages(x)
        for stage, head in enumerate(tiny.exits, start=1):
            want = head._transform_inputs(outs[stage - 1])
            got = tiny.backbone.exit_feature(stage, outs[stage - 1])
            assert got.shape == want.shape and torch.equal(got, want)


def test_runner_forward_equals_module_forward(tiny):
    """The dense runner reproduces the modules' own forward bit for bit (RH exits and mmseg's FCNHead)."""
    from mmseg_cbt.models.masked import DenseRunner, MaskContext, SimulatedRunner, fcn_forward_with
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        outs = tiny.backbone.forward_stages(x)
        for head, feats in zip(tiny.exit_heads, outs):
            assert torch.equal(head.forward_with(feats, DenseRunner()), head(feats))
        assert torch.equal(fcn_forward_with(tiny.decode_head, outs[-1], DenseRunner()), tiny.decode_head(outs[-1]))
        # an all-active mask changes nothing in the simulated runner
        ones = torch.ones(2, 16, 24, dtype=torch.bool)
        sim = SimulatedRunner(MaskContext(ones, 'zeros'))
        assert torch.equal(tiny.exit_heads[1].forward_with(outs[1], sim), tiny.exit_heads[1](outs[1]))
        # with stopped pixels the classifier output is 0 there (zeros fill of a shape-changing layer)
        half = ones.clone()
        half[:, :, :12] = False
        out = tiny.exit_heads[1].forward_with(outs[1], SimulatedRunner(MaskContext(half, 'zeros')))
        assert (out[:, :, :, :12] == 0).all() and (out[:, :, :, 12:] != 0).any()


@pytest.mark.parametrize('side,ok', [(28, False), (29, True)])
def test_minimum_input_size_is_exact(tiny, side, ok):
    """Two stride-2 stem convs give ceil(ceil(H/2)/2) at 1/4; the first RH exit pools 3 times: needs 8 -> H >= 29."""
    x = torch.randn(1, 3, side, 64)
    with torch.no_grad():
        if ok:
            assert len(tiny.forward_exits(x, feature_mask='none')) == 4
        else:
            with pytest.raises(ValueError, match='every side must be >= 29 pixels'):
                tiny.forward_exits(x, feature_mask='none')


@pytest.mark.parametrize('key,value,match', [
    ('global_threshold', 2, r'test_cfg.global_threshold must be in \[0, 1\], got 2'),
    ('global_threshold', -1, r'test_cfg.global_threshold must be in \[0, 1\]'),
    ('global_threshold', float('nan'), r'test_cfg.global_threshold must be in'),
    ('entropy_threshold', 'abc', r'test_cfg.entropy_threshold must be a number in \[0, 1\], got .abc.'),
    ('sparse_max_active', -1, r'test_cfg.sparse_max_active must be in \[0, 1\]'),
    ('sparse_max_active', 'abc', r'test_cfg.sparse_max_active must be a number'),
    ('fill', 'bogus', r"test_cfg.fill must be one of \('copy', 'zeros', 'rbf'\), got 'bogus'"),
    ('exit_mode', 'bogus', r'test_cfg.exit_mode must be one of'),
    ('feature_mask', 'bogus', r'test_cfg.feature_mask must be one of'),
])
def test_bad_test_cfg_rejected_when_built(toy_cfg, key, value, match):
    cfg = copy.deepcopy(toy_cfg.model)
    cfg.test_cfg[key] = value
    with pytest.raises(ValueError, match=match):
        MODELS.build(cfg)


def test_bad_masked_training_rejected_when_built(toy_cfg):
    cfg = copy.deepcopy(toy_cfg.model)
    cfg.train_cfg = dict(masked_training=dict(exit_mode='global', global_threshold=1.5))
    with pytest.raises(ValueError, match=r'train_cfg.masked_training.global_threshold must be in \[0, 1\]'):
        MODELS.build(cfg)


def test_threshold_changed_after_build_is_checked_at_use(tiny):
    x = torch.randn(1, 3, 64, 96)
    old = dict(tiny.test_cfg)
    try:
        tiny.test_cfg['global_threshold'] = 7
        with pytest.raises(ValueError, match='test_cfg.global_threshold must be in'):
            with torch.no_grad():
                tiny.forward_exits(x, exit_mode='global', feature_mask='none')
    finally:
        tiny.test_cfg.clear()
        tiny.test_cfg.update(old)


def test_backbone_without_the_contract_is_rejected(toy_cfg):
    cfg = copy.deepcopy(toy_cfg.model)
    cfg.backbone.type = 'HRNet'
    with pytest.raises(TypeError, match='does not implement the early-exit backbone contract'):
        MODELS.build(cfg)
