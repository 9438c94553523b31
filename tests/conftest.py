"""Shared fixtures: registers mmseg + mmseg_cbt modules and builds tiny early-exit models."""
import copy
import os.path as osp

import pytest
import torch

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
TOY_CONFIG = osp.join(ROOT, 'configs', 'ee_hrnet', 'ee-fcn_hr-tiny_1xb4-1k_toycity-256x512.py')


@pytest.fixture(scope='session', autouse=True)
def _register():
    from mmseg.utils import register_all_modules
    register_all_modules(init_default_scope=True)
    import mmseg_cbt  # noqa: F401


@pytest.fixture(scope='session')
def toy_cfg():
    from mmengine.config import Config
    return Config.fromfile(TOY_CONFIG)


def build_tiny_model(toy_cfg, num_classes=None, seed=0, **test_cfg):
    """The toy config's early-exit model (optionally with another class count) in a deterministic init."""
    from mmseg.registry import MODELS
    cfg = copy.deepcopy(toy_cfg.model)
    if num_classes is not None:
        cfg.num_classes = num_classes
    cfg.test_cfg.update(test_cfg)
    torch.manual_seed(seed)
    model = MODELS.build(cfg)
    model.init_weights()
    return model


def demo_batch(num_classes, n=2, h=64, w=96, seed=0):
    """A batch as the data preprocessor gives it: inputs (n,3,h,w) and SegDataSamples with gt labels."""
    from mmengine.structures import PixelData
    from mmseg.structures import SegDataSample
    g = torch.Generator().manual_seed(seed)
    imgs = torch.randn(n, 3, h, w, generator=g)
    segs = torch.randint(0, num_classes, (n, 1, h, w), generator=g)
    segs[:, :, :2] = 255  # some ignore pixels
    meta = dict(img_shape=(h, w), ori_shape=(h, w), pad_shape=(h, w), padding_size=[0, 0, 0, 0], flip=False)
    samples = [SegDataSample(gt_sem_seg=PixelData(data=segs[i]), metainfo=dict(meta)) for i in range(n)]
    return imgs, samples
