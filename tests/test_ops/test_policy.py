"""The sparse-versus-dense policy: whole-stage default by device and kernel, the CPU algorithm switch."""
import subprocess
import sys

import pytest
import torch

from mmseg_cbt.ops import (cpu_algorithm, cpu_ext_available, cpu_kernel_direct, default_max_active, get_cpu_algorithm,
                           set_cpu_algorithm)


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
    with pytest.raises(ValueError, match=r"CPU algorithm must be one of \('auto', 'gemm', 'direct'\), got 'fast'"):
        set_cpu_algorithm('fast')


def test_bad_environment_variable_is_named():
    r = subprocess.run([sys.executable, '-c', 'import mmseg_cbt.ops'],
                       capture_output=True,
                       text=True,
                       env={
                           'MMSEG_CBT_CPU_ALGO': 'fast',
                           'PATH': '/usr/bin:/bin'
                       })
    assert r.returncode != 0 and "MMSEG_CBT_CPU_ALGO must be one of ('auto', 'gemm', 'direct'), got 'fast'" in r.stderr
