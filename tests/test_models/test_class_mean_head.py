"""EarlyExitClassMeanHead (E2CM exits): distances, empty classes, widths, checkpoints, masked parity, FLOPs."""
import warnings

import pytest
import torch
from utils import build_tiny_e2cm

from mmseg_cbt.models.decode_heads import EMPTY_CLASS_LOGIT, ClassMeanWarning, EarlyExitClassMeanHead
from mmseg_cbt.models.masked import forward_head_masked


def _head(k=4, chans=(3, 5), t=2.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    head = EarlyExitClassMeanHead(in_channels=list(chans), num_classes=k)
    head.set_class_means(torch.randn(k, sum(chans), generator=g), torch.arange(1, k + 1), t)
    return head.eval(), g


def test_scores_are_the_softmax_of_negative_squared_distances():
    head, g = _head()
    inputs = [torch.randn(2, 3, 6, 7, generator=g), torch.randn(2, 5, 3, 4, generator=g)]
    with torch.no_grad():
        logits = head(inputs)
    x = head._transform_inputs(inputs).double()  # (2, 8, 6, 7)
    d2 = ((x[:, None] - head.class_means.double()[None, :, :, None, None])**2).sum(2)
    ref = torch.softmax(-d2 / 2.0, dim=1)
    assert torch.allclose(torch.softmax(logits.double(), 1), ref, atol=1e-5)
    assert torch.equal(logits.argmax(1), d2.argmin(1))


def test_empty_class_warns_and_never_wins():
    head = EarlyExitClassMeanHead(in_channels=2, num_classes=3)
    with pytest.warns(ClassMeanWarning, match=r'1 class\(es\) have no training pixels at this exit \(car\)'):
        head.set_class_means(torch.zeros(3, 2), torch.tensor([4, 0, 1]), 1.0, class_names=['road', 'car', 'sky'])
    x = [torch.zeros(1, 2, 3, 3)]  # exactly at the (zero) mean the empty class would have had
    logits = head(x)
    assert torch.all(logits[:, 1] == EMPTY_CLASS_LOGIT)
    assert torch.all(torch.softmax(logits, 1)[:, 1] == 0)
    assert not bool((logits.argmax(1) == 1).any())


def test_wrong_width_names_both_widths():
    head, _ = _head(chans=(3, 5))
    with pytest.raises(ValueError, match='the feature map has 7 channels but the stored class means have width 8'):
        head([torch.zeros(1, 3, 4, 4), torch.zeros(1, 4, 2, 2)])
    with pytest.raises(
            ValueError, match=r'shape \(4, 6\) do not fit this exit, which has 4 classes and reads '
            'features of width 8'):
        head.set_class_means(torch.zeros(4, 6), torch.ones(4), 1.0)
    with pytest.raises(ValueError, match='temperature must be a finite number > 0'):
        head.set_class_means(torch.zeros(4, 8), torch.ones(4), 0.0)


def test_checkpoint_round_trip_and_derived_classifier():
    head, g = _head()
    state = head.state_dict()
    assert set(state) == {'class_means', 'class_counts', 'temperature'}  # conv_seg is derived, not stored
    fresh = EarlyExitClassMeanHead(in_channels=[3, 5], num_classes=4).eval()
    fresh.load_state_dict(state, strict=True)
    x = [torch.randn(1, 3, 5, 5, generator=g), torch.randn(1, 5, 3, 3, generator=g)]
    assert torch.equal(fresh(x), head(x))
    # the classifier follows the buffers when they change in place
    fresh.temperature.fill_(4.0)
    assert torch.allclose(fresh(x), head(x) / 2, atol=1e-5)


@pytest.mark.parametrize('fill', ('copy', 'zeros', 'rbf'))
def test_sparse_equals_simulated_oracle(fill):
    """Every class-mean exit under sparse masked inference (active positions only) equals the simulated path."""
    model = build_tiny_e2cm()
    bb = model.backbone
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 96, 130, generator=g)
    with torch.no_grad():
        feats = bb.forward_stage(1, [x])
        h4, w4 = feats[0].shape[-2:]
        active = torch.rand(2, h4, w4, generator=g) > 0.6
        for stage in (2, 3):
            feats = bb.forward_stage(stage, feats)
            head = model.exits[stage - 1]
            sim = forward_head_masked(head, feats, active, sparse=False, fill=fill)
            sp = forward_head_masked(head, feats, active, sparse=True, fill=fill)
            m = active.unsqueeze(1).expand_as(sim)
            assert (sim[m] - sp[m]).abs().max() <= 1e-4, (stage, fill)
            dense = head(feats)
            assert (dense[m] - sp[m]).abs().max() <= 1e-4


def test_segmentor_sparse_matches_simulated_and_passive_exits():
    model = build_tiny_e2cm(exits=[2, 3], exit_mode='global', fill='copy')
    x = torch.randn(2, 3, 96, 128)
    with torch.no_grad():
        p = torch.softmax(model.forward_exits(x, exit_mode='dense')[1], 1).max(1).values
        model.test_cfg.global_threshold = float(torch.quantile(p.flatten(), 0.5))
        sim, a1 = model.forward_exits(x, feature_mask='simulate', return_active=True)
        sp, a2 = model.forward_exits(x, feature_mask='sparse', return_active=True)
    assert a1[0] is None and bool(a1[1].all())  # exit 1 only reports (not in --exits): nothing stops there
    assert not bool(a2[2].all()) and bool(a2[2].any())
    for a, b in zip(a1[2:], a2[2:]):
        assert torch.equal(a, b)
    for a, b in zip(sim, sp):
        assert (a - b).abs().max() <= 1e-4


def test_flops_counter_counts_the_class_mean_exits():
    from mmseg_cbt.analysis import count_flops
    model = build_tiny_e2cm()
    x = torch.randn(1, 3, 64, 96)
    res = count_flops(model, x, exit_mode='dense')
    k = model.num_classes
    for i, head in enumerate(model.exit_heads):
        e = res.exits[i]
        head_macs = e.macs_exit_only_per_image[0] - e.backbone_macs_per_image[0]
        assert head_macs == k * head.feature_width * 16 * 24, i  # one 1x1 conv C -> K on the 1/4 map


def test_init_weights_keeps_the_class_means():
    model = build_tiny_e2cm()
    before = [h.class_means.clone() for h in model.exit_heads]
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        model.init_weights()
    for h, b in zip(model.exit_heads, before):
        assert torch.equal(h.class_means, b)
