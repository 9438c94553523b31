"""What sparse_conv2d keeps between calls (mmseg_cbt.ops.sparse_conv.cache) and the buffer it builds: an entry is
reused only for the same, unchanged tensor; input pixels no active window reads are not copied (and the map of
those it reads is exact); the blocked NCHW copy of the CPU kernel equals the strided copy."""
import gc
import threading

import pytest
import torch
import torch.nn.functional as F
from utils import assert_active_close

from mmseg_cbt.ops import SparseIndex, cpu_ext_available, sparse_conv2d
from mmseg_cbt.ops.ext_loader import load_cpu_ext
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
    y = sparse_conv2d(x, w, None, mask, stride=stride, padding=1, dense_threshold=1.0)
    assert_active_close(y, F.conv2d(x, w, None, stride, 1), mask)


@pytest.mark.skipif(not cpu_ext_available(), reason='the CPU kernel is not built')
@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
def test_blocked_nchw_copy_equals_strided_copy(dtype):
    ext = load_cpu_ext()
    x = torch.randn(2, 19, 7, 131, dtype=dtype)
    for src in (x, x.contiguous(memory_format=torch.channels_last), x[:, :, :, ::2]):
        h, w = src.shape[2:]
        ref = torch.full((2, h + 2, w + 2, 19), 7.0, dtype=dtype)
        got = ref.clone()
        ref[:, 1 + 2:1 + 6, 1:1 + w].copy_(src[:, :, 2:6].permute(0, 2, 3, 1))
        ext.nchw_rows_to_padded(src, got, 1, 2, 6)
        assert torch.equal(got, ref)
        need = torch.rand(2, h, w) < 0.3
        need[:, :3, 64:] = False  # whole blocks nothing reads
        got = torch.full_like(ref, 7.0)
        ext.nchw_rows_to_padded(src, got, 1, 0, h, need)
        inner = got[:, 1:1 + h, 1:1 + w]
        assert torch.equal(inner[need], src.permute(0, 2, 3, 1)[need])
        # pixels copied block-wise (32 along a row): a block no needed pixel is in stays untouched, the others
        # hold the source
        src_nhwc = src.permute(0, 2, 3, 1)
        touched = torch.zeros_like(need)
        for x0 in range(0, w, 32):
            touched[:, :, x0:x0 + 32] = need[:, :, x0:x0 + 32].any(-1, keepdim=True)
        assert torch.equal(inner[touched], src_nhwc[touched])
        assert bool((inner[~touched] == 7).all()) and bool((got[:, 0] == 7).all())
        assert bool((~touched).any()) and bool((touched & ~need).any())
        ext.nchw_rows_to_padded(src, got, 1, 0, h, need, zero_border=True)
        border = torch.ones_like(got, dtype=torch.bool)
        border[:, 1:1 + h, 1:1 + w] = False
        assert bool((got[border] == 0).all()) and torch.equal(got[:, 1:1 + h, 1:1 + w], inner)
    with pytest.raises(RuntimeError, match='r0 <= r1 <= H'):
        ext.nchw_rows_to_padded(x, torch.zeros(2, 9, 133, 19, dtype=dtype), 1, 3, 8)


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
    sparse_conv2d(big, w, None, first, padding=1, dense_threshold=1.0)  # fills the left half of the buffer
    buf = next(iter(fn._WORKSPACES.bufs.values()))
    for seed in range(3):
        x = torch.randn(1, 5, 24, 40)
        mask = torch.rand(1, 24, 40, generator=torch.Generator().manual_seed(seed)) < 0.2
        y = sparse_conv2d(x, w, None, mask, padding=1, dense_threshold=1.0)
        assert_active_close(y, F.conv2d(x, w, None, 1, 1), mask)
        assert next(iter(fn._WORKSPACES.bufs.values())) is buf  # the same buffer each time
