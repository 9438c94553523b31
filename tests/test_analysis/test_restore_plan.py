"""Label maps from one resize per exit equal the real resize-restore-argmax of every held-exit map."""
import types

import pytest
import torch
import torch.nn.functional as F

from mmseg_cbt.analysis.restore_plan import CellConfusion, ExitLabelRestorer
from mmseg_cbt.analysis.sweep import argmax_channels
from mmseg_cbt.models import EarlyExitEncoderDecoder


def _model(align_corners: bool):
    """An object with the segmentor's real ``restore_logits`` (it reads only ``align_corners``)."""
    obj = types.SimpleNamespace(align_corners=align_corners)
    obj.restore_logits = types.MethodType(EarlyExitEncoderDecoder.restore_logits, obj)
    return obj


def _blobs(h: int, w: int, num_exits: int, seed: int) -> torch.Tensor:
    """A held-exit map of smooth regions (as stop masks make them), uint8 in [0, num_exits)."""
    gen = torch.Generator().manual_seed(seed)
    noise = F.interpolate(torch.rand(1, 1, h // 4 + 1, w // 4 + 1, generator=gen), size=(h, w), mode='bilinear')[0, 0]
    return (noise * num_exits).clamp(max=num_exits - 1).to(torch.uint8)


GEOMETRIES = [
    # low (h, w), first resize, meta
    ((16, 24), (64, 96), dict(ori_shape=(64, 96))),
    ((13, 21), (52, 84), dict(ori_shape=(37, 119))),  # non-integer second scale
    ((16, 24), (64, 96), dict(ori_shape=(50, 70), padding_size=[0, 6, 0, 4], flip=True, flip_direction='horizontal')),
    ((15, 20), (60, 80), dict(ori_shape=(90, 120), padding_size=[3, 0, 2, 0], flip=True, flip_direction='vertical')),
]


@pytest.mark.parametrize('align_corners', [False, True])
@pytest.mark.parametrize('geometry', GEOMETRIES)
def test_labels_equal_the_real_chain(geometry, align_corners):
    (h, w), first, meta = geometry
    model = _model(align_corners)
    gen = torch.Generator().manual_seed(1)
    dense = [4 * torch.randn(7, h, w, generator=gen) for _ in range(4)]
    restorer = ExitLabelRestorer(model, dense, first, meta, argmax_channels)
    mixed_pixels = 0
    for seed in range(6):
        held = _blobs(h, w, 4, seed)
        logits = torch.stack(dense).gather(0, held.long()[None, None].expand(1, 7, h, w))[0]
        want = restorer.real(logits)
        got = restorer.labels(held)
        assert got.shape == tuple(meta['ori_shape'])
        assert torch.equal(got, want)
        lo, hi = restorer.plan.mixed(held)
        mixed_pixels += int((lo != hi).sum())
    assert mixed_pixels > 0  # the border recomputation really ran
    # a uniform map is exactly that exit's own labels
    assert torch.equal(restorer.labels(torch.full((h, w), 2, dtype=torch.uint8)), restorer.real(dense[2]))


def test_near_ties_and_non_finite_fall_back_to_the_real_chain():
    model = _model(False)
    h, w = 12, 16
    gen = torch.Generator().manual_seed(2)
    a, b = torch.randn(5, h, w, generator=gen), torch.randn(5, h, w, generator=gen)
    for x in (a, b):
        x[1] = x[0] = 10.0  # channels 0 and 1 equal and first in both exits: every border pixel is a tie
    held = torch.zeros(h, w, dtype=torch.uint8)
    held[:, w // 2:] = 1
    meta = dict(ori_shape=(45, 61))
    restorer = ExitLabelRestorer(model, [a, b], (48, 64), meta, argmax_channels)
    logits = torch.where(held.bool()[None], b, a)
    assert torch.equal(restorer.labels(held), restorer.real(logits))
    assert restorer.fallbacks == 1
    a2 = a.clone()
    a2[:, 0, 0] = float('nan')
    nan_restorer = ExitLabelRestorer(model, [a2, b], (48, 64), meta, argmax_channels)
    logits = torch.where(held.bool()[None], b, a2)
    assert torch.equal(nan_restorer.labels(held), nan_restorer.real(logits))
    assert nan_restorer.fallbacks == 1


def test_taps_are_the_sources_torch_reads():
    """Moving one low-resolution value changes exactly the output pixels the plan lists it as a source of."""
    model = _model(False)
    h, w = 10, 14
    meta = dict(ori_shape=(33, 47), padding_size=[0, 2, 0, 1], flip=True, flip_direction='horizontal')
    base = torch.zeros(1, h, w)
    restorer = ExitLabelRestorer(model, [base], (40, 56), meta, argmax_channels)
    plan = restorer.plan
    from mmseg.models.utils import resize

    def chain(x):
        return model.restore_logits(resize(x[None], size=(40, 56), mode='bilinear', warning=False), meta)[0]

    for (i, j) in [(0, 0), (4, 7), (h - 1, w - 1), (h - 2, 3)]:
        x = base.clone()
        x[0, i, j] = 1.0
        moved = chain(x) != 0
        rows = (plan.rows[0] == i) & (plan.rows[1] != 0)
        cols = (plan.cols[0] == j) & (plan.cols[1] != 0)
        listed = rows.any(1)[:, None] & cols.any(1)[None, :]
        assert torch.equal(moved, listed), (i, j)
    for idx, _, start, span in (plan.rows, plan.cols):  # the lookup windows hold every tap
        assert bool(((idx >= start[:, None]) & (idx < start[:, None] + span)).all())


def _want_counts(restorer, dense, held, offset, k):
    h, w = held.shape
    logits = torch.stack(dense).gather(0, held.long()[None, None].expand(1, k, h, w))[0]
    pred = restorer.real(logits).reshape(-1)
    keep = offset >= 0
    return torch.bincount(offset[keep] + pred[keep], minlength=(k + 1) * k)


@pytest.mark.parametrize('geometry', GEOMETRIES)
def test_cell_counts_equal_the_real_chain(geometry):
    """Counts per cell (pure windows, clear mixed windows, the rest pixel by pixel) equal those of the real chain."""
    (h, w), first, meta = geometry
    model = _model(False)
    gen = torch.Generator().manual_seed(4)
    k = 7
    # the exits agree on the class in the left half (clear mixed windows there), disagree on the right
    base = torch.zeros(k, h, w)
    base[2, :, :w // 2] = 20.0
    dense = [base + torch.randn(k, h, w, generator=gen) for _ in range(4)]
    for d in dense[1:]:
        d[:, :, w // 2:] = 4 * torch.randn(k, h, w - w // 2, generator=gen)
    restorer = ExitLabelRestorer(model, dense, first, meta, argmax_channels)
    out_h, out_w = meta['ori_shape']
    label = torch.randint(0, k + 2, (out_h * out_w, ), generator=gen)  # k + 1: ignored, k: outside [0, K)
    offset = torch.where(label == k + 1, torch.full_like(label, -1), label * k)
    counter = CellConfusion(restorer, offset, k)
    calls = []
    border_labels = restorer._border_labels
    restorer._border_labels = lambda held, pos: calls.append(pos.numel()) or border_labels(held, pos)
    mixed = 0
    for seed in range(6):
        held = _blobs(h, w, 4, seed)
        assert torch.equal(counter.counts(held), _want_counts(restorer, dense, held, offset, k)), seed
        lo, hi = restorer.plan.mixed(held)
        mixed += int((lo != hi).sum())
    uniform = torch.full((h, w), 3, dtype=torch.uint8)
    assert torch.equal(counter.counts(uniform), _want_counts(restorer, dense, uniform, offset, k))
    assert counter.full_counts == 0 and sum(calls) > 0  # no fallback; some pixels were labelled one by one
    assert sum(calls) < mixed  # the clear mixed windows were counted per cell


def test_cell_counts_fall_back_at_near_ties():
    model = _model(False)
    h, w, k = 12, 16, 5
    gen = torch.Generator().manual_seed(2)
    a, b = torch.randn(k, h, w, generator=gen), torch.randn(k, h, w, generator=gen)
    for x in (a, b):
        x[1] = x[0] = 10.0  # channels 0 and 1 equal and first in both exits: every mixed pixel is a tie
    held = torch.zeros(h, w, dtype=torch.uint8)
    held[:, w // 2:] = 1
    restorer = ExitLabelRestorer(model, [a, b], (48, 64), dict(ori_shape=(45, 61)), argmax_channels)
    offset = torch.randint(0, k + 1, (45 * 61, ), generator=gen) * k
    counter = CellConfusion(restorer, offset, k)
    assert torch.equal(counter.counts(held), _want_counts(restorer, [a, b], held, offset, k))
    assert counter.full_counts == 1


def test_pixels_of_cells_are_the_pixels_reading_that_window():
    model = _model(False)
    h, w = 12, 16
    meta = dict(ori_shape=(45, 61), flip=True, flip_direction='horizontal')
    plan = ExitLabelRestorer(model, [torch.zeros(3, h, w)], (48, 64), meta, argmax_channels).plan
    n_c = w - plan.cols[3] + 1
    for r, c in [(0, 0), (5, 9), (h - plan.rows[3], n_c - 1)]:
        pos = plan.pixels_of_cells(torch.tensor([r * n_c + c]))
        want = ((plan.rows[2] == r)[:, None] & (plan.cols[2] == c)[None, :]).reshape(-1).nonzero().squeeze(1)
        assert torch.equal(pos.sort().values, want) and want.numel() > 0
    order, _, _, counts = plan.cells()
    assert int(counts.sum()) == 45 * 61 and torch.equal(order.sort().values, torch.arange(45 * 61))
