"""One-pass stop-rule sweeps: every setting's confusion matrix and MACs equal a separate run of that setting."""
import argparse

import pytest
import torch
from utils import build_tiny_model, demo_batch, randomise_bn

from mmseg_cbt.analysis import EarlyExitFlopCounter
from mmseg_cbt.analysis.frontier import frontier, interpolate_gflops, interpolate_miou, matched_cost
from mmseg_cbt.analysis.sweep import SweepEvaluator, confusion_metrics, posthoc_exits
from mmseg_cbt.analysis.sweep_spec import Setting, parse_family


def _sharpened_model(toy_cfg):
    """The tiny model with BN statistics and classifier weights scaled so that confidences spread over (0, 1)."""
    model = build_tiny_model(toy_cfg, feature_mask='none')
    randomise_bn(model)
    with torch.no_grad():
        for head in model.exits:
            conv = head.conv_seg
            conv.weight.mul_(40.0)
    return model.eval()


def _reference(model, inputs, samples, setting, thresholds=None):
    """A separate run of one setting: the model's own forward_exits / predict / FLOPs counter."""
    cfg = setting.stop_cfg()
    mode = 'dense' if cfg is None else cfg['exit_mode']
    model.test_cfg.update({k: v for k, v in (cfg or {}).items() if k != 'exit_mode'})
    model.test_cfg['exit_mode'] = mode
    if thresholds is not None:
        model.set_cbt_calibration(thresholds, 0.5, 1.0)
    with torch.no_grad():
        _, actives = model.forward_exits(inputs, feature_mask='none', return_active=True)
        flops = EarlyExitFlopCounter(model, exit_mode=mode, feature_mask='none').count(inputs, actives)
        preds = model.predict(inputs, [s.clone() for s in samples])
    k = model.num_classes
    conf = torch.zeros(k, k, dtype=torch.int64)
    for ds, s in zip(preds, samples):
        label = s.gt_sem_seg.data.reshape(-1)
        pred = ds.pred_sem_seg.data.reshape(-1)
        keep = label != 255
        conf += torch.bincount(label[keep] * k + pred[keep], minlength=k * k).view(k, k)
    return conf, flops, actives


def test_one_pass_equals_separate_runs(toy_cfg):
    model = _sharpened_model(toy_cfg)
    inputs, samples = demo_batch(model.num_classes, n=2, h=64, w=96, seed=3)
    k, n = model.num_classes, model.num_exits
    with torch.no_grad():
        dense = model.forward_exits(inputs, exit_mode='dense', feature_mask='none')
    conf1 = torch.softmax(dense[0], 1).amax(1).flatten()
    q = [float(conf1.quantile(p)) for p in (0.3, 0.6, 0.85)]
    assert q[0] < q[2] < 1.0  # the sharpened model's confidences really spread
    gen = torch.Generator().manual_seed(0)
    cbt_thr = (q[0] + (q[2] - q[0]) * torch.rand(n, k, generator=gen)).float()
    settings = [
        Setting('dense', float('nan'), {}, 'dense'),
        *parse_family('adpc:' + ','.join(f'{v:.6f}' for v in q)).settings,
        *parse_family('entropy:0.2,0.5').settings,
        *parse_family('dtop:' + f'{q[1]:.6f}' + '@topk=3').settings,
        Setting('cbt-alpha', 0.5, dict(alpha=0.5, beta=1.0), 'CBT hand', thresholds=cbt_thr),
    ]
    evaluator = SweepEvaluator(model, settings, ignore_index=255, all_exits=True)
    data = dict(inputs=inputs, data_samples=samples)
    evaluator.process(data)
    stopped_any = False
    for i, s in enumerate(settings):
        ref_conf, ref_flops, actives = _reference(model, inputs, samples, s,
                                                  cbt_thr if s.thresholds is not None else None)
        stopped_any |= any(a is not None and not bool(a.all()) for a in actives)
        got = evaluator.results[i]
        assert torch.equal(got.confusion[n - 1][:k], ref_conf), s.label
        assert int(got.confusion[n - 1][k].sum()) == 0  # no label outside [0, K) in this batch
        for e_got, e_ref in zip(got.flops.exits, ref_flops.exits):
            assert e_got.macs_per_image == e_ref.macs_per_image, s.label
    assert stopped_any
    # the settings really differ: the global thresholds give strictly decreasing MACs
    macs = [evaluator.results[i].flops.total.macs for i in range(1, 4)]
    assert macs[0] < macs[1] < macs[2] < evaluator.results[0].flops.total.macs


def test_posthoc_exits_equal_forward_exits(toy_cfg):
    model = _sharpened_model(toy_cfg)
    inputs, _ = demo_batch(model.num_classes, n=2, h=64, w=96, seed=5)
    cfg = dict(exit_mode='global', global_threshold=0.6)
    model.test_cfg.update(cfg)
    with torch.no_grad():
        dense = model.forward_exits(inputs, exit_mode='dense', feature_mask='none')
        ref_logits, ref_act = model.forward_exits(inputs, feature_mask='none', return_active=True)
        logits, act = posthoc_exits(model, dense, cfg)
    for a, b in zip(logits, ref_logits):
        assert torch.equal(a, b)
    for a, b in zip(act, ref_act):
        assert (a is None and b is None) or torch.equal(a, b)


def test_confusion_metrics_hand_example():
    # K = 2, rows: label 0, label 1, labels outside [0, K)
    conf = torch.tensor([[3, 1], [2, 4], [0, 0]])
    m = confusion_metrics(conf)
    # IoU0 = 3 / (3 + 1 + 2) = 0.5, IoU1 = 4 / (4 + 2 + 1) = 4/7
    assert m['mIoU'] == pytest.approx(100 * (0.5 + 4 / 7) / 2)
    assert m['aAcc'] == pytest.approx(70.0)


def test_parse_family_syntax_and_errors():
    fam = parse_family('cbt-alpha:0.5:0.9:3@beta=0.998')
    assert [s.value for s in fam.settings] == [0.5, 0.7, 0.9]
    assert all(s.params['beta'] == 0.998 for s in fam.settings)
    log1m = [s.value for s in parse_family('adpc:0.9:0.999:3:log1m').settings]
    assert log1m == [0.9, 0.99, 0.999]
    for bad, match in [('adpc:1.5', r'must be in \[0, 1\]'), ('bogus:0.5', 'unknown family'),
                       ('cbt-alpha:0.9@beta=0.5', 'alpha <= beta'), ('adpc:0.5:0.9:0', 'NUM must be'),
                       ('cbt-alpha:0.5@gamma=1', 'unknown parameter'), ('precision:0.9@alpha=0.4', 'alpha'),
                       ('adpc:abc', 'not a number')]:
        with pytest.raises(argparse.ArgumentTypeError, match=match):
            parse_family(bad)


def test_frontier_and_matched_cost():
    pts = [(1.0, 10.0), (2.0, 9.0), (2.0, 12.0), (3.0, 15.0), (4.0, 14.0)]
    assert frontier(pts) == [0, 2, 3]
    front = [pts[i] for i in frontier(pts)]
    assert interpolate_miou(front, 2.5) == (pytest.approx(13.5), '')
    assert interpolate_miou(front, 0.5) == (None, 'below')
    assert interpolate_gflops(front, 11.0) == (pytest.approx(1.5), '')
    assert interpolate_gflops(front, 16.0) == (None, 'above')
    rows = [
        dict(family='adpc', family_text='adpc:x', family_title='ADP-C', value=0.9, gflops_2_30=2.0, mIoU=12.0),
        dict(family='adpc', family_text='adpc:x', family_title='ADP-C', value=0.5, gflops_2_30=1.0, mIoU=10.0),
        dict(family='cbt-alpha', family_text='cbt', family_title='CBT', value=0.5, gflops_2_30=1.5, mIoU=12.0),
        dict(family='cbt-alpha', family_text='cbt', family_title='CBT', value=0.9, gflops_2_30=2.5, mIoU=13.0),
    ]
    m = matched_cost(rows, [0.9], [1.0])
    cbt = next(f for f in m['families'] if f['title'] == 'CBT')
    assert cbt['miou_at_gflops'][0]['value'] == pytest.approx(12.5)  # at ADP-C 0.9's 2.0 GFLOPs
    assert cbt['gflops_at_miou'][0]['out_of_range'] == 'below'  # mIoU 11 is below CBT's cheapest point
    adpc = next(f for f in m['families'] if f['title'] == 'ADP-C')
    assert adpc['gflops_at_miou'][0]['value'] == pytest.approx(1.5)
