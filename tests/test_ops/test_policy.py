"""The sparse-versus-dense policy: per-conv crossover tables, the threshold of one call, the whole-stage default by
device and kernel, the CPU algorithm switch."""
import re
import subprocess
import sys

import pytest
import torch

from mmseg_cbt.ops import (cpu_algorithm, cpu_ext_available, cpu_kernel_direct, default_max_active, dense_crossover,
                           get_cpu_algorithm, set_cpu_algorithm)
from mmseg_cbt.ops.ext_loader import load_cpu_ext
from mmseg_cbt.ops.policy import CPU_ALGORITHMS, TRITON_DENSE_THRESHOLD, dense_threshold


def test_default_max_active_by_device_and_kernel():
    assert default_max_active(torch.device('cuda')) == 0.6  # no GPU measurement yet: the PyTorch-path value
    want = 0.6 if not cpu_ext_available() else (0.9 if cpu_kernel_direct(18) else 0.8)
    assert default_max_active(torch.device('cpu')) == want
    if cpu_ext_available():
        with cpu_algorithm('gemm'):
            assert default_max_active(torch.device('cpu')) == 0.8 and not cpu_kernel_direct(18)
        assert get_cpu_algorithm() == 'auto'


def test_cpu_algorithm_switch_restores_and_rejects_bad_names():
    assert get_cpu_algorithm() == 'auto'
    with pytest.raises(RuntimeError):
        with cpu_algorithm('gemm'):
            assert get_cpu_algorithm() == 'gemm'
            raise RuntimeError
    assert get_cpu_algorithm() == 'auto'
    with pytest.raises(ValueError, match=re.escape(f"CPU algorithm must be one of {CPU_ALGORITHMS}, got 'fast'")):
        set_cpu_algorithm('fast')
    assert CPU_ALGORITHMS == ('auto', 'gemm', 'direct', 'direct-thin', 'direct-wide', 'direct-vtail', 'tune')


def test_bad_environment_variable_is_named():
    r = subprocess.run([sys.executable, '-c', 'import mmseg_cbt.ops'],
                       capture_output=True,
                       text=True,
                       env={
                           'MMSEG_CBT_CPU_ALGO': 'fast',
                           'PATH': '/usr/bin:/bin'
                       })
    want = f"MMSEG_CBT_CPU_ALGO must be one of {CPU_ALGORITHMS}, got 'fast'"
    assert r.returncode != 0 and want in r.stderr


def test_crossover_tables():
    """The measured crossover points are returned exactly at their MAC counts (PyTorch path, the compiled kernel's
    GEMM and direct algorithms), clamped beyond the ends."""
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
    # between two points: linear in log2(MACs); 3x3 PyTorch path, C=9..48 -> midway in log2 between 0.62 and 0.66
    assert dense_crossover(3, 9, 18) == pytest.approx(0.62)
    mid = (1458 * 20736)**0.5 / 9  # 3x3 at the log-midpoint of the first two points
    assert dense_crossover(3, 1, round(mid)) == pytest.approx(0.64, abs=2e-4)


def test_dense_threshold_of_a_call_follows_backend_and_algorithm():
    """One call's threshold: full masks only with Triton, the PyTorch table without the kernel, the kernel's GEMM or
    direct table by the algorithm switch."""
    assert dense_threshold(3, 18, 18, torch.float32, triton=True, ext=None) == TRITON_DENSE_THRESHOLD
    assert dense_threshold(3, 48, 48, torch.float32, triton=False, ext=None) == dense_crossover(3, 48, 48)
    ext = load_cpu_ext()
    if ext is None:
        pytest.skip('the compiled CPU kernel is not built here')
    with cpu_algorithm('gemm'):
        assert dense_threshold(1, 18, 18, torch.float32, triton=False, ext=ext) == pytest.approx(0.72)
    with cpu_algorithm('auto'):
        want = 0.8 if ext.has_direct() else 0.72
        assert dense_threshold(1, 18, 18, torch.float32, triton=False, ext=ext) == pytest.approx(want)
        assert dense_threshold(1, 18, 18, torch.float64, triton=False, ext=ext) == pytest.approx(0.72)
