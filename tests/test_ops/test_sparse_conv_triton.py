"""The Triton kernel of the masked conv: under the interpreter on CPU (TRITON_INTERPRET=1, in a subprocess) or on
CUDA."""
import importlib.util
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from utils import SPARSE_ATOL as ATOL
from utils import assert_active_close, mask_where, two_masks

from mmseg_cbt.ops import (SparseIndex, conv_weight_matrix, gather_rows, padded_interior, sparse_conv2d,
                           sparse_conv_buffer, sparse_conv_rows, to_padded_nhwc)

_HAS_TRITON = importlib.util.find_spec('triton') is not None


def _triton_checks(dev: str) -> None:
    """Parity of the Triton kernel with F.conv2d (plain asserts; runs in-process or in a subprocess)."""
    torch.manual_seed(7)
    cin, cout = 20, 18  # not multiples of the block sizes
    for k, stride in [(3, 1), (3, 2), (1, 1)]:
        x = torch.randn(2, cin, 11, 13, device=dev)
        w, b = torch.randn(cout, cin, k, k, device=dev), torch.randn(cout, device=dev)
        ref = F.conv2d(x, w, b, stride, k // 2)
        mask = two_masks(2, *ref.shape[2:], seed=12).to(dev)
        y = sparse_conv2d(x, w, b, mask, stride, k // 2, backend='triton')
        assert_active_close(y, ref, mask)
        assert torch.all(y[~mask[:, None].expand_as(y)] == 0)
    # fused epilogue (bias, residual from a buffer or compact rows, ReLU) and fused scatter
    c = 16
    x = torch.randn(2, c, 9, 12, device=dev)
    w, b = torch.randn(c, c, 3, 3, device=dev) * 0.2, torch.randn(c, device=dev)
    mask = two_masks(2, 9, 12, seed=13).to(dev)
    idx = SparseIndex.build(mask)
    buf = to_padded_nhwc(x)
    prev = torch.randn(2, c, 9, 12, device=dev)
    ref = mask_where(mask, F.relu(F.conv2d(x, w, b, padding=1) + x), prev)
    for res in (buf, gather_rows(buf, idx)):
        out = to_padded_nhwc(prev)
        sparse_conv_buffer(buf, idx, conv_weight_matrix(w), b, out, residual=res, relu=True, backend='triton')
        assert torch.allclose(padded_interior(out), ref, atol=ATOL)
    rows = sparse_conv_rows(buf, idx, conv_weight_matrix(w), b, residual=buf, relu=True, backend='triton')
    assert torch.allclose(rows, ref.permute(0, 2, 3, 1)[mask], atol=ATOL)
    # a NaN patch propagates through the fused ReLU as in torch.relu
    x[:, :, 3:7, 4:9] = float('nan')
    ref = F.relu(F.conv2d(x, w, b, padding=1)).permute(0, 2, 3, 1)[mask]
    assert ref.isnan().any()
    rows = sparse_conv_rows(to_padded_nhwc(x), idx, conv_weight_matrix(w), b, relu=True, backend='triton')
    assert torch.equal(rows.isnan(), ref.isnan())
    assert torch.allclose(rows[~ref.isnan()], ref[~ref.isnan()], atol=ATOL)


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
    assert_active_close(sparse_conv2d(x, w, None, mask, 1, 1), F.conv2d(x, w, None, 1, 1), mask)


if __name__ == '__main__':  # subprocess entry of test_triton_interpreter_cpu
    if len(sys.argv) == 3 and sys.argv[1] == '--triton-checks':
        _triton_checks(sys.argv[2])
        print('TRITON CHECKS OK')
