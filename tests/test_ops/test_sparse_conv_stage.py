"""The stage API of the masked conv (SparseIndex, padded buffers, PackedConv, sparse_conv_rows / _buffer,
dense_conv_buffer): parity, copy semantics of stopped positions, index reuse, stride 2, BN folding, errors."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from utils import SPARSE_ATOL as ATOL
from utils import assert_active_close, blob_mask, mask_where, two_masks

from mmseg_cbt.ops import (PackedConv, SparseConv2d, SparseIndex, conv_weight_matrix, dense_conv_buffer, gather_rows,
                           new_padded_buffer, padded_interior, scatter_rows, sparse_conv2d, sparse_conv_buffer,
                           sparse_conv_rows, to_padded_nhwc)
from mmseg_cbt.ops.sparse_conv import torch_impl


@pytest.mark.parametrize('threshold', [0.0, 1.0])  # dense fallback / sparse path
def test_stage_chain_index_reuse(threshold):
    """Basic-block-like chain with one index: conv-relu, conv + residual - relu, 1x1, copy fill."""
    torch.manual_seed(2)
    n, c, h, w = 2, 6, 21, 27
    x = torch.randn(n, c, h, w)
    mask = two_masks(n, h, w, seed=7)
    c1 = PackedConv.from_weight(torch.randn(c, c, 3, 3) * 0.2, torch.randn(c))
    c2 = PackedConv.from_weight(torch.randn(c, c, 3, 3) * 0.2, torch.randn(c))
    c3 = PackedConv.from_weight(torch.randn(c + 2, c, 1, 1), None)

    idx = SparseIndex.build(mask)
    buf0 = to_padded_nhwc(x)
    # stopped positions of the outputs hold the caller's "copy" values: here the block input
    buf1 = to_padded_nhwc(x)
    buf2 = to_padded_nhwc(x)
    c1.apply(buf0, idx, buf1, relu=True, dense_threshold=threshold)
    c2.apply(buf1, idx, buf2, residual=buf0, relu=True, dense_threshold=threshold)
    y3 = c3.rows(buf2, idx, dense_threshold=threshold)
    if threshold >= 1.0:  # one 3x3 table shared by c1 and c2, one 1x1 table
        assert len(idx._windows) == 2

    r1 = mask_where(mask, F.relu(F.conv2d(x, c1.weight, c1.bias, padding=1)), x)
    r2 = mask_where(mask, F.relu(F.conv2d(r1, c2.weight, c2.bias, padding=1) + x), x)
    r3 = F.conv2d(r2, c3.weight)
    assert torch.allclose(padded_interior(buf1), r1, atol=ATOL)
    assert torch.allclose(padded_interior(buf2), r2, atol=ATOL)
    assert torch.allclose(y3, r3.permute(0, 2, 3, 1)[mask], atol=ATOL)
    # border stays zero (it is the padding of the next conv)
    assert torch.all(buf2[:, 0] == 0) and torch.all(buf2[:, :, -1] == 0)


@pytest.mark.parametrize('active', [0.2, 0.8, 1.0])  # write active rows / restore stopped rows / full
@pytest.mark.parametrize('rows_residual', [False, True])
@pytest.mark.parametrize('k', [1, 3])  # the 1x1 fallback is one GEMM straight into the buffer
def test_dense_fallback_copy_semantics(active, rows_residual, k):
    torch.manual_seed(12)
    x = torch.randn(2, 5, 14, 18)
    w, b = torch.randn(5, 5, k, k), torch.randn(5)
    mask = blob_mask(2, 14, 18, active, seed=15)
    idx = SparseIndex.build(mask)
    prev = torch.randn(2, 5, 14, 18)
    buf = to_padded_nhwc(x)
    res = gather_rows(buf, idx) if rows_residual else buf
    out = to_padded_nhwc(prev)
    sparse_conv_buffer(
        buf, idx, conv_weight_matrix(w), b, out, residual=res, relu=True,
        dense_threshold=-1.0)  # always the dense fallback
    ref = mask_where(mask, F.relu(F.conv2d(x, w, b, padding=k // 2) + x), prev)
    assert torch.allclose(padded_interior(out), ref, atol=ATOL)
    assert torch.all(out[:, 0] == 0) and torch.all(out[:, :, 0] == 0)
    assert torch.all(out[:, -1] == 0) and torch.all(out[:, :, -1] == 0)


def test_rows_residual_relu_and_scatter():
    torch.manual_seed(3)
    x = torch.randn(2, 5, 15, 19)
    mask = two_masks(2, 15, 19, seed=8)
    w, b = torch.randn(5, 5, 3, 3), torch.randn(5)
    idx = SparseIndex.build(mask)
    buf = to_padded_nhwc(x)
    res_rows = gather_rows(buf, idx)
    assert torch.equal(res_rows, x.permute(0, 2, 3, 1)[mask])
    ref = F.relu(F.conv2d(x, w, b, padding=1) + x).permute(0, 2, 3, 1)[mask]
    for res in (res_rows, buf):  # compact rows or a padded buffer
        for chunk in (None, 7):
            y = sparse_conv_rows(
                buf, idx, conv_weight_matrix(w), b, residual=res, relu=True, chunk_rows=chunk, dense_threshold=1.0)
            assert torch.allclose(y, ref, atol=ATOL)
    y = sparse_conv_rows(buf, idx, conv_weight_matrix(w), b, residual=res_rows, relu=True, dense_threshold=0.0)
    assert torch.allclose(y, ref, atol=ATOL)
    out = new_padded_buffer(2, 5, 15, 19)
    scatter_rows(out, idx, y)
    assert torch.allclose(
        padded_interior(out),
        mask_where(mask, F.relu(F.conv2d(x, w, b, padding=1) + x), torch.zeros_like(x)),
        atol=ATOL)


@pytest.mark.parametrize('threshold', [0.0, 1.0])
def test_stride2_from_finer_buffer_and_footprint(threshold):
    """HRNet transition / fuse downsampling: 3x3 s2 p1 twice, index at the coarse grid only."""
    torch.manual_seed(4)
    x = torch.randn(2, 4, 33, 42)  # odd height: 17 then 9 rows
    w1, w2 = torch.randn(6, 4, 3, 3), torch.randn(8, 6, 3, 3)
    mid = F.conv2d(x, w1, None, 2, 1)
    ref = F.conv2d(mid, w2, None, 2, 1)
    mask = two_masks(2, ref.shape[2], ref.shape[3], seed=9)
    idx2 = SparseIndex.build(mask)
    # the intermediate conv must cover the footprint of the last one to stay exact
    foot = idx2.input_footprint(tuple(mid.shape[2:]), 3, 2, 1)
    idx1 = SparseIndex.build(foot)
    buf0 = to_padded_nhwc(x)
    buf1 = new_padded_buffer(2, 6, *mid.shape[2:])
    buf2 = new_padded_buffer(2, 8, *ref.shape[2:])
    sparse_conv_buffer(buf0, idx1, conv_weight_matrix(w1), None, buf1, stride=2, dense_threshold=threshold)
    sparse_conv_buffer(buf1, idx2, conv_weight_matrix(w2), None, buf2, stride=2, dense_threshold=threshold)
    assert_active_close(padded_interior(buf2), ref, mask)


def test_packed_conv_folds_bn():
    torch.manual_seed(5)
    conv = nn.Conv2d(4, 6, 3, 2, 1, bias=False)
    bn = nn.BatchNorm2d(6)
    bn.running_mean.uniform_(-1, 1)
    bn.running_var.uniform_(0.5, 2)
    bn.weight.data.uniform_(0.5, 1.5)
    bn.bias.data.uniform_(-1, 1)
    bn.eval()
    x = torch.randn(2, 4, 20, 24)
    with torch.no_grad():
        ref = F.relu(bn(conv(x)))
    mask = two_masks(2, 10, 12, seed=10)
    pc = PackedConv.from_conv(conv, bn)
    idx = SparseIndex.build(mask)
    out = new_padded_buffer(2, 6, 10, 12)
    pc.apply(to_padded_nhwc(x), idx, out, relu=True)
    assert_active_close(padded_interior(out), ref, mask)
    dense = new_padded_buffer(2, 6, 10, 12)
    dense_conv_buffer(to_padded_nhwc(x), pc.weight, pc.bias, dense, stride=2, relu=True)
    assert torch.allclose(padded_interior(dense), ref, atol=ATOL)


def test_inference_mode_and_autograd():
    """Works under inference mode; with autograd active the op stays differentiable."""
    torch.manual_seed(10)
    x = torch.randn(1, 6, 48, 64)
    w, b = torch.randn(6, 6, 3, 3), torch.randn(6)
    mask = blob_mask(1, 48, 64, 0.5, seed=16)
    torch_impl._TLS.scratch = {}  # make the sparse path allocate its scratch buffers inside inference mode
    with torch.inference_mode():
        xi, wi, bi = x.clone(), w.clone(), b.clone()
        buf, out = to_padded_nhwc(xi), new_padded_buffer(1, 6, 48, 64)
        sparse_conv_buffer(buf, SparseIndex.build(mask), conv_weight_matrix(wi), bi, out, dense_threshold=1.0)
        assert_active_close(padded_interior(out), F.conv2d(xi, wi, bi, padding=1), mask)
    with torch.no_grad():  # the scratch buffers created under inference mode stay usable outside it
        y = sparse_conv2d(x, w, b, mask, 1, 1, dense_threshold=1.0)
        assert_active_close(y, F.conv2d(x, w, b, padding=1), mask)
    conv = SparseConv2d(6, 6, 3, padding=1)
    xg = x.clone().requires_grad_()
    conv(xg, mask).sum().backward()
    ref_conv = nn.Conv2d(6, 6, 3, padding=1)
    ref_conv.load_state_dict(conv.state_dict())
    xr = x.clone().requires_grad_()
    (ref_conv(xr) * mask[:, None]).sum().backward()
    assert torch.allclose(xg.grad, xr.grad, atol=ATOL)
    assert torch.allclose(conv.weight.grad, ref_conv.weight.grad, atol=1e-3)


def test_buffer_api_errors():
    idx = SparseIndex.build(torch.ones(1, 6, 6, dtype=torch.bool))
    buf = new_padded_buffer(1, 3, 6, 6)
    wm = conv_weight_matrix(torch.randn(4, 3, 3, 3))
    with pytest.raises(ValueError, match='does not match the index grid'):
        sparse_conv_buffer(buf, idx, wm, None, new_padded_buffer(1, 4, 5, 6))
    with pytest.raises(ValueError, match='must not alias'):
        sparse_conv_buffer(buf, idx, conv_weight_matrix(torch.randn(3, 3, 3, 3)), None, buf)
    with pytest.raises(ValueError, match='weight matrix'):
        sparse_conv_rows(buf, idx, torch.randn(20, 4))
    with pytest.raises(ValueError, match='batch mismatch'):
        sparse_conv_rows(new_padded_buffer(2, 3, 6, 6), idx, wm)
    with pytest.raises(ValueError, match='contiguous channels-last'):
        sparse_conv_rows(buf.permute(0, 2, 1, 3), idx, wm)


# ---------------------------------------------------------------------------------------------------
# module


@pytest.mark.parametrize('pad', [1, 2])
def test_to_padded_nhwc_zero_border(pad):
    """The buffer is allocated uninitialised and only its border zeroed: border exactly 0, interior the input."""
    for _ in range(3):  # reuse freed (dirty) memory of the previous iteration's buffers
        x = torch.randn(2, 5, 7, 9) + 3.0
        buf = to_padded_nhwc(x, pad)
        assert buf.shape == (2, 7 + 2 * pad, 9 + 2 * pad, 5) and buf.is_contiguous()
        inner = torch.zeros_like(buf, dtype=torch.bool)
        inner[:, pad:pad + 7, pad:pad + 9] = True
        assert torch.equal(buf[~inner], torch.zeros_like(buf[~inner]))
        assert torch.equal(padded_interior(buf, pad), x)
        del buf
