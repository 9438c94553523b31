"""Exit maps, computed fractions and per-image MACs that ``EarlyExitEncoderDecoder.predict`` adds to its samples."""
import numpy as np
import pytest
import torch
from utils import build_tiny_model, randomise_bn

NUM_EXITS = 4


def _flipped_resized_batch(model, ori_hw=(64, 128)):
    """One image of ``ori_hw`` through a test pipeline that resizes it 2x and flips it horizontally."""
    from mmcv.transforms import Compose

    from mmseg.registry import TRANSFORMS  # noqa: F401 (registers mmseg's transforms)
    g = np.random.default_rng(0)
    img = (g.random(ori_hw + (3, )) * 255).astype(np.uint8)
    img[:, :ori_hw[1] // 2] //= 3  # a darker left half: different confidence on the two sides
    pipeline = Compose([
        dict(type='LoadImageFromNDArray'),
        dict(type='Resize', scale=(2 * ori_hw[1], 2 * ori_hw[0]), keep_ratio=False),
        dict(type='RandomFlip', prob=1.0, direction='horizontal'),
        dict(type='PackSegInputs')
    ])
    data = pipeline(dict(img=img))
    batch = model.data_preprocessor(dict(inputs=[data['inputs']], data_samples=[data['data_samples']]), False)
    meta = batch['data_samples'][0].metainfo
    assert meta['flip'] and meta['flip_direction'] == 'horizontal'
    assert tuple(meta['ori_shape']) == ori_hw and tuple(meta['img_shape']) == (2 * ori_hw[0], 2 * ori_hw[1])
    return batch


def _hand_set_thresholds(model, inputs):
    """Per-exit CBT thresholds (one value for every class) at quantiles of the dense max softmax, so that about a
    third of the pixels stop after exit 1, a third of the rest after exit 2 and a third of that after exit 3."""
    with torch.no_grad():
        dense = model.forward_exits(inputs, exit_mode='dense', feature_mask='none')
    thresholds = torch.ones(NUM_EXITS, model.num_classes)
    remaining = torch.ones(dense[0].shape[0:1] + dense[0].shape[2:], dtype=torch.bool)
    for n in range(NUM_EXITS - 1):
        conf = dense[n].softmax(dim=1).max(dim=1).values
        t = float(torch.quantile(conf[remaining], 2 / 3))
        thresholds[n] = t
        remaining &= ~(conf > t)
    model.set_cbt_calibration(thresholds, alpha=0.0, beta=1.0)
    return dense


def test_exit_map_reads_the_stop_masks_at_the_original_size_after_resize_and_flip(toy_cfg):
    model = build_tiny_model(toy_cfg, exit_mode='cbt', feature_mask='none').eval()
    randomise_bn(model)
    batch = _flipped_resized_batch(model)
    inputs = batch['inputs']
    dense = _hand_set_thresholds(model, inputs)
    # the reference: the first exit whose stop mask holds a pixel (features stay dense with feature_mask='none',
    # so every exit's logits at a still-active pixel are the dense ones); never stopped -> the last exit
    expected = torch.full(dense[0].shape[0:1] + dense[0].shape[2:], NUM_EXITS, dtype=torch.long)
    for n in reversed(range(NUM_EXITS - 1)):
        expected[model.stop_mask(dense[n], n, 'cbt')] = n + 1
    expected = expected[0]  # (32, 64): the 1/4 grid of the 128x256 input
    assert set(expected.unique().tolist()) == {1, 2, 3, 4}
    with torch.no_grad():
        out = model.predict(inputs, batch['data_samples'])[0]
    emap = out.exit_map.data
    assert emap.dtype == torch.long and tuple(emap.shape) == (1, 64, 128) == tuple(out.pred_sem_seg.data.shape)
    # original pixel (y, x) was resized 2x then flipped: it sits on grid cell (y // 2, 63 - x // 2)
    ys, xs = torch.meshgrid(torch.arange(64), torch.arange(128), indexing='ij')
    assert torch.equal(emap[0], expected[ys // 2, 63 - xs // 2])
    assert out.metainfo['exit_mode'] == 'cbt'
    # fractions computed per exit: the share of grid positions that reached the exit
    want = torch.tensor([(expected >= n + 1).double().mean() for n in range(NUM_EXITS)], dtype=torch.float64)
    assert torch.allclose(out.exit_computed, want, rtol=0, atol=1e-12)


def test_exit_costs_are_the_flop_counters_on_the_same_masks(toy_cfg):
    from utils import demo_batch

    from mmseg_cbt.analysis import count_flops
    model = build_tiny_model(toy_cfg, exit_mode='global', global_threshold=0.3, feature_mask='simulate').eval()
    randomise_bn(model)
    imgs, samples = demo_batch(model.num_classes, n=2, h=64, w=96)
    with torch.no_grad():
        outs = model.predict(imgs, samples)
        _, actives = model.forward_exits(imgs, return_active=True)
    ref = count_flops(model, imgs, actives=actives)
    for i, ds in enumerate(outs):
        assert ds.exit_macs.tolist() == [float(e.macs_per_image[i]) for e in ref.exits]
        assert 0 < ds.exit_macs[0] < ds.exit_macs[-1]
        grid = [1.0] + [float(a[i].double().mean()) for a in actives[1:]]
        assert ds.exit_computed.tolist() == grid
        counts = torch.bincount(ds.exit_map.data.flatten(), minlength=NUM_EXITS + 1)
        assert counts[0] == 0 and counts[1:].sum() == 64 * 96
    assert 0 < float(outs[0].exit_computed[-1]) < 1  # some pixels stopped, some did not
    # dense: every pixel reaches the last exit; without data samples the map has the input's size
    model.test_cfg.exit_mode = 'dense'
    with torch.no_grad():
        out = model.predict(imgs)[0]
    assert torch.equal(out.exit_map.data, torch.full((1, 64, 96), NUM_EXITS))
    assert out.exit_computed.tolist() == [1.0] * NUM_EXITS
    model.test_cfg.exit_cost = False
    with torch.no_grad():
        assert 'exit_macs' not in model.predict(imgs)[0]


def test_slide_inference_pastes_the_crops_exit_maps(toy_cfg):
    from mmseg_cbt.models.segmentors.exit_maps import paste_exit_maps
    model = build_tiny_model(toy_cfg, exit_mode='global', global_threshold=0.3, feature_mask='simulate').eval()
    randomise_bn(model)
    model.test_cfg.update(mode='slide', crop_size=(64, 64), stride=(32, 32))
    imgs = torch.randn(1, 3, 64, 128, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out = model.predict(imgs)[0]
        crops = []
        for x1 in (0, 32, 64):
            _, actives = model.forward_exits(imgs[:, :, :, x1:x1 + 64], return_active=True)
            crops.append(((0, 64, x1, x1 + 64), actives))
    per_crop = [paste_exit_maps([c], 1, (64, 128), imgs.device)[0, 0, :, c[0][2]:c[0][3]] for c in crops]
    want = torch.zeros(64, 128, dtype=torch.long)
    for (box, _), m in zip(crops, per_crop):
        want[:, box[2]:box[3]] = torch.maximum(want[:, box[2]:box[3]], m)
    assert torch.equal(out.exit_map.data[0], want)  # overlaps: the latest exit any crop computed the pixel at
    # the cost of slide inference is the sum over its crops (each is a full run of the network)
    from mmseg_cbt.analysis import count_flops
    per_crop_macs = [count_flops(model, imgs[:, :, :, b[2]:b[3]], actives=a) for b, a in crops]
    for n in range(NUM_EXITS):
        assert float(out.exit_macs[n]) == pytest.approx(sum(r.exits[n].macs for r in per_crop_macs), rel=1e-12)
    want_computed = [
        np.mean([1.0 if a is None else float(a.double().mean()) for _, acts in crops for a in [acts[n]]])
        for n in range(NUM_EXITS)
    ]
    assert out.exit_computed.tolist() == pytest.approx(want_computed, rel=1e-12)
