"""Tests of the masked convolution ops (mmseg_cbt.ops): parity with F.conv2d at active positions."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import types

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from utils import ROOT, require_cpu_ext

import mmseg_cbt.ops.sparse_conv as sc
from mmseg_cbt.ops import (PackedConv, SparseConv2d, SparseIndex, conv_weight_matrix, dense_conv_buffer, gather_rows,
                           new_padded_buffer, padded_interior, scatter_rows, set_cpu_algorithm, sparse_conv2d,
                           sparse_conv_buffer, sparse_conv_rows, to_padded_nhwc)

ATOL = 1e-4


def _blob_mask(n: int, h: int, w: int, active: float, seed: int) -> torch.Tensor:
    """Blob-shaped mask (thresholded smoothed noise) with about ``active`` fraction True per image."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.rand(n, 1, h, w, generator=g)
    noise = F.avg_pool2d(noise, 5, stride=1, padding=2, count_include_pad=False)
    flat = noise.view(n, -1)
    q = torch.quantile(flat, 1.0 - active, dim=1, keepdim=True) if active > 0 else flat.max(1, True)[0] + 1
    return (flat > q).view(n, h, w) if active < 1 else torch.ones(n, h, w, dtype=torch.bool)


def _masks(n, h, w, seed=0):
    """Two images with different masks: a blob mask and a random one."""
    g = torch.Generator().manual_seed(seed)
    m = torch.rand(n, h, w, generator=g) < 0.35
    m[0] = _blob_mask(1, h, w, 0.3, seed)[0]
    return m


def _assert_active_close(y, ref, mask, atol=ATOL):
    keep = mask[:, None].expand_as(ref)
    assert torch.allclose(y[keep], ref[keep], atol=atol, rtol=0), (y[keep] - ref[keep]).abs().max()


# ---------------------------------------------------------------------------------------------------
# functional op
# ---------------------------------------------------------------------------------------------------
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
    mask = _masks(2, ref.shape[2], ref.shape[3], seed=k + stride + padding)
    assert not torch.equal(mask[0], mask[1])
    y = sparse_conv2d(x, w, b, mask, stride=stride, padding=padding, dense_threshold=1.0)
    assert y.shape == ref.shape
    _assert_active_close(y, ref, mask)
    assert torch.all(y[~mask[:, None].expand_as(y)] == 0)


@pytest.mark.parametrize('k,stride,padding', [(3, 1, 1), (3, 2, 1), (1, 1, 0)])
def test_parity_large_odd(k, stride, padding):
    torch.manual_seed(1)
    x = torch.randn(2, 3, 250, 330)
    w = torch.randn(4, 3, k, k)
    b = torch.randn(4)
    ref = F.conv2d(x, w, b, stride, padding)
    mask = torch.stack([_blob_mask(1, *ref.shape[2:], 0.25, 3)[0], _blob_mask(1, *ref.shape[2:], 0.1, 4)[0]])
    y = sparse_conv2d(x, w, b, mask, stride=stride, padding=padding)
    _assert_active_close(y, ref, mask)


def test_empty_mask_computes_nothing(monkeypatch):
    x = torch.randn(2, 4, 9, 11)
    w = torch.randn(6, 4, 3, 3)
    mask = torch.zeros(2, 9, 11, dtype=torch.bool)
    called = []
    monkeypatch.setattr(sc, 'sparse_conv_rows', lambda *a, **kw: called.append(1))
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
    mask = _masks(2, 12, 10, seed=5)
    prev = torch.randn(2, 5, 12, 10)
    out = prev.clone()
    y = sparse_conv2d(x, w, b, mask, 1, 1, out=out, dense_threshold=threshold)
    assert y is out
    ref = F.conv2d(x, w, b, 1, 1)
    _assert_active_close(out, ref, mask)
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
        assert SparseIndex.build(mask).active_fraction > sc.dense_crossover(3, 4, 4, compiled, direct)
    calls = []
    fake_f = types.SimpleNamespace(conv2d=lambda *a, **kw: calls.append(1) or F.conv2d(*a, **kw))
    monkeypatch.setattr(sc, 'F', fake_f)
    y = sparse_conv2d(x, w, None, mask, padding=1)
    assert calls, 'dense conv not used above the crossover'
    _assert_active_close(y, F.conv2d(x, w, None, 1, 1), mask)
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
def _where(mask, new, old):
    return torch.where(mask[:, None], new, old)


@pytest.mark.parametrize('threshold', [0.0, 1.0])  # dense fallback / sparse path
def test_stage_chain_index_reuse(threshold):
    """Basic-block-like chain with one index: conv-relu, conv + residual - relu, 1x1, copy fill."""
    torch.manual_seed(2)
    n, c, h, w = 2, 6, 21, 27
    x = torch.randn(n, c, h, w)
    mask = _masks(n, h, w, seed=7)
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

    r1 = _where(mask, F.relu(F.conv2d(x, c1.weight, c1.bias, padding=1)), x)
    r2 = _where(mask, F.relu(F.conv2d(r1, c2.weight, c2.bias, padding=1) + x), x)
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
    mask = _blob_mask(2, 14, 18, active, seed=15)
    idx = SparseIndex.build(mask)
    prev = torch.randn(2, 5, 14, 18)
    buf = to_padded_nhwc(x)
    res = gather_rows(buf, idx) if rows_residual else buf
    out = to_padded_nhwc(prev)
    sparse_conv_buffer(
        buf, idx, conv_weight_matrix(w), b, out, residual=res, relu=True,
        dense_threshold=-1.0)  # always the dense fallback
    ref = _where(mask, F.relu(F.conv2d(x, w, b, padding=k // 2) + x), prev)
    assert torch.allclose(padded_interior(out), ref, atol=ATOL)
    assert torch.all(out[:, 0] == 0) and torch.all(out[:, :, 0] == 0)
    assert torch.all(out[:, -1] == 0) and torch.all(out[:, :, -1] == 0)


def test_rows_residual_relu_and_scatter():
    torch.manual_seed(3)
    x = torch.randn(2, 5, 15, 19)
    mask = _masks(2, 15, 19, seed=8)
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
        padded_interior(out), _where(mask, F.relu(F.conv2d(x, w, b, padding=1) + x), torch.zeros_like(x)), atol=ATOL)


@pytest.mark.parametrize('threshold', [0.0, 1.0])
def test_stride2_from_finer_buffer_and_footprint(threshold):
    """HRNet transition / fuse downsampling: 3x3 s2 p1 twice, index at the coarse grid only."""
    torch.manual_seed(4)
    x = torch.randn(2, 4, 33, 42)  # odd height: 17 then 9 rows
    w1, w2 = torch.randn(6, 4, 3, 3), torch.randn(8, 6, 3, 3)
    mid = F.conv2d(x, w1, None, 2, 1)
    ref = F.conv2d(mid, w2, None, 2, 1)
    mask = _masks(2, ref.shape[2], ref.shape[3], seed=9)
    idx2 = SparseIndex.build(mask)
    # the intermediate conv must cover the footprint of the last one to stay exact
    foot = idx2.input_footprint(tuple(mid.shape[2:]), 3, 2, 1)
    idx1 = SparseIndex.build(foot)
    buf0 = to_padded_nhwc(x)
    buf1 = new_padded_buffer(2, 6, *mid.shape[2:])
    buf2 = new_padded_buffer(2, 8, *ref.shape[2:])
    sparse_conv_buffer(buf0, idx1, conv_weight_matrix(w1), None, buf1, stride=2, dense_threshold=threshold)
    sparse_conv_buffer(buf1, idx2, conv_weight_matrix(w2), None, buf2, stride=2, dense_threshold=threshold)
    _assert_active_close(padded_interior(buf2), ref, mask)


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
    mask = _masks(2, 10, 12, seed=10)
    pc = PackedConv.from_conv(conv, bn)
    idx = SparseIndex.build(mask)
    out = new_padded_buffer(2, 6, 10, 12)
    pc.apply(to_padded_nhwc(x), idx, out, relu=True)
    _assert_active_close(padded_interior(out), ref, mask)
    dense = new_padded_buffer(2, 6, 10, 12)
    dense_conv_buffer(to_padded_nhwc(x), pc.weight, pc.bias, dense, stride=2, relu=True)
    assert torch.allclose(padded_interior(dense), ref, atol=ATOL)


def test_inference_mode_and_autograd():
    """Works under inference mode; with autograd active the op stays differentiable."""
    torch.manual_seed(10)
    x = torch.randn(1, 6, 48, 64)
    w, b = torch.randn(6, 6, 3, 3), torch.randn(6)
    mask = _blob_mask(1, 48, 64, 0.5, seed=16)
    sc._TLS.scratch = {}  # make the sparse path allocate its scratch buffers inside inference mode
    with torch.inference_mode():
        xi, wi, bi = x.clone(), w.clone(), b.clone()
        buf, out = to_padded_nhwc(xi), new_padded_buffer(1, 6, 48, 64)
        sparse_conv_buffer(buf, SparseIndex.build(mask), conv_weight_matrix(wi), bi, out, dense_threshold=1.0)
        _assert_active_close(padded_interior(out), F.conv2d(xi, wi, bi, padding=1), mask)
    with torch.no_grad():  # the scratch buffers created under inference mode stay usable outside it
        y = sparse_conv2d(x, w, b, mask, 1, 1, dense_threshold=1.0)
        _assert_active_close(y, F.conv2d(x, w, b, padding=1), mask)
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
        mask = _masks(2, *ref.shape[2:], seed=11)
        y = sparse(x, mask)
        _assert_active_close(y, ref, mask)
        prev = torch.randn_like(ref)
        out = prev.clone()
        sparse(x, mask, out=out)
        assert torch.equal(out[~mask[:, None].expand_as(out)], prev[~mask[:, None].expand_as(out)])
        with pytest.raises(ValueError, match='dilation'):
            SparseConv2d(4, 6, 3, dilation=2)(x, torch.ones(2, 13, 19, dtype=torch.bool))


# ---------------------------------------------------------------------------------------------------
# Triton kernel: interpreter on CPU (TRITON_INTERPRET=1) or CUDA
# ---------------------------------------------------------------------------------------------------
_HAS_TRITON = importlib.util.find_spec('triton') is not None


def _triton_checks(dev: str) -> None:
    """Parity of the Triton kernel with F.conv2d (plain asserts; runs in-process or in a subprocess)."""
    torch.manual_seed(7)
    cin, cout = 20, 18  # not multiples of the block sizes
    for k, stride in [(3, 1), (3, 2), (1, 1)]:
        x = torch.randn(2, cin, 11, 13, device=dev)
        w, b = torch.randn(cout, cin, k, k, device=dev), torch.randn(cout, device=dev)
        ref = F.conv2d(x, w, b, stride, k // 2)
        mask = _masks(2, *ref.shape[2:], seed=12).to(dev)
        y = sparse_conv2d(x, w, b, mask, stride, k // 2, backend='triton')
        _assert_active_close(y, ref, mask)
        assert torch.all(y[~mask[:, None].expand_as(y)] == 0)
    # fused epilogue (bias, residual from a buffer or compact rows, ReLU) and fused scatter
    c = 16
    x = torch.randn(2, c, 9, 12, device=dev)
    w, b = torch.randn(c, c, 3, 3, device=dev) * 0.2, torch.randn(c, device=dev)
    mask = _masks(2, 9, 12, seed=13).to(dev)
    idx = SparseIndex.build(mask)
    buf = to_padded_nhwc(x)
    prev = torch.randn(2, c, 9, 12, device=dev)
    ref = _where(mask, F.relu(F.conv2d(x, w, b, padding=1) + x), prev)
    for res in (buf, gather_rows(buf, idx)):
        out = to_padded_nhwc(prev)
        sparse_conv_buffer(buf, idx, conv_weight_matrix(w), b, out, residual=res, relu=True, backend='triton')
        assert torch.allclose(padded_interior(out), ref, atol=ATOL)
    rows = sparse_conv_rows(buf, idx, conv_weight_matrix(w), b, residual=buf, relu=True, backend='triton')
    assert torch.allclose(rows, ref.permute(0, 2, 3, 1)[mask], atol=ATOL)


@pytest.mark.skipif(not _HAS_TRITON, reason='triton not installed (optional dependency)')
def test_triton_interpreter_cpu():
    """Runs the kernel on CPU under TRITON_INTERPRET=1, in a subprocess.

    The variable must be set before triton is imported (triton's own library functions are jitted at
    its import), so this cannot be switched on inside the running test process.
    """
    env = dict(os.environ, TRITON_INTERPRET='1', PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    r = subprocess.run([sys.executable, __file__, '--triton-checks', 'cpu'],
                       env=env,
                       capture_output=True,
                       text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert 'TRITON CHECKS OK' in r.stdout


@pytest.mark.skipif(not (_HAS_TRITON and torch.cuda.is_available()), reason='needs triton and CUDA')
def test_triton_cuda():
    pytest.importorskip('triton', reason='triton not installed (optional dependency)')
    _triton_checks('cuda')
    # 'auto' picks the Triton kernel for CUDA tensors
    x = torch.randn(1, 8, 10, 10, device='cuda')
    w = torch.randn(8, 8, 3, 3, device='cuda')
    mask = torch.rand(1, 10, 10, device='cuda') < 0.3
    _assert_active_close(sparse_conv2d(x, w, None, mask, 1, 1), F.conv2d(x, w, None, 1, 1), mask)


if __name__ == '__main__':  # subprocess entry of test_triton_interpreter_cpu
    if len(sys.argv) == 3 and sys.argv[1] == '--triton-checks':
        _triton_checks(sys.argv[2])
        print('TRITON CHECKS OK')


# ---------------------------------------------------------------------------------------------------
# the 'segments' method: packed row segments + one dense conv per chunk
# ---------------------------------------------------------------------------------------------------
def test_segment_tables_known_row():
    """One image row with positions 0, 1, 3, 7 (3x3, stride 1, d = 2): the gap of 1 at x=2 is filled, the gap
    of 3 after x=3 breaks the run (2 trailing slots), the last run gets 2 trailing slots."""
    mask = torch.zeros(1, 1, 10, dtype=torch.bool)
    mask[0, 0, [0, 1, 3, 7]] = True
    idx = SparseIndex.build(mask)
    t = idx.segments()
    assert t.real.tolist() == [0, 1, 3, 6]
    assert t.slots == 9 and t.group == 32 and t.groups == 1 and t.in_width == 34
    wp = 12  # padded width; window top-left of output x is padded column x of padded row 0
    g = t.gather.view(1, 3, 34)
    assert g[0, 0, :11].tolist() == [0, 1, 2, 3, 4, 5, 7, 8, 9, 0, 0]
    assert torch.equal(g[0, 1], g[0, 0] + wp) and torch.equal(g[0, 2], g[0, 0] + 2 * wp)
    assert len(t.chunks) == 1 and t.chunks[0][:4] == (0, 1, 0, 4)
    # stride 2 (d = 1): gap 1 filled, gap 3 -> 1 trailing slot; windows start at even columns
    t2 = idx.segments((1, 20), stride=2)
    assert t2.real.tolist() == [0, 1, 3, 5]
    assert t2.slots == 7 and t2.in_width == 2 * 32 + 1
    wp2 = 22
    g2 = t2.gather.view(1, 3, -1)
    assert g2[0, 0, :15].tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 14, 15, 16, 17, 0]
    assert torch.equal(g2[0, 2, :14], g2[0, 0, :14] + 2 * wp2)


def test_segment_bucketing_limits_conv_shapes():
    """The conv of a layer sees few distinct shapes whatever the mask: fixed group width, chunks of 16 groups
    and the last chunk's group count rounded to a few values per octave (oneDNN compiles one primitive per
    shape), with at most 25 % padding groups in that chunk."""
    assert [sc._bucket(n) for n in (1, 7, 8, 9, 10, 11, 15, 16, 17)] == [1, 7, 8, 10, 10, 12, 16, 16, 20]
    shapes = set()
    for seed in range(30):
        idx = SparseIndex.build(_blob_mask(1, 128, 256, 0.05 + 0.03 * seed, seed))
        t = idx.segments()
        assert t.group == sc._SEGMENT_GROUP
        used = -(-t.slots // t.group)
        last = t.chunks[-1][1]
        assert used <= t.groups and (t.groups - used) <= max(1, last // 4)
        shapes.update(ng for _, ng, _, _, _ in t.chunks)
        assert sum(ng for _, ng, _, _, _ in t.chunks) == t.groups
        assert t.chunks[-1][3] == idx.num_active  # every active position lands in a chunk
    assert len(shapes) <= 13


@pytest.mark.parametrize('stride', [1, 2])
@pytest.mark.parametrize('size', [(25, 33), (61, 250)])
def test_segments_parity(stride, size):
    """Both CPU methods equal F.conv2d at the active positions: masks with gaps of 1, 2 and 3 pixels, runs
    touching both image edges, two images with different masks, in-place residual buffer + ReLU, compact
    residual rows, several chunks (the 61x250 case has > 16 groups of 256 slots at stride 1)."""
    torch.manual_seed(stride)
    n, cin, cout = 2, 6, 5
    x = torch.randn(n, cin, *size)
    w = torch.randn(cout, cin, 3, 3)
    b = torch.randn(cout)
    ref = F.conv2d(x, w, b, stride, 1)
    h, wo = ref.shape[-2:]
    mask = _masks(n, h, wo, seed=stride)
    mask[0, 0] = False
    mask[0, 0, [0, 1, 3, 6, 10, wo - 1]] = True  # gaps 1, 2, 3 and the right edge
    mask[1, -1] = True  # a full last row
    idx = SparseIndex.build(mask)
    buf = to_padded_nhwc(x)
    conv = PackedConv.from_weight(w, b, stride=stride)
    refl = ref.permute(0, 2, 3, 1)
    results = {}
    for method in ('gemm', 'segments'):
        rows = conv.rows(buf, idx, dense_threshold=float('inf'), method=method)
        assert (rows - refl[mask]).abs().max() <= ATOL
        res_rows = torch.randn(idx.num_active, cout, generator=torch.Generator().manual_seed(0))
        rows2 = conv.rows(buf, idx, residual=res_rows, relu=True, dense_threshold=float('inf'), method=method)
        assert (rows2 - (refl[mask] + res_rows).relu()).abs().max() <= ATOL
        out = new_padded_buffer(n, cout, h, wo)
        padded_interior(out).copy_(torch.randn(n, cout, h, wo, generator=torch.Generator().manual_seed(1)))
        before = padded_interior(out).permute(0, 2, 3, 1).clone()
        conv.apply(buf, idx, out, residual=out, relu=True, dense_threshold=float('inf'), method=method)
        got = padded_interior(out).permute(0, 2, 3, 1)
        assert (got[mask] - (refl[mask] + before[mask]).relu()).abs().max() <= ATOL
        assert torch.equal(got[~mask], before[~mask])  # stopped positions untouched
        assert out[:, 0].abs().max() == 0 and out[:, :, 0].abs().max() == 0  # zero border kept
        results[method] = got.clone()
    if stride == 1 and size == (61, 250):
        assert len(idx.segments().chunks) > 1
    assert (results['gemm'] - results['segments']).abs().max() <= ATOL


def test_choose_method():
    idx = SparseIndex.build(_blob_mask(1, 64, 64, 0.5, 0))
    buf = to_padded_nhwc(torch.randn(1, 4, 64, 64))
    call3 = sc._ConvCall(buf, idx, torch.randn(36, 4), None, 1, None, 1)
    call1 = sc._ConvCall(buf, idx, torch.randn(4, 4), None, 1, None, 1)
    assert sc.choose_method('auto', idx, call3) == 'gemm'  # measured faster inside the network (see module)
    assert sc.choose_method('segments', idx, call3) == 'segments'
    with pytest.raises(ValueError, match='3x3'):
        sc.choose_method('segments', idx, call1)
    with pytest.raises(ValueError, match='method'):
        sc.choose_method('im2col', idx, call3)
    with pytest.raises(ValueError, match='3x3'):
        idx.segments(kernel_size=1)
    empty = SparseIndex.build(torch.zeros(1, 8, 8, dtype=torch.bool))
    assert empty.segments().chunks == []


# ---------------------------------------------------------------------------------------------------
# compiled CPU kernel (csrc/sparse_conv_cpu.cpp) against the PyTorch path, its reference
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('k,stride', [(3, 1), (3, 2), (1, 1)])
@pytest.mark.parametrize('residual', [None, 'rows', 'buffer', 'out'])
@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
def test_cpu_kernel_matches_torch_path(k, stride, residual, dtype):
    """Buffer API, batch of 2 with different masks, odd sizes, chunks that do not divide M: the kernel writes the
    PyTorch path's values at active positions (equal to F.conv2d there) and leaves every other position as it was,
    including when the residual is the output buffer itself."""
    require_cpu_ext()
    torch.manual_seed(11)
    h_in, w_in, cin, cout = 23, 37, 7, 12
    ho, wo = (h_in, w_in) if stride == 1 else ((h_in + 1) // 2, (w_in + 1) // 2)
    x = torch.randn(2, cin, h_in, w_in, dtype=dtype)
    w, b = torch.randn(cout, cin, k, k, dtype=dtype), torch.randn(cout, dtype=dtype)
    mask = _masks(2, ho, wo, seed=5)
    idx = SparseIndex.build(mask)
    buf = to_padded_nhwc(x)
    prev = torch.randn(2, cout, ho, wo, dtype=dtype)  # what the output buffer held before (copy fill)
    res_nchw = torch.randn(2, cout, ho, wo, dtype=dtype)
    results = {}
    for backend in ('torch', 'cpp'):
        out_buf = to_padded_nhwc(prev)
        res = None
        if residual == 'rows':
            res = gather_rows(to_padded_nhwc(res_nchw), idx)
        elif residual == 'buffer':
            res = to_padded_nhwc(res_nchw)
        elif residual == 'out':
            res = out_buf
        sparse_conv_buffer(
            buf,
            idx,
            conv_weight_matrix(w),
            b if residual != 'rows' else None,
            out_buf,
            stride=stride,
            padding=k // 2,
            residual=res,
            relu=residual is not None,
            chunk_rows=13,
            dense_threshold=float('inf'),
            backend=backend)
        results[backend] = padded_interior(out_buf)
    ref = F.conv2d(x, w, b if residual != 'rows' else None, stride=stride, padding=k // 2)
    if residual is not None:
        ref = F.relu(ref + (prev if residual == 'out' else res_nchw))
    keep = mask[:, None].expand_as(ref)
    atol = ATOL if dtype == torch.float32 else 1e-10
    assert torch.allclose(results['cpp'], results['torch'], atol=atol, rtol=0)
    assert torch.allclose(results['cpp'][keep], ref[keep], atol=atol, rtol=0)
    assert torch.equal(results['cpp'][~keep], prev[~keep])


def _has_avx512() -> bool:
    try:
        with open('/proc/cpuinfo') as f:
            return any(ln.startswith('flags') and ' avx512f' in ln for ln in f)
    except OSError:
        return False


@pytest.mark.parametrize('cout', [1, 4, 5, 16, 18, 20, 21, 36, 48, 72, 100, 150])
@pytest.mark.parametrize('k,stride', [(3, 1), (3, 2), (1, 1)])
@pytest.mark.parametrize('residual', [None, 'out'])
def test_cpu_direct_kernel_matches_gemm(cout, k, stride, residual, monkeypatch):
    """The kernel's AVX-512 direct algorithm (float32) against its gather + GEMM algorithm and F.conv2d, for output
    widths with no tail (16, 48), only dot-product channels (1, 4), full vectors plus 2-4 of them (18, 20, 36, 100),
    a padded last vector (5, 21, 72: 5-8 channels past 16 * n) and several blocks of vectors (72, 100, 150); batch 2
    with different masks, M not a multiple of the 8-position tile, the bottom-right position active (its last window
    strip ends at the buffer's last value: the masked loads must not read past it), residual = the output buffer
    itself."""
    ext = require_cpu_ext()
    if not ext.has_direct():
        assert not _has_avx512(), 'an AVX-512 machine must build the direct kernel'
        pytest.skip('no AVX-512 on this CPU: the kernel has only its GEMM algorithm')
    torch.manual_seed(21)
    h_in, w_in, cin = 13, 19, 6 if k == 3 else 33
    ho, wo = (h_in, w_in) if stride == 1 else ((h_in + 1) // 2, (w_in + 1) // 2)
    x = torch.randn(2, cin, h_in, w_in)
    w, b = torch.randn(cout, cin, k, k), torch.randn(cout)
    mask = _masks(2, ho, wo, seed=cout)
    mask[:, -1, -1] = True
    if int(mask.sum()) % 8 == 0:
        mask[0, 0, 0] = not bool(mask[0, 0, 0])
    idx = SparseIndex.build(mask)
    assert idx.num_active % 8 != 0 and bool(mask[:, -1, -1].all())
    buf = to_padded_nhwc(x)
    prev = torch.randn(2, cout, ho, wo)
    results = {}
    monkeypatch.setattr(sc, '_CPU_DIRECT', sc._CPU_DIRECT)  # restored at teardown, whatever set_cpu_algorithm did
    for direct in (0, 1):
        set_cpu_algorithm(('gemm', 'direct')[direct])
        out_buf = to_padded_nhwc(prev)
        sparse_conv_buffer(
            buf,
            idx,
            conv_weight_matrix(w),
            b,
            out_buf,
            stride=stride,
            padding=k // 2,
            residual=out_buf if residual else None,
            relu=residual is not None,
            dense_threshold=float('inf'),
            backend='cpp')
        results[direct] = padded_interior(out_buf)
    ref = F.conv2d(x, w, b, stride=stride, padding=k // 2)
    if residual:
        ref = F.relu(ref + prev)
    keep = mask[:, None].expand_as(ref)
    assert torch.allclose(results[1], results[0], atol=ATOL, rtol=0)
    assert torch.allclose(results[1][keep], ref[keep], atol=ATOL, rtol=0)
    assert torch.equal(results[1][~keep], prev[~keep])


def test_cpu_direct_kernel_choice_and_errors():
    """The kernel's own choice (-1) takes the direct algorithm for float32 up to 100 output channels (as
    cpu_kernel_direct reports), and refuses a forced direct run it cannot do (float64) and an unknown choice."""
    from mmseg_cbt.ops import cpu_kernel_direct
    ext = require_cpu_ext()
    assert cpu_kernel_direct(100) == ext.has_direct() and not cpu_kernel_direct(101)
    assert not cpu_kernel_direct(18, torch.float64)
    src = torch.randn(50, 4)
    strips = torch.tensor([0, 10, 20, 3, 13, 23])
    for cout, direct_expected in ((18, True), (100, True), (101, False)):
        wm = torch.randn(36, cout)
        outs = {}
        for d in (-1, 0, 1) if ext.has_direct() else (-1, 0):
            outs[d] = torch.empty(2, cout)
            ext.sparse_conv_gemm(src, strips, 3, wm, None, None, None, False, outs[d], None, 8, d)
        ref = torch.stack(
            [torch.cat([src[r:r + 3].reshape(-1) for r in strips[i * 3:i * 3 + 3].tolist()]) @ wm for i in range(2)])
        for out in outs.values():
            assert torch.allclose(out, ref, atol=1e-4, rtol=0)
        if ext.has_direct():
            # the two algorithms round differently; auto's result is bit-identical to the one it chose
            assert torch.equal(outs[-1], outs[1 if direct_expected else 0])
    with pytest.raises(RuntimeError, match='direct must be'):
        ext.sparse_conv_gemm(src, strips, 3, torch.randn(36, 5), None, None, None, False, torch.empty(2, 5), None, 8, 2)
    with pytest.raises(RuntimeError, match='direct kernel runs float32'):
        ext.sparse_conv_gemm(src.double(), strips, 3, torch.randn(36, 5, dtype=torch.float64), None, None, None, False,
                             torch.empty(2, 5, dtype=torch.float64), None, 8, 1)


@pytest.mark.parametrize('chunk', [None, 1, 1000])
def test_cpu_kernel_rows_api_and_default_backend(chunk, monkeypatch):
    """Compact rows out (sparse_conv_rows) with compact residual rows; 'auto' on a CPU tensor runs the kernel
    (the PyTorch path is not called) and gives the same rows as backend='torch'."""
    require_cpu_ext()
    torch.manual_seed(12)
    x = torch.randn(2, 9, 31, 29)
    mask = _masks(2, 31, 29, seed=6)
    w, b = torch.randn(10, 9, 3, 3), torch.randn(10)
    idx = SparseIndex.build(mask)
    buf = to_padded_nhwc(x)
    res = torch.randn(idx.num_active, 10)
    ref = sparse_conv_rows(
        buf,
        idx,
        conv_weight_matrix(w),
        b,
        residual=res,
        relu=True,
        chunk_rows=chunk,
        dense_threshold=float('inf'),
        backend='torch')
    monkeypatch.setattr(sc, '_torch_sparse', lambda *a, **kw: pytest.fail('PyTorch path used under auto'))
    y = sparse_conv_rows(
        buf, idx, conv_weight_matrix(w), b, residual=res, relu=True, chunk_rows=chunk, dense_threshold=float('inf'))
    assert torch.allclose(y, ref, atol=ATOL, rtol=0)
    dense = F.relu(F.conv2d(x, w, b, padding=1).permute(0, 2, 3, 1)[mask] + res)
    assert torch.allclose(y, dense, atol=ATOL, rtol=0)


def test_cpu_kernel_switch_and_errors(monkeypatch):
    """MMSEG_CBT_CPU_EXT=0 sends 'auto' to the PyTorch path and makes backend='cpp' an error; the kernel refuses
    dtypes and index tables it cannot handle with a message instead of reading out of bounds."""
    ext = require_cpu_ext()
    from mmseg_cbt.ops import cpu_ext_available
    x = torch.randn(1, 4, 9, 11)
    w = torch.randn(5, 4, 3, 3)
    mask = torch.rand(1, 9, 11) < 0.5
    with pytest.raises(ValueError, match="backend='cpp' runs float32/float64"):
        sparse_conv2d(x.half(), w.half(), None, mask, padding=1, backend='cpp', dense_threshold=2.0)
    monkeypatch.setenv('MMSEG_CBT_CPU_EXT', '0')
    assert not cpu_ext_available()
    calls = []
    real = sc._torch_sparse
    monkeypatch.setattr(sc, '_torch_sparse', lambda *a, **kw: (calls.append(1), real(*a, **kw)))
    y = sparse_conv2d(x, w, None, mask, padding=1, dense_threshold=2.0)
    assert calls, 'auto must fall back to the PyTorch path when the kernel is disabled'
    _assert_active_close(y, F.conv2d(x, w, padding=1), mask)
    with pytest.raises(RuntimeError, match='CPU kernel is not available'):
        sparse_conv2d(x, w, None, mask, padding=1, backend='cpp', dense_threshold=2.0)
    monkeypatch.delenv('MMSEG_CBT_CPU_EXT')
    src = torch.randn(50, 4)
    wm = torch.randn(36, 5)
    with pytest.raises(RuntimeError, match='int64'):
        ext.sparse_conv_gemm(src, torch.zeros(3, dtype=torch.int32), 3, wm, None, None, None, False, torch.empty(1, 5),
                             None, 8)
    with pytest.raises(RuntimeError, match='wmat must be'):
        ext.sparse_conv_gemm(src, torch.zeros(3, dtype=torch.int64), 3, torch.randn(35, 5), None, None, None, False,
                             torch.empty(1, 5), None, 8)
    with pytest.raises(RuntimeError, match='compact dst'):
        ext.sparse_conv_gemm(src, torch.zeros(3, dtype=torch.int64), 3, wm, None, None, None, False, torch.empty(2, 5),
                             None, 8)
    # index tables are range-checked: a strip must end inside src (50 rows, 3-row strips: start <= 47), an
    # output / residual row must exist
    for bad in (torch.tensor([0, 1, 48]), torch.tensor([-1, 0, 1])):
        with pytest.raises(RuntimeError, match='strips holds rows outside'):
            ext.sparse_conv_gemm(src, bad, 3, wm, None, None, None, False, torch.empty(1, 5), None, 8)
    ok = torch.tensor([0, 1, 47])
    ext.sparse_conv_gemm(src, ok, 3, wm, None, None, None, False, torch.empty(1, 5), None, 8)
    with pytest.raises(RuntimeError, match='dst_rows holds rows outside'):
        ext.sparse_conv_gemm(src, ok, 3, wm, None, None, None, False, torch.empty(4, 5), torch.tensor([4]), 8)
    with pytest.raises(RuntimeError, match='res_rows holds rows outside'):
        ext.sparse_conv_gemm(src, ok, 3, wm, None, torch.zeros(2, 5), torch.tensor([2]), False, torch.empty(1, 5), None,
                             8)
    with pytest.raises(RuntimeError, match='rows holds rows outside'):
        ext.add_weighted_rows(torch.zeros(1, 4), src, torch.tensor([[0, 50]]), torch.ones(1, 2))


@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
def test_add_weighted_rows_kernel_and_torch_path(dtype):
    """acc[i] += sum_t w[i, t] * src[rows[i, t]]: both backends equal the explicit sum (M not a multiple of the
    kernel's 256-row grain, repeated source rows); shape errors are named."""
    from mmseg_cbt.ops import add_weighted_rows_
    require_cpu_ext()
    g = torch.Generator().manual_seed(13)
    src = torch.randn(97, 11, generator=g, dtype=dtype)
    rows = torch.randint(0, 97, (613, 4), generator=g)
    weights = torch.rand(613, 4, generator=g)  # float32 taps, as the fuse's bilinear tables
    acc0 = torch.randn(613, 11, generator=g, dtype=dtype)
    ref = acc0 + (src[rows] * weights.to(dtype)[..., None]).sum(1)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    for backend in ('torch', 'cpp', 'auto'):
        acc = acc0.clone()
        assert add_weighted_rows_(acc, src, rows, weights, backend=backend) is acc
        assert torch.allclose(acc, ref, atol=tol, rtol=0), backend
    with pytest.raises(ValueError, match='rows and weights'):
        add_weighted_rows_(acc0.clone(), src, rows, weights[:, :3])
    with pytest.raises(ValueError, match='src must be'):
        add_weighted_rows_(acc0.clone(), src[:, :5], rows, weights)


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


def test_crossover_tables_and_balanced_chunks():
    """The measured crossover points are returned exactly at their MAC counts (PyTorch path and compiled kernel),
    and the kernel's chunks split the rows evenly over the threads (3 chunks on 2 threads cost as much as 4)."""
    from mmseg_cbt.ops import dense_crossover
    assert dense_crossover(3, 48, 48) == pytest.approx(0.66)  # 20736 MAC/px, PyTorch path
    assert dense_crossover(3, 48, 48, compiled=True) == pytest.approx(0.76)
    assert dense_crossover(1, 18, 18, compiled=True) == pytest.approx(0.72)  # 324 MAC/px
    assert dense_crossover(3, 384, 384, compiled=True) == pytest.approx(0.9)  # clamped beyond the last point
    # the direct algorithm's table (only with compiled=True)
    assert dense_crossover(1, 36, 36, compiled=True, direct=True) == pytest.approx(0.8)  # 1296 MAC/px
    assert dense_crossover(1, 18, 18, compiled=True, direct=True) == pytest.approx(0.8)
    assert dense_crossover(1, 48, 48, compiled=True, direct=True) == pytest.approx(0.9)
    assert dense_crossover(3, 18, 18, compiled=True, direct=True) == pytest.approx(0.9)
    assert dense_crossover(3, 18, 18, compiled=False, direct=True) == dense_crossover(3, 18, 18)
    for m, threads, kkc in [(307, 2, 1296), (8192, 2, 432), (129, 2, 3456), (5, 2, 432), (1000, 1, 162)]:
        step = sc._ext_chunk_rows(kkc, 4, m, threads)
        chunks = -(-m // step)
        assert chunks % threads == 0 or chunks == 1 or m < threads * 2
        assert step * (chunks - 1) < m <= step * chunks
        # no thread gets more than one chunk more rows than another: the shares differ by < 1 chunk
        per = -(-chunks // threads)
        assert m - (chunks - per) * step <= per * step
    assert sc._ext_chunk_rows(1296, 4, 307, 2) == 77


def test_cpu_kernel_non_contiguous_weight_uses_torch_gemm():
    """A non-contiguous weight matrix takes the kernel's at::mm_out branch instead of the direct BLAS call: same
    rows."""
    require_cpu_ext()
    torch.manual_seed(14)
    x = torch.randn(1, 6, 17, 21, dtype=torch.float64)
    w = torch.randn(8, 6, 3, 3, dtype=torch.float64)
    mask = _masks(1, 17, 21, seed=9)
    idx = SparseIndex.build(mask)
    buf = to_padded_nhwc(x)
    wmat = conv_weight_matrix(w)
    wmat_nc = wmat.t().contiguous().t()
    assert not wmat_nc.is_contiguous() and torch.equal(wmat_nc, wmat)
    ys = [
        sparse_conv_rows(buf, idx, wm, None, dense_threshold=float('inf'), backend='cpp', chunk_rows=10)
        for wm in (wmat, wmat_nc)
    ]
    ref = F.conv2d(x, w, padding=1).permute(0, 2, 3, 1)[mask]
    for y in ys:
        assert torch.allclose(y, ref, atol=1e-10, rtol=0)


def _benchmark_module():
    path = os.path.join(ROOT, 'tools', 'analysis_tools', 'benchmark_masked.py')
    spec = importlib.util.spec_from_file_location('benchmark_masked_under_test', path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_benchmark_plot_from_json(tmp_path):
    """--plot-from draws sections a and b of saved runs into a PNG without timing anything; a later file replaces
    the earlier file's rows of the same section and model; a file without a/b rows is refused."""
    bm = _benchmark_module()
    a = [
        dict(section='a', model='W18s', channels=18, height=8, width=16, active_frac=f, ratio=r)
        for f, r in ((1.0, 1.0), (0.5, 0.9), (0.25, 0.5))
    ]
    b = [
        dict(section='b', model='W48', stopped=s, wall_ratio=w, mac_ratio=m)
        for s, w, m in ((0, 1.0, 1.0), (75, 0.36, 0.3))
    ]
    first, second = tmp_path / 'run1.json', tmp_path / 'run2.json'
    import json
    first.write_text(json.dumps(dict(meta={}, results=a + b)))
    second.write_text(json.dumps(dict(meta={}, results=[dict(r, ratio=r['ratio'] / 2) for r in a])))
    out = tmp_path / 'plots' / 'bench.png'
    rows = bm.main(['--plot-from', str(first), str(second), '--plot', str(out)])
    assert out.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    assert sorted(r['ratio'] for r in rows if r['section'] == 'a') == [0.25, 0.45, 0.5]  # run 2 replaced run 1's a
    assert len([r for r in rows if r['section'] == 'b']) == 2
    with pytest.raises(ValueError, match='section a or b'):
        bm.plot_results([dict(section='paths')], str(tmp_path / 'x.png'))
    with pytest.raises(SystemExit, match='--plot-from needs --plot'):
        bm.main(['--plot-from', str(first)])


def test_cpu_kernel_stale_build_lock_is_removed(tmp_path, monkeypatch):
    """A lock file left by a killed build (older than 10 min) is removed with a warning, a fresh one (a build in
    progress in another process) is left alone."""
    import mmseg_cbt.ops.sparse_conv_cpu as cpu
    monkeypatch.setenv('TORCH_EXTENSIONS_DIR', str(tmp_path))
    from torch.utils.cpp_extension import _get_build_directory
    lock = os.path.join(_get_build_directory('some_ext', verbose=False), 'lock')
    open(lock, 'w').close()
    cpu._remove_stale_lock('some_ext')
    assert os.path.exists(lock)
    old = os.path.getmtime(lock) - 3600
    os.utime(lock, (old, old))
    with pytest.warns(RuntimeWarning, match='stale build lock'):
        cpu._remove_stale_lock('some_ext')
    assert not os.path.exists(lock)


@pytest.mark.parametrize('threads', [1, 3])
def test_cpu_kernel_thread_counts(threads):
    """One torch thread (the parallel loop runs inline, chunks sized for one core) and more threads than chunks
    need: the kernel's rows equal the PyTorch path's."""
    require_cpu_ext()
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.manual_seed(15)
        x = torch.randn(2, 12, 21, 27)
        w, b = torch.randn(16, 12, 3, 3), torch.randn(16)
        mask = _masks(2, 21, 27, seed=10)
        idx = SparseIndex.build(mask)
        buf = to_padded_nhwc(x)
        ys = [
            sparse_conv_rows(buf, idx, conv_weight_matrix(w), b, relu=True, dense_threshold=float('inf'), backend=be)
            for be in ('torch', 'cpp')
        ]
    finally:
        torch.set_num_threads(old)
    assert torch.allclose(ys[0], ys[1], atol=ATOL, rtol=0)
    assert torch.allclose(ys[1], F.relu(F.conv2d(x, w, b, padding=1)).permute(0, 2, 3, 1)[mask], atol=ATOL, rtol=0)
