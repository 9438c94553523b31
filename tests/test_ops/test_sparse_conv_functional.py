"""The masked conv as an NCHW op and a module (mmseg_cbt.ops.sparse_conv2d, SparseConv2d): parity with F.conv2d at
active positions, stopped positions, the dense branch, argument errors."""
import types

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from utils import SPARSE_ATOL as ATOL
from utils import assert_active_close, blob_mask, two_masks

from mmseg_cbt.ops import SparseConv2d, SparseIndex, dense_crossover, sparse_conv2d
from mmseg_cbt.ops.sparse_conv import functional


@pytest.mark.parametrize('k', [1, 3])
@pytest.mark.parametrize('stride', [1, 2])
@pytest.mark.parametrize('padding', [0, 1])
@pytest.mark.parametrize('with_bias', [True, False])
def test_parity_small(k, stride, padding, with_bias):
    torch.manual_seed(0)
    x = torch.randn(2, 5, 25, 33)
    w = torch.randn(7, 5, k, k)
    b = torch.randn(7) if with_bias else None
    ref = F.conv2d(x, w, b, stride, padding)
    mask = two_masks(2, ref.shape[2], ref.shape[3], seed=k + stride + padding)
    assert not torch.equal(mask[0], mask[1])
    y = sparse_conv2d(x, w, b, mask, stride=stride, padding=padding, dense_threshold=1.0)
    assert y.shape == ref.shape
    assert_active_close(y, ref, mask)
    assert torch.all(y[~mask[:, None].expand_as(y)] == 0)


@pytest.mark.parametrize('k,stride,padding', [(3, 1, 1), (3, 2, 1), (1, 1, 0)])
def test_parity_large_odd(k, stride, padding):
    torch.manual_seed(1)
    x = torch.randn(2, 3, 250, 330)
    w = torch.randn(4, 3, k, k)
    b = torch.randn(4)
    ref = F.conv2d(x, w, b, stride, padding)
    mask = torch.stack([blob_mask(1, *ref.shape[2:], 0.25, 3)[0], blob_mask(1, *ref.shape[2:], 0.1, 4)[0]])
    y = sparse_conv2d(x, w, b, mask, stride=stride, padding=padding)
    assert_active_close(y, ref, mask)


def test_empty_mask_computes_nothing(monkeypatch):
    x = torch.randn(2, 4, 9, 11)
    w = torch.randn(6, 4, 3, 3)
    mask = torch.zeros(2, 9, 11, dtype=torch.bool)
    called = []
    monkeypatch.setattr(functional, 'sparse_conv_rows', lambda *a, **kw: called.append(1))
    y = sparse_conv2d(x, w, None, mask, padding=1)
    assert y.shape == (2, 6, 9, 11) and torch.all(y == 0)
    out = torch.full((2, 6, 9, 11), 7.0)
    assert sparse_conv2d(x, w, torch.ones(6), mask, padding=1, out=out) is out
    assert torch.all(out == 7.0) and not called


def test_full_mask_is_dense():
    x = torch.randn(2, 4, 13, 17)
    w, b = torch.randn(6, 4, 3, 3), torch.randn(6)
    mask = torch.ones(2, 7, 9, dtype=torch.bool)
    ref = F.conv2d(x, w, b, 2, 1)
    assert torch.allclose(sparse_conv2d(x, w, b, mask, stride=2, padding=1), ref, atol=ATOL)
    # forced sparse path on a full mask: same numbers
    assert torch.allclose(sparse_conv2d(x, w, b, mask, 2, 1, dense_threshold=1.0), ref, atol=ATOL)


@pytest.mark.parametrize('threshold', [0.0, 1.0])  # dense branch, sparse branch
def test_out_keeps_stopped_values(threshold):
    x = torch.randn(2, 4, 12, 10)
    w, b = torch.randn(5, 4, 3, 3), torch.randn(5)
    mask = two_masks(2, 12, 10, seed=5)
    prev = torch.randn(2, 5, 12, 10)
    out = prev.clone()
    y = sparse_conv2d(x, w, b, mask, 1, 1, out=out, dense_threshold=threshold)
    assert y is out
    ref = F.conv2d(x, w, b, 1, 1)
    assert_active_close(out, ref, mask)
    stopped = ~mask[:, None].expand_as(out)
    assert torch.equal(out[stopped], prev[stopped])
    # channels-last `out` works too
    out_cl = prev.clone().contiguous(memory_format=torch.channels_last)
    sparse_conv2d(x, w, b, mask, 1, 1, out=out_cl, dense_threshold=threshold)
    assert torch.allclose(out_cl, out, atol=ATOL)


def test_fallback_to_dense_branch(monkeypatch):
    x = torch.randn(1, 4, 16, 16)
    w = torch.randn(4, 4, 3, 3)
    mask = torch.ones(1, 16, 16, dtype=torch.bool)
    mask[0, :1, :] = False  # 93.75 % active: above the crossover of every table (at most 0.9)
    for compiled, direct in ((False, False), (True, False), (True, True)):
        assert SparseIndex.build(mask).active_fraction > dense_crossover(3, 4, 4, compiled, direct)
    calls = []
    fake_f = types.SimpleNamespace(conv2d=lambda *a, **kw: calls.append(1) or F.conv2d(*a, **kw))
    monkeypatch.setattr(functional, 'F', fake_f)
    y = sparse_conv2d(x, w, None, mask, padding=1)
    assert calls, 'dense conv not used above the crossover'
    assert_active_close(y, F.conv2d(x, w, None, 1, 1), mask)
    assert torch.all(y[0, :, :1] == 0)
    calls.clear()
    sparse_conv2d(x, w, None, torch.rand(1, 16, 16) < 0.2, padding=1)
    assert not calls, 'dense conv used below the crossover'


def test_errors():
    x = torch.randn(2, 4, 10, 10)
    w = torch.randn(3, 4, 3, 3)
    good = torch.ones(2, 10, 10, dtype=torch.bool)
    with pytest.raises(ValueError, match='mask spatial shape'):
        sparse_conv2d(x, w, None, torch.ones(2, 9, 10, dtype=torch.bool), padding=1)
    with pytest.raises(ValueError, match='mask spatial shape'):  # stride 2 output is 5x5
        sparse_conv2d(x, w, None, good, stride=2, padding=1)
    with pytest.raises(TypeError, match='mask must be a bool'):
        sparse_conv2d(x, w, None, good.float(), padding=1)
    with pytest.raises(ValueError, match='kernel sizes'):
        sparse_conv2d(x, torch.randn(3, 4, 5, 5), None, torch.ones(2, 8, 8, dtype=torch.bool), padding=1)
    with pytest.raises(ValueError, match='strides'):
        sparse_conv2d(x, w, None, torch.ones(2, 4, 4, dtype=torch.bool), stride=3, padding=1)
    with pytest.raises(ValueError, match='batch mismatch'):
        sparse_conv2d(x, w, None, torch.ones(3, 10, 10, dtype=torch.bool), padding=1)
    with pytest.raises(ValueError, match='input channels'):
        sparse_conv2d(x, torch.randn(3, 5, 3, 3), None, good, padding=1)
    with pytest.raises(TypeError, match='dtype mismatch'):
        sparse_conv2d(x, w.double(), None, good, padding=1)
    with pytest.raises(ValueError, match='out must have the output shape'):
        sparse_conv2d(x, w, None, good, padding=1, out=torch.zeros(2, 3, 9, 10))
    with pytest.raises(ValueError, match=r'\(N, H_out, W_out\)'):
        sparse_conv2d(x, w, None, good[0], padding=1)
    with pytest.raises(TypeError, match='mask must be a bool'):
        SparseIndex.build(good.int())
    idx = SparseIndex.build(good)
    with pytest.raises(ValueError, match='does not match the conv output'):
        idx.windows((10, 10), 3, 2, 1)
    with pytest.raises(ValueError, match='exceeds the input buffer border'):
        idx.windows((8, 8), 3, 1, 1, in_pad=0)


# ---------------------------------------------------------------------------------------------------
# stage API


# ---------------------------------------------------------------------------------------------------
def test_module_state_dict_and_forward():
    torch.manual_seed(6)
    plain = nn.Conv2d(4, 6, 3, 2, 1)
    sparse = SparseConv2d(4, 6, 3, 2, 1)
    sparse.load_state_dict(plain.state_dict())
    assert sparse.state_dict().keys() == plain.state_dict().keys()
    x = torch.randn(2, 4, 17, 23)
    with torch.no_grad():
        ref = plain(x)
        assert torch.equal(sparse(x), ref)
        mask = two_masks(2, *ref.shape[2:], seed=11)
        y = sparse(x, mask)
        assert_active_close(y, ref, mask)
        prev = torch.randn_like(ref)
        out = prev.clone()
        sparse(x, mask, out=out)
        assert torch.equal(out[~mask[:, None].expand_as(out)], prev[~mask[:, None].expand_as(out)])
        with pytest.raises(ValueError, match='dilation'):
            SparseConv2d(4, 6, 3, dilation=2)(x, torch.ones(2, 13, 19, dtype=torch.bool))
