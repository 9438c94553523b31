"""The compiled CPU kernel's direct algorithm, its variants (thin: per-tile blocks of output vectors, also with a vector
tail; wide: cache blocked), against the PyTorch path and F.conv2d, for the build's instruction set and (in a subprocess)
for the AVX2 build (``MMSEG_CBT_CPU_ISA=avx2``); the ISA switch of the build."""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from utils import SPARSE_ATOL as ATOL
from utils import require_cpu_ext, stage_conv, two_masks

from mmseg_cbt.ops import ext_loader
from mmseg_cbt.ops.sparse_conv import cpp_impl

THIN, WIDE, THIN_VECTOR_TAIL = 2, 3, 4  # the kernel's `direct` values forcing one variant


def _has_avx2() -> bool:
    try:
        with open('/proc/cpuinfo') as f:
            return any(ln.startswith('flags') and ' avx2' in ln and ' fma' in ln for ln in f)
    except OSError:
        return False


def _run(monkeypatch, mode, x, w, b, mask, stride, prev, residual, relu):
    """One masked conv through the stage API with the kernel's ``direct`` argument forced to ``mode``."""
    monkeypatch.setattr(cpp_impl, 'direct_flag', lambda *a: mode)
    backend = 'cpp' if mode is not None else 'torch'
    return stage_conv(x, w, b, mask, prev, stride=stride, residual=residual, relu=relu, backend=backend)


@pytest.mark.parametrize('cout', [1, 7, 8, 9, 16, 18, 36, 100, 144, 192])
@pytest.mark.parametrize('k,stride', [(3, 1), (3, 2), (1, 1)])
def test_direct_variants_match_torch_path(cout, k, stride, monkeypatch):
    """Thin and wide variants, with bias + residual (the output buffer itself) + ReLU and without any: equal to the
    PyTorch path and F.conv2d at active positions, stopped positions untouched. Widths: dot-product channels only
    (1), a partial vector (7, 9 on AVX2; 9 on AVX-512 past one vector), whole vectors (8, 16, 144, 192) and vectors
    plus tail channels (18, 36, 100); Cin 45 at 3x3: the wide variant's three 135-value strips in one K-block (other
    K-blockings: ``test_wide_variant_k_blocks``); the bottom-right position is active (its last strip ends at the
    buffer's last value)."""
    ext = require_cpu_ext()
    if not ext.has_direct():
        pytest.skip(f'this build has no direct algorithm (isa {ext.isa()})')
    torch.manual_seed(cout + 7 * k + stride)
    h_in, w_in, cin = 13, 19, 45 if k == 3 else 33
    ho, wo = (h_in, w_in) if stride == 1 else ((h_in + 1) // 2, (w_in + 1) // 2)
    x = torch.randn(2, cin, h_in, w_in)
    x[1, :, 2, 3] = float('nan')  # a NaN pixel: NaN at every output whose window holds it, also under ReLU
    w = torch.randn(cout, cin, k, k) / (k * k * cin)**0.5
    b = torch.randn(cout)
    mask = two_masks(2, ho, wo, seed=cout)
    mask[:, -1, -1] = True
    mask[1, 2 // stride, 3 // stride] = True  # an output whose window holds the NaN pixel
    prev = torch.randn(2, cout, ho, wo)
    keep = mask[:, None].expand(2, cout, ho, wo)
    for residual, relu, bias in ((True, True, b), (False, False, None)):
        ref = F.conv2d(x, w, bias, stride=stride, padding=k // 2)
        if residual:
            ref = ref + prev
        if relu:
            ref = F.relu(ref)
        torch_path = _run(monkeypatch, None, x, w, bias, mask, stride, prev, residual, relu)
        assert ref[keep].isnan().any()
        for mode in (THIN, WIDE, THIN_VECTOR_TAIL):
            y = _run(monkeypatch, mode, x, w, bias, mask, stride, prev, residual, relu)
            assert torch.equal(y[keep].isnan(), ref[keep].isnan()), mode
            fin = ref[keep].isfinite()
            assert torch.allclose(y[keep][fin], ref[keep][fin], atol=ATOL, rtol=0), mode
            assert torch.allclose(y[keep][fin], torch_path[keep][fin], atol=ATOL, rtol=0), mode
            assert torch.equal(y[~keep], prev[~keep]), mode


def test_isa_choice_is_checked_and_named(monkeypatch):
    """MMSEG_CBT_CPU_ISA: the allowed values, a bad one named in a ValueError; the loaded build reports its ISA."""
    for isa in ext_loader.CPU_ISAS:
        monkeypatch.setenv(ext_loader.ISA_ENV, isa)
        assert ext_loader.cpu_isa_choice() == isa
    monkeypatch.setenv(ext_loader.ISA_ENV, 'sse')
    with pytest.raises(ValueError, match=r"MMSEG_CBT_CPU_ISA must be one of \('native', 'avx2', 'none'\), got 'sse'"):
        ext_loader.cpu_isa_choice()
    monkeypatch.delenv(ext_loader.ISA_ENV)
    ext = require_cpu_ext()
    assert ext.isa() in ('avx512', 'avx2', 'none') and ext.has_direct() == (ext.isa() != 'none')


@pytest.mark.skipif(os.environ.get(ext_loader.ISA_ENV, 'native') != 'native', reason='runs in the AVX2 child')
def test_avx2_build_in_subprocess():
    """The AVX2 build (built once, ~40 s, cached like the native one) passes this file's parity tests and the
    kernel file's direct tests; ``none`` is tested for its ISA report only by the native file (no rebuild)."""
    require_cpu_ext()
    if not _has_avx2():
        pytest.skip('no AVX2 + FMA on this CPU')
    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, **{ext_loader.ISA_ENV: 'avx2'})
    code = ('import sys; from mmseg_cbt.ops.ext_loader import load_cpu_ext; e = load_cpu_ext(); '
            "sys.exit(0 if e is not None and e.isa() == 'avx2' else 1)")
    r = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    files = [os.path.join(here, 'test_sparse_conv_direct.py'), os.path.join(here, 'test_sparse_conv_cpu_kernel.py')]
    r = subprocess.run([sys.executable, '-m', 'pytest', '-q', '-x', '-k', 'direct or non_finite', *files],
                       env=env,
                       capture_output=True,
                       text=True,
                       cwd=os.path.dirname(os.path.dirname(here)))
    assert r.returncode == 0, r.stdout[-4000:]


@pytest.mark.parametrize('cin', [150, 400])
@pytest.mark.parametrize('cout', [18, 48, 100])
def test_wide_variant_k_blocks(cin, cout, monkeypatch):
    """The wide variant's K-blocks (at most 1152 window rows) other than one block of whole strips: Cin 150 at 3x3
    (450-value strips: a block of two strips, then one), Cin 400 (1200-value strips, each cut into two pieces); rows
    equal F.conv2d's with bias, residual and ReLU, stopped positions untouched."""
    ext = require_cpu_ext()
    if not ext.has_direct():
        pytest.skip(f'this build has no direct algorithm (isa {ext.isa()})')
    torch.manual_seed(cin + cout)
    x = torch.randn(1, cin, 10, 14)
    w, b = torch.randn(cout, cin, 3, 3) / (9 * cin)**0.5, torch.randn(cout)
    mask = two_masks(1, 10, 14, seed=cout)
    mask[0, -1, -1] = True
    prev = torch.randn(1, cout, 10, 14)
    y = _run(monkeypatch, WIDE, x, w, b, mask, 1, prev, True, True)
    ref = F.relu(F.conv2d(x, w, b, padding=1) + prev)
    keep = mask[:, None].expand_as(ref)
    assert torch.allclose(y[keep], ref[keep], atol=ATOL, rtol=0)
    assert torch.equal(y[~keep], prev[~keep])


@pytest.mark.parametrize('cout', [9, 36, 144, 200])
@pytest.mark.parametrize('threads', [1, 2, 3])
def test_wide_variant_few_positions(cout, threads, monkeypatch):
    """Fewer active positions than one chunk per thread (the threads then share the chunk's output vectors): the
    wide variant's rows equal F.conv2d's for 1-3 threads, bias, residual (the output itself) and ReLU."""
    ext = require_cpu_ext()
    if not ext.has_direct():
        pytest.skip(f'this build has no direct algorithm (isa {ext.isa()})')
    torch.manual_seed(cout)
    x = torch.randn(1, 20, 9, 11)
    w, b = torch.randn(cout, 20, 3, 3) / 180**0.5, torch.randn(cout)
    mask = torch.rand(1, 9, 11) < 0.3
    mask[0, -1, -1] = True
    prev = torch.randn(1, cout, 9, 11)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        y = _run(monkeypatch, WIDE, x, w, b, mask, 1, prev, True, True)
    finally:
        torch.set_num_threads(old)
    ref = F.relu(F.conv2d(x, w, b, padding=1) + prev)
    keep = mask[:, None].expand_as(ref)
    assert torch.allclose(y[keep], ref[keep], atol=ATOL, rtol=0)
    assert torch.equal(y[~keep], prev[~keep])


def test_wide_pack_given_equals_packed_in_the_call():
    """The wide variant with the caller's packed weights (``pack_wide``, what the op and the stage API cache) gives
    the same rows, bit for bit, as packing them in the call; the packed layout is vector-major with zeros past Cout;
    a pack of another size is rejected; the GEMM and the thin variant ignore a pack."""
    ext = require_cpu_ext()
    if not ext.has_direct():
        pytest.skip(f'this build has no direct algorithm (isa {ext.isa()})')
    from mmseg_cbt.ops import SparseIndex, conv_weight_matrix, to_padded_nhwc
    torch.manual_seed(3)
    cin, cout, h, w = 24, 100, 9, 13
    x = torch.randn(1, cin, h, w)
    wt, b = torch.randn(cout, cin, 3, 3) / (9 * cin)**0.5, torch.randn(cout)
    idx = SparseIndex.build(two_masks(1, h, w, seed=1))
    _, strips = idx.windows((h, w), 3, 1, 1, 1)
    src = to_padded_nhwc(x).view(-1, cin)
    wmat = conv_weight_matrix(wt)
    pack = ext.pack_wide(wmat)
    lanes = 16 if ext.isa() == 'avx512' else 8
    nvec = -(-cout // lanes)
    assert pack.numel() == nvec * wmat.shape[0] * lanes
    cols = pack.view(nvec, wmat.shape[0], lanes).permute(1, 0, 2).reshape(wmat.shape[0], nvec * lanes)
    assert torch.equal(cols[:, :cout], wmat) and bool((cols[:, cout:] == 0).all())
    ref = F.conv2d(x, wt, b, padding=1).permute(0, 2, 3, 1)[idx.mask]
    rows = {}
    for mode in (0, THIN, WIDE):
        for given in (None, pack):
            out = torch.empty(idx.num_active, cout)
            ext.sparse_conv_gemm(src, strips, 3, wmat, b, None, None, False, out, None, 64, mode, given)
            rows[mode, given is None] = out
        assert torch.equal(rows[mode, True], rows[mode, False])
        torch.testing.assert_close(rows[mode, True], ref, atol=ATOL, rtol=0)
    with pytest.raises(RuntimeError, match='wide_pack must be pack_wide'):
        ext.sparse_conv_gemm(src, strips, 3, wmat, b, None, None, False, torch.empty(idx.num_active, cout), None, 64,
                             WIDE, pack[:-1])
