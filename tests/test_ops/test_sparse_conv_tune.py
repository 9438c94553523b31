"""The per-CPU algorithm tuning: measured result stored per machine key, followed by ``auto``, re-read when changed."""
import json
import os
import os.path as osp
import subprocess
import sys

import pytest

from mmseg_cbt.ops import cpu_algorithm, cpu_ext_available, cpu_kernel_direct
from mmseg_cbt.ops.ext_loader import load_cpu_ext
from mmseg_cbt.ops.sparse_conv import tune

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
needs_direct = pytest.mark.skipif(
    not cpu_ext_available() or not load_cpu_ext().has_direct(),
    reason='the CPU kernel with its direct algorithm is not built')


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv('MMSEG_CBT_CACHE_DIR', str(tmp_path))
    tune.clear_tuned()
    yield tmp_path
    tune.clear_tuned()


def _write(widths):
    path = tune.tune_path()
    os.makedirs(osp.dirname(path), exist_ok=True)
    with open(path, 'w') as f:
        json.dump(
            dict(
                key=tune.tune_key(),
                active=0.5,
                widths={
                    str(c):
                    dict(shape=[8, 8], direct_ms=1.0, gemm_ms=1.0, direct=d) if isinstance(d, bool) else dict(
                        shape=[8, 8], direct_ms=1.0, gemm_ms=1.0, direct=d != 'gemm', algorithm=d)
                    for c, d in widths.items()
                }), f)
    tune.clear_tuned()
    return path


def test_key_names_cpu_isa_threads_and_paths_differ(cache_dir):
    key = tune.tune_key()
    assert set(key) == {'cpu', 'cpu_id', 'isa', 'threads'}
    assert tune.tune_path().startswith(str(cache_dir))
    assert tune.tune_path(dict(key, threads=key['threads'] + 1)) != tune.tune_path()
    assert tune.tune_path(dict(key, cpu_id=key['cpu_id'] + 'x')) != tune.tune_path()  # same name, other generation


@needs_direct
def test_auto_follows_the_tuned_table_nearest_width(cache_dir):
    with cpu_algorithm('auto'):
        assert tune.load_tuned() is None  # not tuned: the vendor rule decides
        _write({18: False, 48: True, 384: False})
        assert [cpu_kernel_direct(c) for c in (8, 18, 30, 48, 96, 200, 384, 1000)] == \
            [False, False, True, True, True, False, False, False]
        with cpu_algorithm('direct'):
            assert cpu_kernel_direct(384)  # a forced choice wins over the table
        with cpu_algorithm('gemm'):
            assert not cpu_kernel_direct(48)
        # a damaged file is ignored, not an error
        with open(tune.tune_path(), 'w') as f:
            f.write('{not json')
        tune.clear_tuned()
        assert tune.load_tuned() is None


@needs_direct
def test_measure_saves_a_result_that_auto_reads(cache_dir, monkeypatch):
    shapes = ((8, 16, 16), (64, 8, 8))
    result = tune.measure_algorithms(shapes, repeats=1)
    assert set(result['widths']) == {'8', '64'}
    for row in result['widths'].values():
        assert row['direct_ms'] > 0 and row['gemm_ms'] > 0
        times = {'direct-thin': row['thin_ms'], 'direct-wide': row['wide_ms'], 'gemm': row['gemm_ms']}
        if 'vtail_ms' in row:
            times['direct-vtail'] = row['vtail_ms']
        assert times[row['algorithm']] == min(times.values())
        assert row['direct_ms'] == min(v for k, v in times.items() if k != 'gemm')
        assert row['direct'] == (row['algorithm'] != 'gemm')
    assert 'vtail_ms' not in result['widths']['64']  # no short tail: nothing else to time
    assert ('vtail_ms' in result['widths']['8']) == tune.has_short_tail(load_cpu_ext(), 8)
    with open(tune.tune_path()) as f:
        assert json.load(f) == json.loads(json.dumps(result))
    with cpu_algorithm('auto'):
        assert cpu_kernel_direct(8) == result['widths']['8']['direct']
    with pytest.raises(ValueError, match='active must be in'):
        tune.measure_algorithms(shapes, active=1.0)
    # 'tune' measures on first use when there is no result
    os.remove(tune.tune_path())
    tune.clear_tuned()
    calls = []
    real = tune.measure_algorithms
    monkeypatch.setattr(tune, 'measure_algorithms', lambda **kw: calls.append(1) or real(shapes, repeats=1))
    with cpu_algorithm('tune'):
        cpu_kernel_direct(64)
        cpu_kernel_direct(8)
    assert calls == [1] and osp.exists(tune.tune_path())


@needs_direct
def test_tool_keeps_a_result_unless_forced(cache_dir):
    env = dict(os.environ, MMSEG_CBT_CACHE_DIR=str(cache_dir))
    tool = osp.join(ROOT, 'tools/analysis_tools/tune_sparse_conv.py')
    show = subprocess.run([sys.executable, tool, '--show'], env=env, capture_output=True, text=True)
    assert show.returncode == 1 and 'not tuned' in show.stderr
    bad = subprocess.run([sys.executable, tool, '--active', '2'], env=env, capture_output=True, text=True)
    assert bad.returncode == 2 and '--active' in bad.stderr
    path = _write({18: True})
    kept = subprocess.run([sys.executable, tool], env=env, capture_output=True, text=True)
    assert kept.returncode == 0 and 'stored result' in kept.stdout
    with open(path) as f:
        assert list(json.load(f)['widths']) == ['18']  # not measured again


@needs_direct
def test_vector_tail_is_chosen_per_width_and_computes_the_same(cache_dir):
    import torch
    import torch.nn.functional as F

    from mmseg_cbt.ops import sparse_conv2d
    from mmseg_cbt.ops.policy import direct_flag
    ext = load_cpu_ext()
    lanes = 16 if ext.isa() == 'avx512' else 8
    tail, none = lanes * 2 + 4, lanes * 2  # 36 / 32 channels on AVX-512
    assert tune.has_short_tail(ext, tail) and not tune.has_short_tail(ext, none)
    with cpu_algorithm('auto'):
        _write({tail: 'direct-vtail', 48: 'direct-wide', 100: 'direct', 384: 'gemm'})
        assert tune.load_tuned()[tail] == 'direct-vtail'
        assert direct_flag(ext, tail, torch.float32) == 4
        assert direct_flag(ext, none, torch.float32) == 2  # nearest is the vtail width, but no short tail here
        assert direct_flag(ext, 48, torch.float32) == 3 and direct_flag(ext, 100, torch.float32) == 1
        assert direct_flag(ext, 384, torch.float32) == 0
        assert cpu_kernel_direct(tail) and not cpu_kernel_direct(384)
        x = torch.randn(1, tail, 13, 17)
        w = torch.randn(tail, tail, 3, 3) * 0.1
        mask = torch.rand(1, 13, 17) < 0.4
        got = sparse_conv2d(x, w, None, mask, padding=1, dense_threshold=1.0)
    with cpu_algorithm('direct'):
        ref = sparse_conv2d(x, w, None, mask, padding=1, dense_threshold=1.0)
    dense = F.conv2d(x, w, None, 1, 1)
    assert torch.allclose(got[mask.unsqueeze(1).expand_as(got)], dense[mask.unsqueeze(1).expand_as(dense)], atol=1e-4)
    assert torch.allclose(got, ref, atol=1e-4)
    with open(tune.tune_path(), 'w') as f:  # an unknown algorithm name: the file is ignored
        json.dump(dict(key=tune.tune_key(), active=0.5, widths={'8': dict(direct=True, algorithm='fast')}), f)
    tune.clear_tuned()
    assert tune.load_tuned() is None
