"""The ADE20K path of the ViT-B/16 DToP config end to end, on a tiny ADE20K-layout dataset made here.

The dataset has ADEChallengeData2016's layout (``images/{training,validation}/*.jpg``,
``annotations/{training,validation}/*.png`` with 0 = "other" and 1..150 the classes, reduced to 255 / 0..149 by
``reduce_zero_label``). The config is the real ViT-B ATM config with the network shrunk through cfg overrides and
the pipelines scaled down; everything else (dataset class, ``reduce_zero_label``, slide inference, evaluator,
calibration hook, schedule type) is the config's own.
"""
import os
import os.path as osp

import numpy as np
import torch
from utils import ROOT

ADE_ATM_CONFIG = osp.join(ROOT, 'configs', 'ee_vit', 'ee-vit-b16-atm_8xb2-160k_ade20k-512x512.py')
WIDTH = 32


def _make_ade20k(root: str, n_train: int = 4, n_val: int = 2, seed: int = 0) -> None:
    """Tiny images with labels in 0..150 (0 = other); every split holds labels 0, 1 and 150."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    for split, n in (('training', n_train), ('validation', n_val)):
        os.makedirs(osp.join(root, 'images', split))
        os.makedirs(osp.join(root, 'annotations', split))
        for i in range(n):
            h, w = 48 + 8 * i, 80
            img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            lab = rng.integers(0, 151, (h // 8, w // 8), dtype=np.uint8).repeat(8, 0).repeat(8, 1)
            lab[:8, :8], lab[:8, 8:16], lab[8:16, :8] = 0, 1, 150
            name = f'ADE_{split[:5]}_{i:08d}'
            Image.fromarray(img).save(osp.join(root, 'images', split, name + '.jpg'))
            Image.fromarray(lab).save(osp.join(root, 'annotations', split, name + '.png'))


def _tiny_cfg(data_root: str, work_dir: str):
    from mmengine.config import Config
    cfg = Config.fromfile(ADE_ATM_CONFIG)
    cfg.work_dir = work_dir
    m = cfg.model
    m.pretrained = None
    m.backbone.update(
        img_size=(64, 64), embed_dims=WIDTH, num_layers=3, num_heads=2, exit_after=(0, 1, 2), drop_path_rate=0.0)
    for head in list(m.exit_heads) + [m.decode_head]:
        head.update(in_channels=WIDTH, channels=WIDTH, num_layers=1, num_heads=2, dropout=0.0)
    m.data_preprocessor.size = (64, 64)
    m.test_cfg.update(crop_size=(64, 64), stride=(43, 43))  # still slide inference, 2 x 2 crops per image
    for loader in (cfg.train_dataloader, cfg.val_dataloader, cfg.test_dataloader):
        loader.dataset.data_root = data_root
        loader.num_workers = 0
        loader.persistent_workers = False
    cfg.train_dataloader.batch_size = 2
    train_pipe = cfg.train_dataloader.dataset.pipeline
    train_pipe[2].scale = (128, 64)
    train_pipe[3].crop_size = (64, 64)
    for loader in (cfg.val_dataloader, cfg.test_dataloader):
        loader.dataset.pipeline[1].scale = (128, 64)
    cfg.train_cfg.update(max_iters=2, val_interval=2)
    cfg.param_scheduler = [dict(type='ConstantLR', factor=1.0, by_epoch=False, begin=0, end=2)]
    cfg.default_hooks.checkpoint.interval = 2
    cfg.default_hooks.logger.interval = 1
    cfg.custom_hooks[0].update(progress=False, plot=False)
    cfg.visualizer.vis_backends = [dict(type='LocalVisBackend')]
    return cfg


def test_ade20k_path_trains_calibrates_validates(tmp_path):
    """ADE20K layout with reduce_zero_label and 150 classes: 2 training iterations of the shrunk ViT-B ATM config,
    the CBT calibration hook (thresholds in the config's [0.9, 0.99]) and per-exit validation in slide mode."""
    from mmengine.runner import Runner
    data_root = str(tmp_path / 'ADEChallengeData2016')
    _make_ade20k(data_root)
    cfg = _tiny_cfg(data_root, str(tmp_path / 'work'))
    runner = Runner.from_cfg(cfg)
    assert runner.model.num_classes == 150 and runner.model.test_cfg.mode == 'slide'
    # reduce_zero_label: 0 ("other") -> 255, 1 -> 0, 150 -> 149
    sample = runner.val_dataloader.dataset[0]['data_samples']
    seg = sample.gt_sem_seg.data[0]
    assert int(seg[0, 0]) == 255 and int(seg[0, 8]) == 0 and int(seg[8, 0]) == 149
    assert int(seg[seg != 255].max()) <= 149
    runner.train()
    sd = torch.load(tmp_path / 'work' / 'iter_2.pth', map_location='cpu', weights_only=False)['state_dict']
    assert bool(sd['cbt_calibrated']) and sd['cbt_thresholds'].shape == (3, 150)
    t = sd['cbt_thresholds'][0]
    assert float(t.min()) >= 0.9 - 1e-6 and float(t.max()) <= 0.99 + 1e-6
    scalars = runner.message_hub.log_scalars
    for n in (1, 2, 3):
        assert f'train/exit{n}.loss_mask' in scalars and f'val/exit{n}.mIoU' in scalars
