"""The compiled CPU kernel of the masked conv (csrc/*.cpp) against the PyTorch path, its reference, and F.conv2d:
both algorithms (gather + GEMM, direct: AVX-512 or AVX2 by the build), the algorithm switch, non-finite inputs, its
checks, its build lock."""
import os

import pytest
import torch
import torch.nn.functional as F
from utils import SPARSE_ATOL as ATOL
from utils import assert_active_close, require_cpu_ext, stage_conv, two_masks

from mmseg_cbt.ops import (SparseIndex, add_weighted_rows_, conv_weight_matrix, cpu_algorithm, cpu_ext_available,
                           cpu_kernel_direct, gather_rows, padded_interior, sparse_conv2d, sparse_conv_buffer,
                           sparse_conv_rows, to_padded_nhwc)
from mmseg_cbt.ops.sparse_conv import cpp_impl, dispatch


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
    mask = two_masks(2, ho, wo, seed=5)
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
def test_cpu_direct_kernel_matches_gemm(cout, k, stride, residual):
    """The kernel's AVX-512 direct algorithm (float32) against its gather + GEMM algorithm and F.conv2d, for output
    widths with no tail (16, 48), only dot-product channels (1, 4), full vectors plus 2-4 of them (18, 20, 36, 100),
    a padded last vector (5, 21, 72: 5-8 channels past 16 * n) and several blocks of vectors (72, 100, 150); batch 2
    with different masks, M not a multiple of the 8-position tile, the bottom-right position active (its last window
    strip ends at the buffer's last value: the masked loads must not read past it), residual = the output buffer
    itself."""
    ext = require_cpu_ext()
    if not ext.has_direct():
        assert not _has_avx512() or ext.isa() == 'none', 'an AVX-512 machine must build the direct kernel'
        pytest.skip(f'no direct algorithm in this build (isa {ext.isa()}): the kernel has only its GEMM algorithm')
    torch.manual_seed(21)
    h_in, w_in, cin = 13, 19, 6 if k == 3 else 33
    ho, wo = (h_in, w_in) if stride == 1 else ((h_in + 1) // 2, (w_in + 1) // 2)
    x = torch.randn(2, cin, h_in, w_in)
    w, b = torch.randn(cout, cin, k, k), torch.randn(cout)
    mask = two_masks(2, ho, wo, seed=cout)
    mask[:, -1, -1] = True
    if int(mask.sum()) % 8 == 0:
        mask[0, 0, 0] = not bool(mask[0, 0, 0])
    idx = SparseIndex.build(mask)
    assert idx.num_active % 8 != 0 and bool(mask[:, -1, -1].all())
    buf = to_padded_nhwc(x)
    prev = torch.randn(2, cout, ho, wo)
    results = {}
    for direct in (0, 1):
        with cpu_algorithm(('gemm', 'direct')[direct]):
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


@pytest.mark.parametrize('intel', [True, False])
def test_cpu_direct_kernel_choice_and_errors(intel, monkeypatch):
    """The policy sends float32 convs to the direct algorithm under 'auto' where the build has one: on Intel CPUs up
    to DIRECT_MAX_COUT output channels (wider to the GEMM) with the kernel's own thin / wide switch, elsewhere at
    every width, the wide variant from WIDE_MIN_VECTORS output vectors (and tells the kernel so: its result is
    bit-identical to the forced run of the chosen variant); float64 goes to the GEMM; the kernel refuses a direct run
    it cannot do (float64, also a forced variant) and an unknown choice."""
    from mmseg_cbt.ops import DIRECT_MAX_COUT, policy
    ext = require_cpu_ext()
    monkeypatch.setattr(policy, '_GEMM_WIDE', intel)
    assert DIRECT_MAX_COUT == 100
    assert cpu_kernel_direct(DIRECT_MAX_COUT) == ext.has_direct()
    assert cpu_kernel_direct(DIRECT_MAX_COUT + 1) == (ext.has_direct() and not intel)
    assert not cpu_kernel_direct(18, torch.float64)
    with cpu_algorithm('gemm'):
        assert not cpu_kernel_direct(18) and not cpu_kernel_direct(384)
    with cpu_algorithm('direct'):
        assert cpu_kernel_direct(150) == ext.has_direct()
    x = torch.randn(1, 4, 7, 9)
    mask = two_masks(1, 7, 9, seed=3)
    idx = SparseIndex.build(mask)
    buf = to_padded_nhwc(x)
    lanes = 16 if ext.isa() == 'avx512' else 8
    if ext.has_direct():
        assert policy.WIDE_MIN_VECTORS == 3
        assert policy.direct_flag(ext, 2 * lanes, torch.float32) == 1  # 2 vectors: the kernel's switch (thin)
        assert policy.direct_flag(ext, 2 * lanes + 1, torch.float32) == (1 if intel else 3)
    for cout, direct_expected in ((18, True), (100, True), (101, not intel)):
        wm = torch.randn(36, cout)
        outs = {}
        for algo in ('auto', 'gemm', 'direct', 'direct-wide') if ext.has_direct() else ('auto', 'gemm'):
            with cpu_algorithm(algo):
                outs[algo] = sparse_conv_rows(buf, idx, wm, None, dense_threshold=float('inf'), backend='cpp')
        ref = F.conv2d(x, conv_weight_matrix_inverse(wm, 4), padding=1).permute(0, 2, 3, 1)[mask]
        for out in outs.values():
            assert torch.allclose(out, ref, atol=ATOL, rtol=0)
        if ext.has_direct():
            # the algorithms round differently; auto's result is bit-identical to the one the policy chose
            wide = not intel and -(-cout // lanes) >= policy.WIDE_MIN_VECTORS
            chosen = 'gemm' if not direct_expected else 'direct-wide' if wide else 'direct'
            assert torch.equal(outs['auto'], outs[chosen])
    src = torch.randn(50, 4)
    strips = torch.tensor([0, 10, 20, 3, 13, 23])
    with pytest.raises(RuntimeError, match='direct must be 0'):
        ext.sparse_conv_gemm(src, strips, 3, torch.randn(36, 5), None, None, None, False, torch.empty(2, 5), None, 8,
                             -1)
    with pytest.raises(RuntimeError, match='direct kernel runs float32'):
        ext.sparse_conv_gemm(src.double(), strips, 3, torch.randn(36, 5, dtype=torch.float64), None, None, None, False,
                             torch.empty(2, 5, dtype=torch.float64), None, 8, 1)
    # a forced direct algorithm or variant on float64 is refused, naming the option (no silent GEMM)
    buf64 = to_padded_nhwc(x.double())
    for algo in ('direct', 'direct-thin', 'direct-wide', 'direct-vtail'):
        with cpu_algorithm(algo), pytest.raises(RuntimeError, match='MMSEG_CBT_CPU_ALGO.*direct kernel runs float32'):
            sparse_conv_rows(
                buf64, idx, torch.randn(36, 17, dtype=torch.float64), None, dense_threshold=float('inf'), backend='cpp')


def conv_weight_matrix_inverse(wmat: torch.Tensor, cin: int) -> torch.Tensor:
    """``(Cout, Cin, 3, 3)`` of a 3x3 weight matrix (written out here, independently of the op's own helper)."""
    return wmat.view(3, 3, cin, -1).permute(3, 2, 0, 1)


@pytest.mark.parametrize('chunk', [None, 1, 1000])
def test_cpu_kernel_rows_api_and_default_backend(chunk, monkeypatch):
    """Compact rows out (sparse_conv_rows) with compact residual rows; 'auto' on a CPU tensor runs the kernel
    (the PyTorch path is not called) and gives the same rows as backend='torch'."""
    require_cpu_ext()
    torch.manual_seed(12)
    x = torch.randn(2, 9, 31, 29)
    mask = two_masks(2, 31, 29, seed=6)
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
    monkeypatch.setattr(dispatch, 'torch_sparse', lambda *a, **kw: pytest.fail('PyTorch path used under auto'))
    y = sparse_conv_rows(
        buf, idx, conv_weight_matrix(w), b, residual=res, relu=True, chunk_rows=chunk, dense_threshold=float('inf'))
    assert torch.allclose(y, ref, atol=ATOL, rtol=0)
    dense = F.relu(F.conv2d(x, w, b, padding=1).permute(0, 2, 3, 1)[mask] + res)
    assert torch.allclose(y, dense, atol=ATOL, rtol=0)


def test_cpu_kernel_switch_and_errors(monkeypatch):
    """MMSEG_CBT_CPU_EXT=0 sends 'auto' to the PyTorch path and makes backend='cpp' an error; the kernel refuses
    dtypes and index tables it cannot handle with a message instead of reading out of bounds."""
    ext = require_cpu_ext()
    x = torch.randn(1, 4, 9, 11)
    w = torch.randn(5, 4, 3, 3)
    mask = torch.rand(1, 9, 11) < 0.5
    with pytest.raises(ValueError, match="backend='cpp' runs float32/float64"):
        sparse_conv2d(x.half(), w.half(), None, mask, padding=1, backend='cpp', dense_threshold=2.0)
    monkeypatch.setenv('MMSEG_CBT_CPU_EXT', '0')
    assert not cpu_ext_available()
    calls = []
    real = dispatch.torch_sparse
    monkeypatch.setattr(dispatch, 'torch_sparse', lambda *a, **kw: (calls.append(1), real(*a, **kw)))
    y = sparse_conv2d(x, w, None, mask, padding=1, dense_threshold=2.0)
    assert calls, 'auto must fall back to the PyTorch path when the kernel is disabled'
    assert_active_close(y, F.conv2d(x, w, padding=1), mask)
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


def test_kernel_chunks_are_balanced_over_threads():
    """The kernel's chunks split the rows evenly over the threads (3 chunks on 2 threads cost as much as 4)."""
    for m, threads, kkc in [(307, 2, 1296), (8192, 2, 432), (129, 2, 3456), (5, 2, 432), (1000, 1, 162)]:
        step = cpp_impl.ext_chunk_rows(kkc, 4, m, threads)
        chunks = -(-m // step)
        assert chunks % threads == 0 or chunks == 1 or m < threads * 2
        assert step * (chunks - 1) < m <= step * chunks
        # no thread gets more than one chunk more rows than another: the shares differ by < 1 chunk
        per = -(-chunks // threads)
        assert m - (chunks - per) * step <= per * step
    assert cpp_impl.ext_chunk_rows(1296, 4, 307, 2) == 77


def test_cpu_kernel_non_contiguous_weight_uses_torch_gemm():
    """A non-contiguous weight matrix takes the kernel's at::mm_out branch instead of the direct BLAS call: same
    rows."""
    require_cpu_ext()
    torch.manual_seed(14)
    x = torch.randn(1, 6, 17, 21, dtype=torch.float64)
    w = torch.randn(8, 6, 3, 3, dtype=torch.float64)
    mask = two_masks(1, 17, 21, seed=9)
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


def test_cpu_kernel_stale_build_lock_is_removed(tmp_path, monkeypatch):
    """A lock file left by a killed build (older than 10 min) is removed with a warning, a fresh one (a build in
    progress in another process) is left alone."""
    import mmseg_cbt.ops.ext_loader as cpu
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
        mask = two_masks(2, 21, 27, seed=10)
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


@pytest.mark.parametrize('algorithm', ['gemm', 'direct'])
@pytest.mark.parametrize('k,stride', [(3, 1), (3, 2), (1, 1)])
@pytest.mark.parametrize('relu', [True, False])
def test_non_finite_input_propagates_like_f_conv2d(algorithm, k, stride, relu):
    """A NaN patch and an Inf pixel in the input: the kernel (both algorithms), the PyTorch path and F.conv2d (+ ReLU)
    give NaN / Inf at exactly the same active positions and equal finite values elsewhere; stopped positions keep
    their previous values. 18 output channels: 16-lane vectors plus two dot-product channels in the direct
    algorithm, the GEMM's epilogue otherwise (where ReLU once turned NaN into 0)."""
    ext = require_cpu_ext()
    if algorithm == 'direct' and not ext.has_direct():
        pytest.skip('no direct algorithm in this build: the kernel has only its GEMM algorithm')
    torch.manual_seed(16)
    cin, cout, h_in, w_in = 8, 18, 21, 26
    x = torch.randn(2, cin, h_in, w_in)
    x[0, :, 5:9, 6:10] = float('nan')
    x[1, 3, 12, 15] = float('inf')
    w, b = torch.randn(cout, cin, k, k), torch.randn(cout)
    ref = F.conv2d(x, w, b, stride=stride, padding=k // 2)
    if relu:
        ref = F.relu(ref)
    mask = two_masks(2, *ref.shape[2:], seed=17)
    mask[1, 12 // stride, 15 // stride] = True  # the output whose window holds the Inf pixel
    keep = mask[:, None].expand_as(ref)
    assert ref[keep].isnan().any() and ref[keep].isinf().any()  # the patch reaches active positions
    prev = torch.randn_like(ref)
    results = {}
    with cpu_algorithm(algorithm):
        for backend in ('torch', 'cpp'):
            results[backend] = stage_conv(x, w, b, mask, prev, stride=stride, relu=relu, backend=backend)
    for backend, y in results.items():
        assert torch.equal(y[keep].isnan(), ref[keep].isnan()), backend
        assert torch.equal(y[keep].isinf(), ref[keep].isinf()), backend
        finite = ref[keep].isfinite()
        assert torch.allclose(y[keep][finite], ref[keep][finite], atol=ATOL, rtol=0), backend
        assert torch.equal(y[~keep], prev[~keep]), backend
    assert torch.equal(results['cpp'][keep].isnan(), results['torch'][keep].isnan())


@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
def test_zero_stopped_writes_only_stopped_pixels(dtype):
    """The one-conv op's output fill: exact zeros at every stopped pixel (runs at row starts and ends, single pixels,
    whole stopped rows), the active pixels' values untouched; the op then equals the masked dense conv with zeros
    even in an output allocated over non-zero memory."""
    from mmseg_cbt.ops.ext_loader import load_cpu_ext
    require_cpu_ext()
    ext = load_cpu_ext()
    mask = torch.zeros(2, 5, 9, dtype=torch.bool)
    mask[0, 0, 1:4] = True
    mask[0, 1, 0] = True
    mask[0, 1, 8] = True
    mask[0, 3, ::2] = True
    mask[1, 2:, 3:] = True
    dst = torch.full((2, 5, 9, 3), float('nan'), dtype=dtype)
    assert ext.zero_stopped(dst, mask) is dst
    assert torch.isnan(dst[mask]).all()
    assert (dst[~mask] == 0).all() and not torch.signbit(dst[~mask]).any()
    # stale non-zero memory in a reused allocation must not leak into the op's stopped pixels
    torch.manual_seed(3)
    x, w, b = torch.randn(2, 4, 5, 9, dtype=dtype), torch.randn(3, 4, 3, 3, dtype=dtype), torch.randn(3, dtype=dtype)
    for _ in range(3):
        junk = torch.full((2 * 5 * 9 * 3 * 8, ), 7.0, dtype=dtype)
        del junk
        y = sparse_conv2d(x, w, b, mask, padding=1, dense_threshold=float('inf'), backend='cpp')
        ref = torch.where(mask[:, None], F.conv2d(x, w, b, padding=1), 0.0)
        assert torch.equal(y[~mask[:, None].expand_as(y)], ref[~mask[:, None].expand_as(ref)])
        torch.testing.assert_close(y, ref, atol=ATOL, rtol=1e-5)
