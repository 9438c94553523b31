"""Helpers shared by the test modules (imported as ``from utils import ...``; conftest puts tests/ on the path)."""
import copy
import os
import os.path as osp

import pytest
import torch

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
TOY_CONFIG = osp.join(ROOT, 'configs', 'ee_hrnet', 'ee-fcn_hr-tiny_1xb4-1k_toycity-256x512.py')


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


def tiny_run_cfg(toy_cfg, data_root, work_dir, max_iters=2, **hook_kw):
    """The toy config shrunk for a test run: tiny data, a few iterations, no worker processes."""
    cfg = copy.deepcopy(toy_cfg)
    cfg.work_dir = str(work_dir)
    cfg.train_dataloader.dataset.data_root = data_root
    cfg.val_dataloader.dataset.data_root = data_root
    cfg.test_dataloader.dataset.data_root = data_root
    for loader in (cfg.train_dataloader, cfg.val_dataloader, cfg.test_dataloader):
        loader.num_workers = 0
        loader.persistent_workers = False
    cfg.train_dataloader.batch_size = 2
    cfg.train_dataloader.dataset.pipeline[2].scale = (128, 64)
    cfg.train_dataloader.dataset.pipeline[3].crop_size = (64, 64)
    for loader in (cfg.val_dataloader, cfg.test_dataloader):
        loader.dataset.pipeline[1].scale = (128, 64)
    cfg.model.data_preprocessor.size = (64, 64)
    cfg.train_cfg.max_iters = max_iters
    cfg.train_cfg.val_interval = max_iters
    cfg.default_hooks.checkpoint.interval = max_iters
    cfg.default_hooks.logger.interval = 1
    cfg.param_scheduler = [dict(type='ConstantLR', factor=1.0, by_epoch=False, begin=0, end=max_iters)]
    cfg.custom_hooks = [dict(type='CBTCalibrationHook', alpha=0.9, beta=0.998, progress=False, **hook_kw)]
    cfg.visualizer.vis_backends = [dict(type='LocalVisBackend')]
    return cfg


def require_cpu_ext():
    """The compiled CPU kernel of the masked conv, built on first use.

    CI (``CI`` set, as ``.ci/run`` does) must build it: a failed build fails the test there instead of letting the
    PyTorch path be tested against itself. Elsewhere (e.g. a GPU machine without ninja) the kernel's tests skip with
    the reason; ``MMSEG_CBT_CPU_EXT=0`` skips them too.
    """
    from mmseg_cbt.ops import cpu_ext_enabled, load_cpu_ext
    if not cpu_ext_enabled():
        pytest.skip('MMSEG_CBT_CPU_EXT=0')
    ext = load_cpu_ext()
    if ext is None:
        msg = 'the CPU kernel of the masked conv could not be built (see the RuntimeWarning)'
        if os.environ.get('CI'):
            pytest.fail(msg + '; CI requires it')
        pytest.skip(msg)
    return ext


def randomise_bn(module, seed: int = 1) -> None:
    """Non-trivial BN statistics and affine parameters, so that equality checks are not met by an identity BN."""
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)


#: The tiny early-exit ViT on toy-city (patch 8, width 64, 6 blocks, exits after blocks 2 / 4 / 6).
TOY_VIT_CONFIG = osp.join(ROOT, 'configs', 'ee_vit', 'ee-vit-tiny_1xb4-1k_toycity-256x512.py')


def build_tiny_vit(seed=0, **test_cfg):
    """The tiny ViT config's early-exit model in eval mode, deterministic init, non-trivial LayerNorms."""
    from mmengine.config import Config

    from mmseg.registry import MODELS
    cfg = Config.fromfile(TOY_VIT_CONFIG).model
    cfg.test_cfg.update(test_cfg)
    torch.manual_seed(seed)
    model = MODELS.build(cfg)
    g = torch.Generator().manual_seed(seed + 1)
    for m in model.modules():
        if isinstance(m, torch.nn.LayerNorm):
            m.weight.data.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
    model.eval()
    return model


#: Where the toy-city generator lives: a data tool (``toy_city_gen`` package), not part of the installed plugin.
TOY_CITY_TOOL_DIR = osp.join(ROOT, 'tools', 'dataset_converters')


def load_toy_city():
    """The toy-city generator package ``toy_city_gen``, imported from ``tools/dataset_converters``."""
    import importlib
    import sys
    if TOY_CITY_TOOL_DIR not in sys.path:
        sys.path.insert(0, TOY_CITY_TOOL_DIR)
    return importlib.import_module('toy_city_gen')


#: Scenarios of the two-process calibration test: (hook's calibration images, masked training).
#: 3 images split 2/1 over two ranks without padding; 1 image leaves rank 1 without a batch.
DIST_SCENARIOS = {'plain': (3, None), 'masked': (1, dict(exit_mode='global', global_threshold=0.2, fill='copy'))}


def dist_scenario_cfg(toy_cfg, data_root, work_dir, scenario, max_iters=3):
    """Config of one scenario of the distributed calibration test (also used to re-calibrate in one process)."""
    num_images, masked = DIST_SCENARIOS[scenario]
    cfg = tiny_run_cfg(toy_cfg, data_root, work_dir, max_iters=max_iters)
    cfg.experiment_name = f'dist_{scenario}'
    cfg.train_cfg.val_interval = 10 * max_iters  # no validation: not what is tested
    if masked:
        cfg.model.train_cfg = dict(masked_training=masked)
    dataset = copy.deepcopy(cfg.train_dataloader.dataset)
    dataset.pipeline = copy.deepcopy(cfg.test_dataloader.dataset.pipeline)
    dataset.indices = num_images
    cfg.custom_hooks[0]['dataloader'] = dict(
        batch_size=1,
        num_workers=0,
        persistent_workers=False,
        sampler=dict(type='DefaultSampler', shuffle=False),
        dataset=dataset)
    return cfg


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now (for a process group's rendezvous)."""
    import socket
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def load_tool(rel_path: str):
    """Imports a tool script (``tools/<rel_path>``) as a module of its own name (tools are not a package)."""
    import importlib.util
    name = 'tool_' + osp.splitext(osp.basename(rel_path))[0]
    spec = importlib.util.spec_from_file_location(name, osp.join(ROOT, 'tools', rel_path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def usage_error(capsys, func, argv):
    """Runs ``func(argv)``, expects an argparse error (exit 2) and returns its message."""
    with pytest.raises(SystemExit) as e:
        func(argv)
    assert e.value.code == 2
    return capsys.readouterr().err
