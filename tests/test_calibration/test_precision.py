"""Precision-targeted class thresholds (cbt-precision): exact histograms, hand-computed thresholds, merging."""
import os.path as osp
import warnings

import pytest
import torch

from mmseg_cbt.calibration import (CBTCalibrationWarning, PrecisionStats, check_precision_options, confidence_bins,
                                   precision_thresholds, stop_mask_from_probs)


def _hist(rows):
    """(N, K, 2, B) int64 from nested lists [exit][class] = (wrong counts per bin, correct counts per bin)."""
    return torch.tensor(rows, dtype=torch.int64)


# B = 4 bins: (0, .25], (.25, .5], (.5, .75], (.75, 1]
HAND = _hist([[
    ([0, 0, 3, 1], [0, 0, 2, 6]),  # class 0: precision 6/7 above .75, 8/12 above .5 and below
    ([0, 0, 1, 0], [0, 0, 0, 4]),  # class 1: 4/4 above .75, 4/5 from .5 down
    ([0, 0, 0, 1], [0, 0, 5, 0]),  # class 2: 0/1 above .75 but 5/6 from .5 down (not monotone)
    ([0, 0, 0, 0], [0, 0, 0, 0]),  # class 3: never predicted
]])


def test_hand_example():
    with pytest.warns(CBTCalibrationWarning, match=r'precision 0.8 for: exit 0: 3'):
        thr = precision_thresholds(HAND, 0.8, alpha=0.5, beta=1.0)
    # class 0: lowest edge with precision >= .8 is .75 (6/7); class 1: edge 0 (4/5 = .8) -> clipped to alpha;
    # class 2: edge 0 (5/6) -> alpha although the top bin alone fails; class 3: beta
    assert thr.tolist() == [[0.75, 0.5, 0.5, 1.0]]
    with pytest.warns(CBTCalibrationWarning, match=r'exit 0: 0, 2, 3'):
        thr = precision_thresholds(HAND, 0.9, alpha=0.6, beta=0.99)
    assert thr.tolist() == [pytest.approx([0.99, 0.75, 0.99, 0.99])]
    with pytest.warns(CBTCalibrationWarning):
        thr = precision_thresholds(HAND, 0.6, alpha=0.5, beta=0.7)
    assert thr.tolist() == [pytest.approx([0.5, 0.5, 0.5, 0.7])]  # edge 0 for 0..2 (8/12 >= .6)
    # shared over exits: the histograms of two identical exits summed give the same thresholds
    with pytest.warns(CBTCalibrationWarning, match=r'for: 3;'):
        shared = precision_thresholds(torch.cat([HAND, HAND]), 0.8, alpha=0.5, beta=1.0, share_exits=True)
    assert shared.tolist() == [0.75, 0.5, 0.5, 1.0]


def test_option_errors():
    for kw, match in [(dict(target=0.0), 'target precision must be in'), (dict(target=1.5), 'target'),
                      (dict(alpha=0.4), r'alpha must be in \[0.5, 1\]'), (dict(alpha=0.9, beta=0.8), 'beta must be'),
                      (dict(beta=float('nan')), 'beta'), (dict(target='x'), 'target must be a number')]:
        args = dict(target=0.9, alpha=0.5, beta=0.99)
        args.update(kw)
        with pytest.raises(ValueError, match=match):
            check_precision_options(**args)
    with pytest.raises(ValueError, match='power of two'):
        PrecisionStats(num_bins=1000)
    with pytest.raises(ValueError, match='power of two'):
        precision_thresholds(torch.zeros(1, 2, 2, 6, dtype=torch.int64), 0.9)


def test_bins_are_left_open_and_exact():
    b = 4096
    edges = torch.arange(b + 1, dtype=torch.float32) / b
    assert confidence_bins(edges, b).tolist() == [0] + list(range(b))  # an edge belongs to the bin below it
    above = torch.nextafter(edges[:-1], torch.tensor(2.0))
    assert confidence_bins(above, b).tolist() == list(range(b))


def _random_batches(num=3, n_exits=2, k=3, h=9, w=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(num):
        logits = [torch.randn(2, k, h, w, generator=g) * 3 for _ in range(n_exits)]
        labels = torch.randint(0, k, (2, h, w), generator=g)
        labels[:, 0] = 255
        out.append((logits, labels))
    return out


def _gather(batches, num_bins=64):
    stats = PrecisionStats(num_bins=num_bins)
    for logits, labels in batches:
        stats.update(logits, labels)
    return stats


def test_thresholds_equal_brute_force_over_pixels():
    """The thresholds from the histograms equal a search over every edge on the pixels themselves, with the strict
    stop rule of the model (so no pixel is on the wrong side of an edge)."""
    batches, b, target, alpha, beta = _random_batches(), 64, 0.75, 0.5, 0.97
    stats = _gather(batches, b)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', CBTCalibrationWarning)
        thr = precision_thresholds(stats, target, alpha, beta)
    assert stats.num_pixels == 3 * 2 * 8 * 11
    for n in range(2):
        probs = torch.cat([torch.softmax(lg[n], 1) for lg, _ in batches])
        pred = torch.cat([lg[n].argmax(1) for lg, _ in batches])
        labels = torch.cat([lb for _, lb in batches])
        for k in range(3):
            want = beta
            for e in range(b):
                t = torch.full((3, ), 2.0)
                t[k] = e / b
                stop = stop_mask_from_probs(probs, t) & (labels != 255)
                total = int(stop.sum())
                if e >= b // 2:  # above one half the OR rule stops exactly the argmax-k pixels above t
                    assert total == int((stop & (pred == k)).sum())
                sel = (pred == k) & (probs.amax(1) > e / b) & (labels != 255)
                correct, total = int((sel & (labels == k)).sum()), int(sel.sum())
                if total and correct >= target * total:
                    want = e / b
                    break
            assert float(thr[n, k]) == pytest.approx(min(max(want, alpha), beta))


def test_two_ranks_merged_equal_one_pass():
    batches = _random_batches(num=4)
    single = _gather(batches)
    merged = _gather(batches[0::2]).merge(_gather(batches[1::2]))
    assert torch.equal(merged.histogram, single.histogram)
    assert torch.equal(PrecisionStats(num_bins=64).merge(single).histogram, single.histogram)
    # a batch split in two halves of its images
    logits, labels = batches[0]
    half = PrecisionStats(num_bins=64)
    half.update([lg[:1] for lg in logits], labels[:1])
    half.update([lg[1:] for lg in logits], labels[1:])
    assert torch.equal(half.histogram, _gather(batches[:1]).histogram)
    restored = PrecisionStats.from_state_dict(single.state_dict())
    assert torch.equal(restored.histogram, single.histogram) and restored.num_bins == 64
    with pytest.raises(ValueError, match='cannot merge 32 bins'):
        single.merge(PrecisionStats(num_bins=32))
    with pytest.raises(ValueError, match='2 exits'):
        single.update([logits[0]], labels)
    with pytest.raises(ValueError, match='labels have shape'):
        single.update(logits, labels[:, 1:])


def _gloo_worker(rank, world_size, init_file, out_file):
    import torch.distributed as dist
    dist.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=world_size)
    try:
        batches = _random_batches(num=4)
        # rank 1 gets no batch: it still takes part, with the shapes given up front
        stats = PrecisionStats(2, 3, num_bins=64)
        for logits, labels in (batches[:3] if rank == 0 else batches[3:]):
            stats.update(logits, labels)
        stats.all_reduce()
        torch.save(stats.histogram, f'{out_file}.{rank}')
    finally:
        dist.destroy_process_group()


def test_all_reduce_two_processes_gloo(tmp_path):
    """A real 2-process gloo all-reduce gives the single-process histograms on both ranks."""
    import torch.multiprocessing as mp
    out = str(tmp_path / 'hist')
    mp.spawn(_gloo_worker, args=(2, str(tmp_path / 'init'), out), nprocs=2, join=True)
    single = _gather(_random_batches(num=4)).histogram
    for rank in range(2):
        assert osp.isfile(f'{out}.{rank}')
        assert torch.equal(torch.load(f'{out}.{rank}'), single)


def test_all_reduce_is_a_noop_without_distribution():
    stats = _gather(_random_batches(num=1))
    before = stats.histogram
    assert torch.equal(stats.all_reduce().histogram, before)
