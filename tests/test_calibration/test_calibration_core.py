"""Tests of the CBT calibration core: thresholds, stop rules, exact statistics and the threshold plot."""
import json
import os
import warnings

import pytest
import torch

from mmseg_cbt.calibration import (FRAC_BITS, CBTCalibrationWarning, ClassProbStats, cbt_thresholds, entropy_stop_mask,
                                   global_stop_mask, plot_thresholds)
from mmseg_cbt.calibration import stats as stats_module
from mmseg_cbt.calibration import stop_mask_from_probs

ALPHA, BETA = 0.9, 0.998

# A hand-made N=2 exits, K=3 classes example. Row k of exit n = mean softmax over pixels of ground truth k.
# yapf: disable
HAND_PROBS = torch.tensor([
    [[0.80, 0.10, 0.10],   # exit 0, class 0
     [0.20, 0.60, 0.20],   # exit 0, class 1
     [0.10, 0.30, 0.60]],  # exit 0, class 2
    [[0.90, 0.05, 0.05],   # exit 1, class 0
     [0.10, 0.70, 0.20],   # exit 1, class 1
     [0.20, 0.40, 0.40]],  # exit 1, class 2 (top-1 ties with top-2: margin 0)
], dtype=torch.float64)
# yapf: enable


def f32(values):
    return torch.tensor(values, dtype=torch.float32)


def assert_f32_close(actual, expected):
    assert actual.dtype == torch.float32
    torch.testing.assert_close(actual, f32(expected), atol=1e-7, rtol=0)


# ----------------------------------------------------------------------------------------------- thresholds
def test_cbt_hand_example():
    # P_k = mean over the two exits:
    #   P_0 = [0.85, 0.075, 0.075] -> T_0 = 0.85 - 0.075 = 0.775 (easiest)
    #   P_1 = [0.15, 0.65, 0.20]   -> T_1 = 0.65 - 0.20  = 0.45
    #   P_2 = [0.15, 0.35, 0.50]   -> T_2 = 0.50 - 0.35  = 0.15  (hardest)
    # min 0.15, max 0.775, span 0.625; beta - alpha = 0.098.
    #   class 0: alpha = 0.9
    #   class 1: (1 - (0.45 - 0.15) / 0.625) * 0.098 + 0.9 = 0.52 * 0.098 + 0.9 = 0.95096
    #   class 2: beta = 0.998
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # a clean calibration warns about nothing
        thr = cbt_thresholds(HAND_PROBS, ALPHA, BETA)
    assert thr.shape == (3, )
    assert_f32_close(thr, [0.9, 0.95096, 0.998])
    # The end points are hit exactly, not an ulp off.
    assert thr[0] == f32(0.9) and thr[2] == f32(0.998)


def test_cbt_hand_example_other_range():
    # Same margins, range [0.99, 0.998]: class 1 = 0.52 * 0.008 + 0.99 = 0.99416.
    assert_f32_close(cbt_thresholds(HAND_PROBS, 0.99, 0.998), [0.99, 0.99416, 0.998])


def test_cbt_ns_hand_example():
    # Exit 0 margins: 0.8-0.1 = 0.7, 0.6-0.2 = 0.4, 0.6-0.3 = 0.3; span 0.4
    #   class 1: (1 - (0.4 - 0.3) / 0.4) * 0.098 + 0.9 = 0.75 * 0.098 + 0.9 = 0.9735
    # Exit 1 margins: 0.9-0.05 = 0.85, 0.7-0.2 = 0.5, 0.4-0.4 = 0; span 0.85
    #   class 1: (1 - 0.5 / 0.85) * 0.098 + 0.9 = (7 / 17) * 0.098 + 0.9 = 0.94035294117647...
    thr = cbt_thresholds(HAND_PROBS, ALPHA, BETA, share_exits=False)
    assert thr.shape == (2, 3)
    assert_f32_close(thr, [[0.9, 0.9735, 0.998], [0.9, 0.9403529411764706, 0.998]])


@pytest.mark.parametrize('alpha,beta,match', [
    (0.999, 0.99, r'alpha must be <= beta.*alpha=0\.999, beta=0\.99'),
    (0.0, 0.998, r'\(0, 1\].*alpha=0\.0, beta=0\.998'),
    (-0.1, 0.998, r'alpha=-0\.1'),
    (0.9, 1.2, r'beta=1\.2'),
    (float('nan'), 0.998, r'alpha=nan'),
])
def test_alpha_beta_errors(alpha, beta, match):
    with pytest.raises(ValueError, match=match):
        cbt_thresholds(HAND_PROBS, alpha, beta)


@pytest.mark.parametrize('shape', [(3, 3), (2, 3, 4), (2, 3, 3, 1), (0, 3, 3)])
def test_shape_errors(shape):
    with pytest.raises(ValueError, match='shape'):
        cbt_thresholds(torch.rand(shape), ALPHA, BETA)


def test_single_class_and_non_finite_errors():
    with pytest.raises(ValueError, match='K >= 2'):
        cbt_thresholds(torch.ones(2, 1, 1), ALPHA, BETA)
    bad = HAND_PROBS.clone()
    bad[0, 0, 0] = float('nan')
    with pytest.raises(ValueError, match='NaN'):
        cbt_thresholds(bad, ALPHA, BETA)
    with pytest.raises(ValueError, match='counts must have shape'):
        cbt_thresholds(HAND_PROBS, ALPHA, BETA, counts=torch.ones(4))
    with pytest.raises(ValueError, match='class_names'):
        cbt_thresholds(HAND_PROBS, ALPHA, BETA, class_names=['a', 'b'])


def test_alpha_equals_beta_is_a_single_threshold():
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        thr = cbt_thresholds(HAND_PROBS, 0.998, 0.998)
        thr_ns = cbt_thresholds(HAND_PROBS, 0.998, 0.998, share_exits=False)
    assert torch.equal(thr, torch.full((3, ), 0.998, dtype=torch.float32))
    assert torch.equal(thr_ns, torch.full((2, 3), 0.998, dtype=torch.float32))


def test_all_margins_equal_gives_beta():
    # Every class has margin 0.7 - 0.2 = 0.5 at every exit: the min-max map is 0/0.
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.7, 0.2], [0.2, 0.1, 0.7]], dtype=torch.float64).expand(2, 3, 3)
    with pytest.warns(CBTCalibrationWarning, match='all class margins are equal'):
        thr = cbt_thresholds(probs, ALPHA, BETA)
    assert torch.equal(thr, torch.full((3, ), BETA, dtype=torch.float32))
    with pytest.warns(CBTCalibrationWarning, match='equal at exit') as record:
        thr_ns = cbt_thresholds(probs, ALPHA, BETA, share_exits=False)
    assert ['at exit 0' in str(r.message) for r in record] == [True, False]  # one warning per exit
    assert torch.equal(thr_ns, torch.full((2, 3), BETA, dtype=torch.float32))


def test_classes_without_pixels_get_beta_and_are_excluded():
    probs = HAND_PROBS.clone()
    # Class 1's row would be the easiest of all (margin 1) if it were used.
    probs[:, 1] = torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64)
    names = ['road', 'sidewalk', 'building']
    with pytest.warns(CBTCalibrationWarning, match=r'no training pixels: 1 \(sidewalk\)'):
        thr = cbt_thresholds(probs, ALPHA, BETA, counts=torch.tensor([10, 0, 5]), class_names=names)
    # Classes 0 and 2 span the range on their own: T_0 = 0.775 -> alpha, T_2 = 0.15 -> beta; class 1 -> beta.
    assert_f32_close(thr, [0.9, 0.998, 0.998])

    # Without counts an all-zero row (what ClassProbStats gives for such a class) marks it.
    probs[:, 1] = 0.0
    with pytest.warns(CBTCalibrationWarning, match='no training pixels: 1'):
        thr = cbt_thresholds(probs, ALPHA, BETA)
    assert_f32_close(thr, [0.9, 0.998, 0.998])


def test_per_exit_counts():
    # Class 1 has pixels only at exit 1 (per-exit counts): CBT averages only that exit for it,
    # P_1 = [0.1, 0.7, 0.2] -> T_1 = 0.5; T_0 = 0.775, T_2 = 0.15 as before, span 0.625:
    #   class 1: (1 - (0.5 - 0.15) / 0.625) * 0.098 + 0.9 = 0.44 * 0.098 + 0.9 = 0.94312
    counts = torch.tensor([[4, 0, 4], [4, 4, 4]])
    thr = cbt_thresholds(HAND_PROBS, ALPHA, BETA, counts=counts)
    assert_f32_close(thr, [0.9, 0.94312, 0.998])
    # CBT-ns: exit 0 lacks class 1 (-> beta; 0 and 2 span the range), exit 1 as in the hand example.
    with pytest.warns(CBTCalibrationWarning, match='no training pixels at exit 0: 1'):
        thr_ns = cbt_thresholds(HAND_PROBS, ALPHA, BETA, share_exits=False, counts=counts)
    assert_f32_close(thr_ns, [[0.9, 0.998, 0.998], [0.9, 0.9403529411764706, 0.998]])


def test_low_alpha_warns_about_the_or_rule():
    with pytest.warns(CBTCalibrationWarning, match=r'OR-of-channels rule.*paper'):
        thr = cbt_thresholds(HAND_PROBS, 0.4, 0.9)
    # 0.52 * 0.5 + 0.4 = 0.66
    assert_f32_close(thr, [0.4, 0.66, 0.9])


# ----------------------------------------------------------------------------------------------- stop rules
def test_stop_mask_is_strict_or_of_channels():
    thr = f32([0.75, 0.5])
    # Pixels (B=1, H=1, W=4): exactly at the threshold does not stop; just above does.
    probs = torch.tensor([[0.75, 0.25], [0.8125, 0.1875], [0.5, 0.5], [0.4375, 0.5625]]).T.reshape(1, 2, 1, 4)
    assert stop_mask_from_probs(probs, thr).tolist() == [[[False, True, False, True]]]
    assert stop_mask_from_probs(probs, thr).dtype == torch.bool
    with pytest.raises(ValueError, match='thresholds must have shape'):
        stop_mask_from_probs(probs, f32([0.5, 0.5, 0.5]))
    with pytest.raises(ValueError, match=r'\(B, K, H, W\)'):
        stop_mask_from_probs(probs[0], thr)


def test_or_rule_differs_from_argmax_rule_when_alpha_below_half():
    thr = f32([0.4, 0.9])  # e.g. from [alpha, beta] = [0.4, 0.9]
    probs = torch.tensor([0.45, 0.55]).reshape(1, 2, 1, 1)
    # OR rule: class 0 passes 0.45 > 0.4 -> stop, although the argmax (class 1, 0.55) is below its 0.9.
    assert stop_mask_from_probs(probs, thr).item() is True
    argmax = probs.argmax(1)
    assert (probs.amax(1) > thr[argmax]).item() is False


def test_or_rule_equals_argmax_rule_above_half():
    g = torch.Generator().manual_seed(0)
    probs = (torch.randn(2, 5, 8, 8, generator=g) * 4).softmax(1)
    thr = f32([0.51, 0.6, 0.7, 0.55, 0.9])
    argmax_rule = probs.amax(1) > thr[probs.argmax(1)]
    assert torch.equal(stop_mask_from_probs(probs, thr), argmax_rule)
    assert 0 < int(argmax_rule.sum()) < argmax_rule.numel()  # the comparison is not trivial


def test_global_and_entropy_masks():
    probs = torch.tensor([[0.998, 0.002], [0.999, 0.001], [0.5, 0.5], [1.0, 0.0]]).T.reshape(1, 2, 2, 2)
    assert global_stop_mask(probs, 0.998).tolist() == [[[False, True], [False, True]]]
    # Normalised entropy: uniform -> 1, one-hot -> 0 (0 log 0 = 0), [0.999, 0.001] -> 0.0114.
    assert entropy_stop_mask(probs, 0.05).tolist() == [[[True, True], [False, True]]]
    # [0.998, 0.002] -> 0.0208 is not below 0.02; [0.999, 0.001] -> 0.0114 is.
    assert entropy_stop_mask(probs, 0.02).tolist() == [[[False, True], [False, True]]]
    assert entropy_stop_mask(probs, 0.0).tolist() == [[[False, False], [False, False]]]  # strict <: 0 < 0 fails


# ----------------------------------------------------------------------------------------------- statistics
NEG = -1e4  # exp(NEG - max) is exactly 0 in float32, so the softmax values below are exact


def logits_for(prob_rows):
    """(1, K, 1, P) logits whose float32 softmax is exactly the given rows of 1, 0.5 (and 0)."""
    rows = torch.tensor(prob_rows, dtype=torch.float32)
    return torch.where(rows > 0, torch.zeros_like(rows), torch.full_like(rows, NEG)).T.reshape(1, rows.shape[1], 1, -1)


def test_stats_hand_example_exact_sums():
    labels = torch.tensor([[[0, 0, 1, 255, 7, -1, 2]]])  # 255, 7 (>= K) and -1 are excluded
    exit0 = logits_for([[1, 0, 0], [.5, .5, 0], [0, 1, 0], [1, 0, 0], [0, 0, 1], [0, 1, 0], [0, .5, .5]])
    exit1 = logits_for([[.5, 0, .5], [.5, 0, .5], [.5, .5, 0], [0, 1, 0], [1, 0, 0], [1, 0, 0], [0, 0, 1]])
    stats = ClassProbStats()
    stats.update([exit0, exit1], labels)
    assert stats.num_exits == 2 and stats.num_classes == 3
    assert stats.counts.tolist() == [2, 1, 1]
    unit = 2**FRAC_BITS
    # exit 0: class 0 = [1,0,0] + [.5,.5,0] = [1.5, .5, 0]; class 1 = [0,1,0]; class 2 = [0,.5,.5]
    # exit 1: class 0 = [.5,0,.5] * 2 = [1, 0, 1]; class 1 = [.5,.5,0]; class 2 = [0,0,1]
    expected_sums = torch.tensor([[[1.5, .5, 0], [0, 1, 0], [0, .5, .5]], [[1, 0, 1], [.5, .5, 0], [0, 0, 1]]],
                                 dtype=torch.float64)
    assert torch.equal(stats.fixed_point_sums, (expected_sums * unit).to(torch.int64))
    expected_means = torch.tensor([[[.75, .25, 0], [0, 1, 0], [0, .5, .5]], [[.5, 0, .5], [.5, .5, 0], [0, 0, 1]]],
                                  dtype=torch.float64)
    assert torch.equal(stats.class_mean_probs(), expected_means)
    # Labels as mmseg stacks them, (B, 1, H, W), give the same.
    again = ClassProbStats()
    again.update([exit0, exit1], labels.unsqueeze(1))
    assert torch.equal(again.fixed_point_sums, stats.fixed_point_sums)


def test_stats_ignore_index_inside_range_and_empty_class():
    stats = ClassProbStats(num_exits=1, num_classes=3, ignore_index=1)
    stats.update([logits_for([[1, 0, 0], [0, 1, 0], [0, 0, 1]])], torch.tensor([[[0, 1, 0]]]))
    assert stats.counts.tolist() == [2, 0, 0]
    means = stats.class_mean_probs()
    assert torch.equal(means[0, 0], torch.tensor([.5, 0, .5], dtype=torch.float64))
    assert torch.equal(means[0, 1:], torch.zeros(2, 3, dtype=torch.float64))  # no pixels -> zero rows


def random_dataset(num_batches=6, num_exits=3, num_classes=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    data = []
    for _ in range(num_batches):
        b, h, w = 2, int(torch.randint(9, 20, (1, ), generator=g)), int(torch.randint(9, 20, (1, ), generator=g))
        logits = [torch.randn(b, num_classes, h, w, generator=g) * 4 for _ in range(num_exits)]
        labels = torch.randint(0, num_classes, (b, h, w), generator=g)
        labels[torch.rand(b, h, w, generator=g) < 0.1] = 255
        data.append((logits, labels))
    return data


def gather(batches):
    stats = ClassProbStats()
    for logits, labels in batches:
        stats.update(logits, labels)
    return stats


def assert_stats_equal(a, b):
    assert torch.equal(a.fixed_point_sums, b.fixed_point_sums)
    assert torch.equal(a.counts, b.counts)
    assert torch.equal(a.class_mean_probs(), b.class_mean_probs())


def test_two_ranks_bit_exact():
    data = random_dataset()
    single = gather(data)
    rank0, rank1 = gather(data[0::2]), gather(data[1::2])
    assert_stats_equal(rank0.merge(rank1), single)
    # Another batch order and another split (rank 1 merged first) give the same bits.
    assert_stats_equal(gather(data[3:]).merge(gather(data[2::-1])), single)
    assert_stats_equal(ClassProbStats().merge(single), single)  # merging into an empty instance copies
    # And the fixed point is accurate: within 2**-25 of a float64 reference mean.
    probs = [torch.cat([lg[n].softmax(1).permute(0, 2, 3, 1).reshape(-1, 5) for lg, _ in data]) for n in range(3)]
    labels = torch.cat([lb.reshape(-1) for _, lb in data])
    for n in range(3):
        for k in range(5):
            ref = probs[n][labels == k].double().mean(0)
            assert (single.class_mean_probs()[n, k] - ref).abs().max() <= 2**-25


def test_chunked_update_is_exact(monkeypatch):
    data = random_dataset(num_batches=2)
    whole = gather(data)
    # Tiny chunks (a few pixels, last one partial) must give exactly the same integers.
    monkeypatch.setattr(stats_module, '_CHUNK_ELEMENTS', 7 * 5)
    assert_stats_equal(gather(data), whole)


def test_stats_with_thresholds():
    """Thresholds of gathered statistics equal the paper's inverse min-max map, computed here by hand: the class with
    the largest margin gets alpha, the smallest beta, the others in between in proportion (so swapping alpha and
    beta, or the direction of the map, fails)."""
    stats = gather(random_dataset())
    means = stats.class_mean_probs()
    thr = cbt_thresholds(means, ALPHA, BETA, counts=stats.counts)
    # CBT: P_k = mean over exits; margin = top-1 minus top-2 of P_k, by sorting (not the library's class_margins)
    shared = means.mean(dim=0)
    margins = torch.tensor(
        [sorted(row.tolist(), reverse=True)[0] - sorted(row.tolist(), reverse=True)[1] for row in shared],
        dtype=torch.float64)
    lo, hi = float(margins.min()), float(margins.max())
    assert hi - lo > 1e-3  # distinct margins: the map is not degenerate
    expected = [ALPHA + (BETA - ALPHA) * (hi - float(m)) / (hi - lo) for m in margins]
    torch.testing.assert_close(thr, torch.tensor(expected, dtype=torch.float32), atol=1e-7, rtol=0)
    assert thr[int(margins.argmax())] == f32(ALPHA) and thr[int(margins.argmin())] == f32(BETA)
    assert 0 < int(((thr > f32(ALPHA)) & (thr < f32(BETA))).sum())  # some classes strictly inside the range


def test_json_and_state_dict_round_trip():
    stats = gather(random_dataset(num_batches=2))
    names = ['a', 'b', 'c', 'd', 'e']
    data = json.loads(json.dumps(stats.to_json_dict(names)))
    assert [c['name'] for c in data['classes']] == names
    assert data['classes'][2]['count'] == int(stats.counts[2])
    assert len(data['classes'][0]['mean_probs']) == 3 and len(data['classes'][0]['mean_probs'][0]) == 5
    assert_stats_equal(ClassProbStats.from_json_dict(data), stats)
    assert_stats_equal(ClassProbStats.from_state_dict(stats.state_dict()), stats)
    # Without the exact integers, the means rebuild the state to the fixed-point resolution.
    for entry in data['classes']:
        del entry['fixed_point_sums']
    approx = ClassProbStats.from_json_dict(data)
    assert torch.equal(approx.counts, stats.counts)
    assert (approx.class_mean_probs() - stats.class_mean_probs()).abs().max() < 1e-9
    with pytest.raises(ValueError, match='class_names'):
        stats.to_json_dict(['a'])


def test_stats_mismatch_errors():
    logits = [torch.randn(2, 4, 5, 6) for _ in range(3)]
    labels = torch.randint(0, 4, (2, 5, 6))
    stats = ClassProbStats()
    stats.update(logits, labels)
    with pytest.raises(ValueError, match='got 2 exits.*3 exits'):
        stats.update(logits[:2], labels)
    with pytest.raises(ValueError, match='K=3 classes.*K=4'):
        stats.update([lg[:, :3] for lg in logits], labels)
    with pytest.raises(ValueError, match='labels have shape'):
        stats.update(logits, labels[:, :4])
    with pytest.raises(ValueError, match='exit 1 logits have shape'):
        stats.update([logits[0], logits[1][:, :, :4]], labels)
    with pytest.raises(ValueError, match='integer'):
        stats.update(logits, labels.float())
    with pytest.raises(ValueError, match='cannot merge'):
        stats.merge(gather(random_dataset(num_batches=1)))
    with pytest.raises(RuntimeError, match='empty'):
        ClassProbStats().class_mean_probs()


def test_all_reduce_is_a_noop_without_distribution():
    pytest.importorskip('mmengine')
    stats = gather(random_dataset(num_batches=1))
    before = stats.fixed_point_sums
    assert stats.all_reduce() is stats
    assert torch.equal(stats.fixed_point_sums, before)


# ----------------------------------------------------------------------------------------------- plot
@pytest.mark.parametrize('per_exit', [False, True])
def test_plot_writes_png(tmp_path, per_exit):
    pytest.importorskip('matplotlib')
    names = [f'class {k}' for k in range(19)]
    g = torch.Generator().manual_seed(0)
    thr = ALPHA + (BETA - ALPHA) * torch.rand((3, 19) if per_exit else (19, ), generator=g)
    out = tmp_path / 'sub' / 'thr.png'
    assert plot_thresholds(thr, names, str(out), ALPHA, BETA, title='test') == str(out)
    data = out.read_bytes()
    assert len(data) > 1000 and data[:8] == b'\x89PNG\r\n\x1a\n'
    assert os.listdir(out.parent) == ['thr.png']  # no temporary file left behind
    with pytest.raises(ValueError, match='class names'):
        plot_thresholds(thr, names[:3], str(out), ALPHA, BETA)


def test_plot_other_class_count(tmp_path):
    pytest.importorskip('matplotlib')
    out = tmp_path / 'thr.png'
    plot_thresholds(torch.tensor([0.95, 0.95, 0.95, 0.95]), list('abcd'), str(out), 0.95, 0.95)
    assert out.stat().st_size > 0
