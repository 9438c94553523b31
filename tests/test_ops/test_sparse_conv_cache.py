"""What sparse_conv2d keeps between calls (mmseg_cbt.ops.sparse_conv.cache) and the buffers it fills: an entry is
reused only for the same, unchanged tensor; input pixels no active window reads are not copied (and the map of
those it reads is exact); the compiled path's banded read of the NCHW input equals the dense conv."""
import gc
import threading

import pytest
import torch
import torch.nn.functional as F
from utils import assert_active_close, require_cpu_ext

from mmseg_cbt.ops import SparseIndex, conv_weight_matrix, sparse_conv2d
from mmseg_cbt.ops.sparse_conv import cache, functional


@pytest.fixture(autouse=True)
def _empty_caches():
    cache.clear_caches()
    yield
    cache.clear_caches()


def test_entry_reused_for_the_same_unchanged_tensor_only():
    c = cache.TensorCache(max_entries=2)
    t = torch.zeros(3)
    made = []

    def make():
        made.append(1)
        return float(t.sum())

    assert c.get(t, 'k', make) == 0 and c.get(t, 'k', make) == 0 and len(made) == 1
    t.add_(1)  # in place: version bump
    assert c.get(t, 'k', make) == 3 and len(made) == 2
    assert c.get(t, 'other', make) == 3 and len(made) == 3  # another key
    u = torch.zeros(3)
    assert c.get(u, 'k', lambda: 'u') == 'u'  # a third entry evicts the oldest
    assert len(c) == 2
    del u
    gc.collect()
    assert len(c) == 1  # freed tensors take their entry along
    with torch.inference_mode():
        inf = torch.zeros(2)
    assert c.get(inf, 'k', lambda: 'a') == 'a' and c.get(inf, 'k', lambda: 'b') == 'b'  # never cached


def test_mask_and_weight_changed_in_place_are_not_served_stale():
    torch.manual_seed(0)
    x = torch.randn(1, 6, 20, 24)
    w = torch.randn(6, 6, 3, 3)
    mask = torch.rand(1, 20, 24) < 0.3
    y1 = sparse_conv2d(x, w, None, mask, padding=1, dense_threshold=1.0)
    assert_active_close(y1, F.conv2d(x, w, None, 1, 1), mask)
    mask[0, :10] = ~mask[0, :10]
    w.mul_(-2)
    y2 = sparse_conv2d(x, w, None, mask, padding=1, dense_threshold=1.0)
    assert_active_close(y2, F.conv2d(x, w, None, 1, 1), mask)
    assert torch.all(y2[~mask[:, None].expand_as(y2)] == 0)


@pytest.mark.parametrize('k,stride,padding', [(3, 1, 1), (3, 2, 1), (3, 1, 0), (1, 1, 0), (1, 2, 0), (3, 2, 0)])
def test_input_reads_equal_brute_force(k, stride, padding):
    torch.manual_seed(k + stride + padding)
    h_in, w_in = 23, 18
    ho, wo = (h_in + 2 * padding - k) // stride + 1, (w_in + 2 * padding - k) // stride + 1
    mask = torch.rand(2, ho, wo) < 0.1
    want = torch.zeros(2, h_in, w_in, dtype=torch.bool)
    for b, y, x in mask.nonzero().tolist():
        for dy in range(k):
            for dx in range(k):
                iy, ix = y * stride - padding + dy, x * stride - padding + dx
                if 0 <= iy < h_in and 0 <= ix < w_in:
                    want[b, iy, ix] = True
    assert torch.equal(SparseIndex.build(mask).input_reads((h_in, w_in), k, stride, padding), want)


@pytest.mark.parametrize('masks', ['rows', 'random'])
@pytest.mark.parametrize('stride', [1, 2])
def test_pixels_no_window_reads_are_never_read(stride, masks, monkeypatch):
    """The buffer's pixels that no active window reads are left as torch.empty made them; filled with NaN here,
    they would poison any window that read them (rows: active positions in output rows 5-8 only; random: 10 %)."""
    torch.manual_seed(1)
    x = torch.randn(2, 4, 32 * stride, 20 * stride)
    w = torch.randn(5, 4, 3, 3)
    mask = torch.zeros(2, 32, 20, dtype=torch.bool)
    if masks == 'rows':
        mask[0, 5:7, 3:9] = True
        mask[1, 8, 15:] = True
    else:
        mask = torch.rand(2, 32, 20) < 0.1
    nan_empty = torch.empty

    def empty(*args, **kwargs):
        return nan_empty(*args, **kwargs).fill_(float('nan'))

    monkeypatch.setattr(functional.torch, 'empty', empty)
    monkeypatch.setattr(functional, '_WORKSPACES', threading.local())  # a fresh workspace, made by torch.empty
    y = sparse_conv2d(x, w, None, mask, stride=stride, padding=1, dense_threshold=1.0, backend='torch')
    assert_active_close(y, F.conv2d(x, w, None, stride, 1), mask)


def test_wide_pack_cached_per_matrix_and_rebuilt_after_in_place_change():
    """The compiled kernel's packed weights of a matrix are built once while the matrix is unchanged, rebuilt after an
    in-place change (and the op's result follows the new weight), and not built where the wide variant does not
    run (GEMM, thin widths, float64)."""
    ext = require_cpu_ext()
    if not ext.has_direct():
        pytest.skip(f'this build has no direct algorithm (isa {ext.isa()})')
    wmat = torch.randn(27, 40)
    p1 = cache.cached_wide_pack(ext, wmat, 3)
    assert p1 is cache.cached_wide_pack(ext, wmat, 3) and torch.equal(p1, ext.pack_wide(wmat))
    wmat.mul_(2)
    p2 = cache.cached_wide_pack(ext, wmat, 3)
    assert p2 is not p1 and torch.equal(p2, ext.pack_wide(wmat))
    assert cache.cached_wide_pack(ext, wmat, 0) is None
    assert cache.cached_wide_pack(ext, wmat.double(), 3) is None
    assert cache.cached_wide_pack(ext, torch.randn(27, 8), 1) is None  # thin width under the built-in rule
    # through the public op, the wide variant forced: a weight changed in place is not served its old packing
    from mmseg_cbt.ops.policy import cpu_algorithm
    torch.manual_seed(1)
    x, wt = torch.randn(1, 8, 12, 14), torch.randn(40, 8, 3, 3)
    mask = torch.rand(1, 12, 14) < 0.4
    with cpu_algorithm('direct-wide'):
        assert_active_close(
            sparse_conv2d(x, wt, None, mask, padding=1, dense_threshold=1.0), F.conv2d(x, wt, None, 1, 1), mask)
        wt.mul_(-3)
        assert_active_close(
            sparse_conv2d(x, wt, None, mask, padding=1, dense_threshold=1.0), F.conv2d(x, wt, None, 1, 1), mask)


def test_snapshots_cached_under_inference_mode_other_inference_tensors_not():
    """A PackedConv's matrix (a registered snapshot) keeps its kernel packing under torch.inference_mode, where other
    tensors have no version counter and are never cached; the snapshot's entry leaves with it."""
    from mmseg_cbt.ops import PackedConv
    ext = require_cpu_ext()
    if not ext.has_direct():
        pytest.skip(f'this build has no direct algorithm (isa {ext.isa()})')
    with torch.inference_mode():
        conv = PackedConv.from_weight(torch.randn(40, 8, 3, 3))
        plain = torch.randn(72, 40)
        assert conv.wmat.is_inference() and plain.is_inference()
        p = cache.cached_wide_pack(ext, conv.wmat, 3)
        assert p is cache.cached_wide_pack(ext, conv.wmat, 3) and torch.equal(p, ext.pack_wide(conv.wmat))
        assert cache.cached_wide_pack(ext, plain, 3) is not cache.cached_wide_pack(ext, plain, 3)
    assert len(cache._WIDE) == 1
    wid = id(conv.wmat)
    del conv, p
    gc.collect()
    assert len(cache._WIDE) == 0 and cache._SNAPSHOTS.get(wid) is None


def _nchw_modes(ext, dtype):
    """The kernel's algorithms for ``dtype``: the GEMM, and (float32, a build with it) the direct variants."""
    return [0] + ([2, 3, 4] if dtype == torch.float32 and ext.has_direct() else [])


@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
@pytest.mark.parametrize('k,stride,padding', [(3, 1, 1), (3, 2, 1), (3, 1, 0), (1, 1, 0), (1, 2, 0)])
def test_nchw_bands_equal_dense_conv(dtype, k, stride, padding):
    """sparse_conv_nchw (the op's compiled path) equals the dense conv at every active pixel for every algorithm,
    band height (1 output row per band up to the whole image), thread count (shares cut rows in the middle) and
    input layout (NCHW, channels-last, a strided slice), written into the output's rows or compact; the stopped
    pixels of the output stay untouched. 70 columns: 32-pixel blocks that no window reads are skipped."""
    ext = require_cpu_ext()
    torch.manual_seed(k * 10 + stride + padding)
    n, c, cout, h, w = 2, 11, 19, 13 * stride, 70 * stride  # 19 = 16 + 3: the thin variant's short tail
    x = torch.randn(n, c, h, w + 1, dtype=dtype)[..., :w]
    wt, b = torch.randn(cout, c, k, k, dtype=dtype), torch.randn(cout, dtype=dtype)
    ref = F.conv2d(x, wt, b, stride, padding)
    ho, wo = ref.shape[2:]
    mask = torch.rand(n, ho, wo) < 0.15
    mask[0, :, 40:] = False  # whole blocks of input columns nothing reads
    mask[1, 2:5] = False  # output rows without an active position (bands skip them)
    idx = SparseIndex.build(mask)
    _, strips = idx.windows((h, w), k, stride, padding, padding)
    need = idx.input_reads((h, w), k, stride, padding)
    wmat = conv_weight_matrix(wt)
    want = ref.permute(0, 2, 3, 1)[mask]
    threads = torch.get_num_threads()
    try:
        for nthreads in (1, 2):
            torch.set_num_threads(nthreads)
            for src in (x, x.contiguous(), x.contiguous(memory_format=torch.channels_last)):
                for mode in _nchw_modes(ext, dtype):
                    for band_rows in (1, 2, 3, 100):
                        dst = torch.full((n * ho * wo, cout), 7.0, dtype=dtype)
                        ext.sparse_conv_nchw(src, need, strips, k, stride, padding, wmat, b, dst, idx.rows(0), ho, wo,
                                             False, band_rows, 64, mode)
                        got = dst.view(n, ho, wo, cout)
                        torch.testing.assert_close(got[mask], want)
                        assert bool((got[~mask] == 7).all())
                        rows = torch.empty(idx.num_active, cout, dtype=dtype)
                        ext.sparse_conv_nchw(src, None, strips, k, stride, padding, wmat, b, rows, idx.rows(0), ho, wo,
                                             True, band_rows, 64, mode)
                        torch.testing.assert_close(rows, want)
    finally:
        torch.set_num_threads(threads)


def test_nchw_bands_reject_tables_of_another_geometry():
    """Tables that do not belong to the output pixels (another padding, shuffled positions) are an error, not a read
    outside a band's buffer."""
    ext = require_cpu_ext()
    x, wt = torch.randn(1, 4, 9, 12), torch.randn(5, 4, 3, 3)
    mask = torch.rand(1, 9, 12) < 0.5
    idx = SparseIndex.build(mask)
    wmat, dst = conv_weight_matrix(wt), torch.zeros(9 * 12, 5)
    _, strips = idx.windows((9, 12), 3, 1, 1, 2)  # a buffer with a 2-wide border: other rows
    with pytest.raises(RuntimeError, match='strips do not match'):
        ext.sparse_conv_nchw(x, None, strips, 3, 1, 1, wmat, None, dst, idx.rows(0), 9, 12, False, 4, 64, 0)
    _, strips = idx.windows((9, 12), 3, 1, 1, 1)
    twice = idx.rows(0).clone()
    twice[1] = twice[0]  # a pixel twice: two threads could write one row
    with pytest.raises(RuntimeError, match='increasing'):
        ext.sparse_conv_nchw(x, None, strips, 3, 1, 1, wmat, None, dst, twice, 9, 12, False, 4, 64, 0)
    with pytest.raises(RuntimeError, match='one row per output pixel'):
        ext.sparse_conv_nchw(x, None, strips, 3, 1, 1, wmat, None, dst[:-1], idx.rows(0), 9, 12, False, 4, 64, 0)


def test_band_buffers_hold_no_stale_reads():
    """The compiled path's per-thread band buffers are reused between calls: after a call that filled them with NaN
    everywhere, a sparse call on finite input reads none of it (only the blocks its windows read are copied, and
    those are copied before they are read)."""
    require_cpu_ext()
    torch.manual_seed(4)
    w = torch.randn(6, 5, 3, 3)
    everything = torch.ones(2, 24, 80, dtype=torch.bool)
    everything[0, 0, 0] = False  # not a full mask: the sparse path, every block copied
    sparse_conv2d(torch.full((2, 5, 24, 80), float('nan')), w, None, everything, padding=1, dense_threshold=1.0)
    for seed in range(3):
        x = torch.randn(2, 5, 24, 80)
        mask = torch.rand(2, 24, 80, generator=torch.Generator().manual_seed(seed)) < 0.1
        y = sparse_conv2d(x, w, None, mask, padding=1, dense_threshold=1.0)
        assert not bool(y.isnan().any())
        assert_active_close(y, F.conv2d(x, w, None, 1, 1), mask)


def test_full_mask_flag_follows_in_place_changes():
    from mmseg_cbt.ops.sparse_conv.cache import cached_all
    mask = torch.ones(1, 5, 7, dtype=torch.bool)
    x, w = torch.randn(1, 3, 5, 7), torch.randn(4, 3, 3, 3)
    assert cached_all(mask)
    assert torch.allclose(sparse_conv2d(x, w, None, mask, padding=1), F.conv2d(x, w, None, 1, 1), atol=1e-5)
    mask[0, 2, 3] = False  # in place: the version counter moves, the flag is recomputed
    assert not cached_all(mask)
    y = sparse_conv2d(x, w, None, mask, padding=1)
    assert float(y[0, :, 2, 3].abs().max()) == 0.0


def test_reused_workspace_holds_no_stale_reads():
    """The per-thread input buffer is reused between calls: values a previous call copied in are never read."""
    from mmseg_cbt.ops.sparse_conv import functional as fn
    torch.manual_seed(3)
    w = torch.randn(6, 5, 3, 3)
    first = torch.zeros(1, 24, 40, dtype=torch.bool)
    first[0, :, :20] = True
    big = torch.full((1, 5, 24, 40), 1e6)
    sparse_conv2d(big, w, None, first, padding=1, dense_threshold=1.0, backend='torch')  # the buffer's left half
    buf = next(iter(fn._WORKSPACES.bufs.values()))
    for seed in range(3):
        x = torch.randn(1, 5, 24, 40)
        mask = torch.rand(1, 24, 40, generator=torch.Generator().manual_seed(seed)) < 0.2
        y = sparse_conv2d(x, w, None, mask, padding=1, dense_threshold=1.0, backend='torch')
        assert_active_close(y, F.conv2d(x, w, None, 1, 1), mask)
        assert next(iter(fn._WORKSPACES.bufs.values())) is buf  # the same buffer each time
