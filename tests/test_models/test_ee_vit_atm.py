"""EarlyExitATMHead (DToP's attention-to-mask head): active tokens only, scores, loss, calibration, training.

The segmentor-level parity of its pruned path with the simulated oracle is in test_ee_vit.py
(``test_segmentor_sparse_equals_simulated[...-atm-head]``).
"""
import pytest
import torch
from utils import TOY_VIT_ATM_CONFIG, build_tiny_vit, demo_batch, train_tiny_vit

TOL = 1e-4
# not a multiple of the patch size (8): an 8 x 12 token grid
H, W = 60, 90


def _atm_model(**test_cfg):
    return build_tiny_vit(config=TOY_VIT_ATM_CONFIG, **test_cfg)


def test_atm_head_attends_to_active_tokens_only():
    """At the head: stopped tokens are no keys (changing them changes no active score), the sparse state scores
    the active tokens only, and the scores are p(present) x sigmoid(mask logit) in [0, 1], read unchanged by the
    stop rules."""
    from mmseg_cbt.models.masked.vit_stop_rules import exit_scores
    model = _atm_model()
    vit, head = model.backbone, model.exit_heads[1]
    x = torch.randn(2, 3, H, W)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        state = vit.forward_stage(1, [x])
        active = torch.stack([torch.rand(state.hw, generator=g) < f for f in (0.3, 0.8)])
        sim = vit.forward_stage_masked(2, state, active, sparse=False)
        spa = vit.forward_stage_masked(2, state, active, sparse=True)
        s_sim, s_spa = head(sim), head(spa)
        out = head.last_outputs
        poked = sim.with_tokens(sim.tokens.clone(), active=active)
        grid = poked.tokens[:, 1:]
        grid[~active.flatten(1)] += 5.0
        s_poked = head(poked)
    m = active.unsqueeze(1).expand_as(s_sim)
    assert (s_sim - s_spa)[m].abs().max() <= TOL
    assert (s_poked - s_sim)[m].abs().max() <= TOL
    assert torch.equal(s_spa[~m], torch.zeros_like(s_spa[~m]))
    want = torch.softmax(out.cls_logits, -1)[..., 0, None, None] * out.mask_logits.sigmoid()
    assert torch.allclose(s_spa[m], want[m])
    assert float(s_sim.min()) >= 0 and float(s_sim.max()) <= 1
    assert torch.equal(exit_scores(head, s_sim), s_sim)


def test_atm_loss_finite_with_gradients_and_hand_values():
    """DToP's loss at every exit, with pruning active in training: finite, gradients reach queries, presence
    classifier and backbone; loss_cls / loss_dice equal hand-computed values; ignored pixels take no part."""
    from mmengine.config import Config

    from mmseg.registry import MODELS

    from mmseg_cbt.models.decode_heads.atm_loss import atm_losses, present_classes
    cfg = Config.fromfile(TOY_VIT_ATM_CONFIG).model
    cfg.train_cfg = dict(masked_training=dict(exit_mode='dtop', dtop_threshold=0.05, dtop_topk=1))
    torch.manual_seed(0)
    model = MODELS.build(cfg)
    model.train()
    imgs, samples = demo_batch(19, n=2, h=64, w=64)
    losses = model.loss(imgs, samples)
    for n in (1, 2, 3):
        for key in ('loss_cls', 'loss_mask', 'loss_dice'):
            assert torch.isfinite(losses[f'exit{n}.{key}'])
    sum(v for k, v in losses.items() if 'loss' in k).backward()
    for head in model.exits:
        assert head.queries.weight.grad.abs().sum() > 0 and head.class_embed.weight.grad.abs().sum() > 0
    assert model.backbone.layers[5].ffn.layers[1].weight.grad.abs().sum() > 0
    with pytest.raises(RuntimeError, match='last forward'):
        model.decode_head.loss_by_feat(torch.zeros(2, 19, 8, 8), samples)

    # hand example: 1 image, 3 classes, 2 x 2 labels [[0, 0], [2, 255]] (class 1 absent), logits on a 2 x 2 grid
    labels = torch.tensor([[[0, 0], [2, 255]]])
    cls_logits = torch.tensor([[[2.0, 0.0], [0.0, 1.0], [0.5, 0.5]]])
    mask = torch.tensor([[[[1.0, -1.0], [0.0, 3.0]], [[0.0, 0.0], [0.0, 0.0]], [[-2.0, 0.0], [2.0, -7.0]]]])
    got = atm_losses(cls_logits, mask, labels, mask_loss='bce', mask_weight=1.0)
    assert present_classes(labels, 3, 255).tolist() == [[True, False, True]]
    lp = torch.log_softmax(cls_logits[0], -1)
    want_cls = -(lp[0, 0] + 0.1 * lp[1, 1] + lp[2, 0]) / 2.1  # weighted mean, "not present" weighted 0.1
    assert torch.allclose(got['loss_cls'], want_cls)
    sig = torch.sigmoid
    # dice over the 3 labelled pixels of class 0 (target 1, 1, 0) and class 2 (target 0, 0, 1), 2 masks
    p0, p2 = sig(torch.tensor([1.0, -1.0, 0.0])), sig(torch.tensor([-2.0, 0.0, 2.0]))
    d0 = 1 - (2 * (p0[0] + p0[1]) + 1) / (p0.sum() + 2 + 1)
    d2 = 1 - (2 * p2[2] + 1) / (p2.sum() + 1 + 1)
    assert torch.allclose(got['loss_dice'], (d0 + d2) / 2)
    poked = mask.clone()
    poked[..., 1, 1] = 50.0  # the ignored pixel
    again = atm_losses(cls_logits, poked, labels, mask_loss='bce', mask_weight=1.0)
    assert all(torch.equal(got[k], again[k]) for k in got)
    with pytest.raises(ValueError, match='mask_loss'):
        atm_losses(cls_logits, mask, labels, mask_loss='l2')


def test_calibration_sums_scores_of_probability_heads():
    """The class-mean statistics of an exit whose head outputs probabilities are means of its scores (no
    softmax), those of a logit exit means of the softmax."""
    from mmseg_cbt.calibration import ClassProbStats
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(1, 3, 4, 5, generator=g)
    labels = torch.randint(0, 3, (1, 4, 5), generator=g)
    stats = ClassProbStats(2, 3)
    stats.scores_are_probs = [True, False]
    stats.update([scores, scores], labels)
    mean = stats.class_mean_probs()
    soft = torch.softmax(scores, 1)
    for k in range(3):
        m = labels[0] == k
        assert torch.allclose(mean[0, k], scores[0][:, m].double().mean(1), atol=1e-6)
        assert torch.allclose(mean[1, k], soft[0][:, m].double().mean(1), atol=1e-6)


def test_atm_config_trains_with_runner(tiny_city, tmp_path):
    """Two iterations of the tiny ATM config through mmengine's Runner, CBT calibration on the scores, validation."""
    runner, sd = train_tiny_vit(TOY_VIT_ATM_CONFIG, tiny_city, tmp_path)
    assert bool(sd['cbt_calibrated'])
    rows = sd['cbt_class_mean_probs'].sum(-1)[:, sd['cbt_class_counts'] > 0]
    assert (rows - 1).abs().max() > 1e-2  # means of ATM scores, not of a softmax (whose rows sum to 1)
    scalars = runner.message_hub.log_scalars
    assert all(f'train/exit{n}.loss_mask' in scalars and f'val/exit{n}.mIoU' in scalars for n in (1, 2, 3))
