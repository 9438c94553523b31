"""Shared fixtures (registries, the toy config, tiny toy-city data); plain helpers live in ``tests/utils.py``."""
import os
import os.path as osp
import sys
import tempfile

import pytest

# the CPU algorithm's tuning result of this machine (~/.cache) must not steer the tests: an empty cache of their own
os.environ['MMSEG_CBT_CACHE_DIR'] = tempfile.mkdtemp(prefix='mmseg_cbt_test_cache_')

# test modules in sub-folders import the shared helpers as ``from utils import ...``
sys.path.insert(0, osp.dirname(osp.abspath(__file__)))
from utils import TOY_CONFIG  # noqa: E402


@pytest.fixture(scope='session', autouse=True)
def _register():
    try:
        from mmseg.utils import register_all_modules
    except ImportError:
        # a machine with torch only (e.g. a GPU box for the kernel tests): tests/test_ops still runs
        return
    register_all_modules(init_default_scope=True)
    import mmseg_cbt  # noqa: F401


@pytest.fixture(scope='session')
def toy_cfg():
    from mmengine.config import Config
    return Config.fromfile(TOY_CONFIG)


@pytest.fixture(scope='session')
def tiny_city(tmp_path_factory):
    """A 4-train / 2-val toy-city set at 64x128 (generated once per test session)."""
    from utils import load_toy_city
    root = tmp_path_factory.mktemp('toy_city')
    load_toy_city().generate_toy_city(str(root), num_train=4, num_val=2, height=64, width=128, seed=0, progress=False)
    return str(root)
