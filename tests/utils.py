"""Helpers shared by the test modules (imported as ``from utils import ...``; conftest puts tests/ on the path)."""
import copy
import os
import os.path as osp
import sys
from typing import List

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


def shrink_run_cfg(cfg, data_root, work_dir, max_iters=2):
    """A copy of a toy-city config shrunk for a test run: tiny data, a few iterations, no worker processes, no
    custom hooks."""
    cfg = copy.deepcopy(cfg)
    cfg.work_dir = str(work_dir)
    for loader in (cfg.train_dataloader, cfg.val_dataloader, cfg.test_dataloader):
        loader.dataset.data_root = data_root
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
    cfg.custom_hooks = []
    cfg.visualizer.vis_backends = [dict(type='LocalVisBackend')]
    return cfg


def tiny_run_cfg(toy_cfg, data_root, work_dir, max_iters=2, **hook_kw):
    """The toy config shrunk for a test run (:func:`shrink_run_cfg`) with the CBT calibration hook."""
    cfg = shrink_run_cfg(toy_cfg, data_root, work_dir, max_iters)
    cfg.custom_hooks = [dict(type='CBTCalibrationHook', alpha=0.9, beta=0.998, progress=False, **hook_kw)]
    return cfg


def require_cpu_ext():
    """The compiled CPU kernel of the masked conv, built on first use.

    CI (``CI`` set, as ``.ci/run`` does) must build it: a failed build fails the test there instead of letting the
    PyTorch path be tested against itself. Elsewhere (e.g. a GPU machine without ninja) the kernel's tests skip with
    the reason; ``MMSEG_CBT_CPU_EXT=0`` skips them too.
    """
    from mmseg_cbt.ops.ext_loader import cpu_ext_enabled, load_cpu_ext
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
#: The same tiny ViT with DToP's attention-to-mask head at every exit.
TOY_VIT_ATM_CONFIG = osp.join(ROOT, 'configs', 'ee_vit', 'ee-vit-tiny-atm_1xb4-1k_toycity-256x512.py')


def build_tiny_vit(seed=0, config=TOY_VIT_CONFIG, **test_cfg):
    """The tiny ViT config's (or ``config``'s) early-exit model in eval mode, deterministic init, non-trivial
    LayerNorms."""
    from mmengine.config import Config

    from mmseg.registry import MODELS
    cfg = Config.fromfile(config).model
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


def train_tiny_vit(config, data_root, work_dir):
    """Two training iterations of a tiny ViT config on toy-city data through mmengine's Runner (calibration hook
    and validation at the end); returns the runner and the saved state dict."""
    from mmengine.config import Config
    from mmengine.runner import Runner
    cfg = tiny_run_cfg(Config.fromfile(config), data_root, work_dir)
    cfg.model.backbone.img_size = (64, 64)
    runner = Runner.from_cfg(cfg)
    runner.train()
    sd = torch.load(osp.join(str(work_dir), 'iter_2.pth'), map_location='cpu', weights_only=False)['state_dict']
    return runner, sd


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


#: Tolerance of the masked-conv parity tests (float32, summation order differs from F.conv2d's).
SPARSE_ATOL = 1e-4


def blob_mask(n: int, h: int, w: int, active: float, seed: int) -> torch.Tensor:
    """Blob-shaped mask (thresholded smoothed noise) with about ``active`` fraction True per image."""
    import torch.nn.functional as F
    g = torch.Generator().manual_seed(seed)
    noise = torch.rand(n, 1, h, w, generator=g)
    noise = F.avg_pool2d(noise, 5, stride=1, padding=2, count_include_pad=False)
    flat = noise.view(n, -1)
    q = torch.quantile(flat, 1.0 - active, dim=1, keepdim=True) if active > 0 else flat.max(1, True)[0] + 1
    return (flat > q).view(n, h, w) if active < 1 else torch.ones(n, h, w, dtype=torch.bool)


def two_masks(n: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    """Masks for a batch whose images differ: image 0 a blob mask, the others random (35 % active)."""
    g = torch.Generator().manual_seed(seed)
    m = torch.rand(n, h, w, generator=g) < 0.35
    m[0] = blob_mask(1, h, w, 0.3, seed)[0]
    return m


def assert_active_close(y: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor, atol: float = SPARSE_ATOL) -> None:
    """``y`` equals ``ref`` within ``atol`` at the active positions of ``mask`` (N, H, W)."""
    keep = mask[:, None].expand_as(ref)
    assert torch.allclose(y[keep], ref[keep], atol=atol, rtol=0), (y[keep] - ref[keep]).abs().max()


def stage_conv(x: torch.Tensor,
               w: torch.Tensor,
               b: torch.Tensor,
               mask: torch.Tensor,
               prev: torch.Tensor,
               *,
               stride: int = 1,
               residual: bool = False,
               relu: bool = False,
               backend: str = 'auto') -> torch.Tensor:
    """One masked conv through the stage API (sparse path forced) into a padded buffer that held ``prev``; returns
    its NCHW interior (stopped positions keep ``prev``; ``residual``: the output buffer itself is the residual)."""
    from mmseg_cbt.ops import SparseIndex, conv_weight_matrix, padded_interior, sparse_conv_buffer, to_padded_nhwc
    out_buf = to_padded_nhwc(prev)
    sparse_conv_buffer(
        to_padded_nhwc(x),
        SparseIndex.build(mask),
        conv_weight_matrix(w),
        b,
        out_buf,
        stride=stride,
        padding=w.shape[-1] // 2,
        residual=out_buf if residual else None,
        relu=relu,
        dense_threshold=float('inf'),
        backend=backend)
    return padded_interior(out_buf)


def mask_where(mask: torch.Tensor, new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """``new`` at the active positions of ``mask`` (N, H, W), ``old`` elsewhere."""
    return torch.where(mask[:, None], new, old)


def class_mean_loader_cfg(toy_cfg, data_root, num_images):
    """The calibration dataloader config of the class-mean tests: the first ``num_images`` tiny toy-city training
    images read with the (shrunk) test pipeline, one per batch, no worker processes."""
    cfg = tiny_run_cfg(toy_cfg, data_root, '/tmp')
    dataset = copy.deepcopy(cfg.train_dataloader.dataset)
    dataset.pipeline = copy.deepcopy(cfg.test_dataloader.dataset.pipeline)
    dataset.indices = num_images
    return dict(
        batch_size=1,
        num_workers=0,
        persistent_workers=False,
        sampler=dict(type='DefaultSampler', shuffle=False),
        dataset=dataset)


#: A plain mmseg HRNet FCN (no exits) with the tiny widths, on toy-city: the input of tools/e2cm.py.
PLAIN_TOY_CONFIG = osp.join(ROOT, 'configs', 'e2cm', 'fcn_hr-tiny_1xb4-1k_toycity-256x512.py')


def build_tiny_e2cm(seed=0, exits=None, **test_cfg):
    """The E2CM model of the plain tiny config in eval mode: non-trivial BN, random class means (every class
    present), counts and temperatures, as a fitted model would hold."""
    from mmengine.config import Config

    from mmseg.registry import MODELS

    from mmseg_cbt.calibration.e2cm import e2cm_config
    cfg = e2cm_config(Config.fromfile(PLAIN_TOY_CONFIG), exits)
    cfg.model.test_cfg.update(test_cfg)
    torch.manual_seed(seed)
    model = MODELS.build(cfg.model)
    randomise_bn(model, seed=seed + 1)
    g = torch.Generator().manual_seed(seed + 2)
    for head in model.exit_heads:
        k, c = head.class_means.shape
        head.set_class_means(torch.rand(k, c, generator=g), torch.randint(1, 100, (k, ), generator=g), 0.5 * c)
    return model.eval()


def load_tool(rel_path: str):
    """Imports a script under tools/ as a module of its own name (tools are not a package)."""
    import importlib.util
    name = 'tool_' + osp.splitext(osp.basename(rel_path))[0]
    spec = importlib.util.spec_from_file_location(name, osp.join(ROOT, 'tools', rel_path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_ranks(worker: str, args, world_size: int = 2, timeout_s: float = 110) -> None:
    """Runs ``world_size`` processes of ``worker`` (``--rank r --world-size n --port p`` + ``args``) on one free
    port and fails with a rank's log when it does not exit cleanly within ``timeout_s``."""
    import subprocess
    import sys
    import time
    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS='1', MKL_NUM_THREADS='1')
    procs = [
        subprocess.Popen(
            [sys.executable, worker, '--rank',
             str(rank), '--world-size',
             str(world_size), '--port',
             str(port), *args],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True) for rank in range(world_size)
    ]
    deadline = time.monotonic() + timeout_s
    logs = []
    try:
        for proc in procs:
            logs.append(proc.communicate(timeout=max(1.0, deadline - time.monotonic()))[0])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for rank, (proc, log) in enumerate(zip(procs, logs)):
        assert proc.returncode == 0, f'rank {rank} exited with {proc.returncode}:\n{log[-6000:]}'
        assert 'terminate called' not in log, f'rank {rank} aborted at exit:\n{log[-3000:]}'


def start_rank(add_arguments, argv=None):
    """Starts one process of a distributed test worker: parses ``--rank``, ``--world-size``, ``--port``,
    ``--data-root``, ``--out`` and the worker's own options (``add_arguments(parser)``), joins the gloo process
    group on 127.0.0.1 with one thread, and registers mmseg's and the plugin's modules. The caller destroys the
    group (``torch.distributed.destroy_process_group``) when done.

    Returns:
        argparse.Namespace: The parsed arguments.
    """
    import argparse
    import datetime

    import torch.distributed as torch_dist
    p = argparse.ArgumentParser()
    p.add_argument('--rank', type=int, required=True)
    p.add_argument('--world-size', type=int, required=True)
    p.add_argument('--port', type=int, required=True)
    p.add_argument('--data-root', required=True)
    p.add_argument('--out', required=True)
    add_arguments(p)
    args = p.parse_args(argv)
    os.environ.update(
        RANK=str(args.rank),
        LOCAL_RANK=str(args.rank),
        WORLD_SIZE=str(args.world_size),
        MASTER_ADDR='127.0.0.1',
        MASTER_PORT=str(args.port))
    torch.set_num_threads(1)
    # imported before the group exists: modules that torch imports on the way (torch.distributed.optim,
    # torch.distributed.nn) bind `group.WORLD` as a default argument, and a group captured that way outlives
    # destroy_process_group, so its gloo threads are still running at interpreter shutdown (SIGABRT)
    import mmengine.runner  # noqa: F401

    from mmseg.utils import register_all_modules

    import mmseg_cbt  # noqa: F401
    register_all_modules(init_default_scope=True)
    torch_dist.init_process_group(
        'gloo', rank=args.rank, world_size=args.world_size, timeout=datetime.timedelta(seconds=90))
    return args


def native_thread_names() -> List[str]:
    """The names of this process's native threads (Linux ``/proc/self/task/*/comm``)."""
    names = []
    for tid in os.listdir('/proc/self/task'):
        try:
            with open(f'/proc/self/task/{tid}/comm') as f:
                names.append(f.read().strip())
        except OSError:  # the thread ended meanwhile
            pass
    return sorted(names)


def finish_rank() -> None:
    """Destroys the process group of a test worker and fails (exit 3) when gloo's threads survive it: threads
    still running at interpreter shutdown abort a finished process with "terminate called without an active
    exception", on some runs only."""
    import gc

    import torch.distributed as torch_dist
    gc.collect()  # objects in reference cycles that hold the group (a runner's DDP wrapper) go first
    torch_dist.destroy_process_group()
    left = [n for n in native_thread_names() if 'gloo' in n or 'tcpstore' in n]
    if left:
        print(f'process group threads alive after destroy_process_group: {left}', flush=True)
        sys.exit(3)


def usage_error(capsys, func, argv):
    """Runs ``func(argv)``, expects an argparse error (exit 2) and returns its message."""
    with pytest.raises(SystemExit) as e:
        func(argv)
    assert e.value.code == 2
    return capsys.readouterr().err
