"""Class-mean feature statistics (E2CM): hand-checked values, exact fixed point, bounds, labels on feature maps,
and a dense reference over the toy-city data."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from utils import build_tiny_model, randomise_bn, tiny_run_cfg

from mmseg_cbt.calibration import (FEATURE_FRAC_BITS, MAX_ABS_FEATURE, ClassFeatureStats, backbone_exit_features,
                                   gather_class_feature_stats, labels_on_feature_map)


def test_hand_checked_example():
    # 2 channels on a 2x2 map; labels: class 0 at (0,0), class 1 at (0,1) and (1,0), ignore at (1,1)
    feats = torch.tensor([[[[1.0, 2.0], [4.0, 9.0]], [[0.5, -1.0], [3.0, 7.0]]]])
    labels = torch.tensor([[[0, 1], [1, 255]]])
    stats = ClassFeatureStats(1, 3)
    stats.update(0, feats, labels)
    assert stats.counts.tolist() == [[1, 2, 0]]
    means = stats.class_means(0)
    assert means.tolist() == [[1.0, 0.5], [3.0, 1.0], [0.0, 0.0]]  # (2+4)/2, (-1+3)/2; class 2 has no pixel
    # fixed point: value * 2**16 exactly
    assert stats.fixed_point_sums(0)[1].tolist() == [6 * 2**FEATURE_FRAC_BITS, 2 * 2**FEATURE_FRAC_BITS]
    # within-class spread: class 0 has one pixel (0); class 1: ||(2,-1)-(3,1)||^2 + ||(4,3)-(3,1)||^2 = 5 + 5
    assert stats.within_class_sq_distance(0) == pytest.approx(10 / 3)
    assert stats.fitted_temperature(0) == pytest.approx(2 * (10 / 3) / 2)


def test_split_and_order_give_the_same_integers():
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(6, 5, 7, 9, generator=g) * 3
    labels = torch.randint(0, 4, (6, 7, 9), generator=g)
    labels[:, 0] = 255
    one = ClassFeatureStats(1, 4)
    one.update(0, feats, labels)
    parts = [ClassFeatureStats(1, 4) for _ in range(3)]
    for i, s in zip((4, 0, 2), parts):  # another order and split
        s.update(0, feats[i:i + 2], labels[i:i + 2])
    merged = parts[0].merge(parts[1]).merge(parts[2])
    assert torch.equal(merged.fixed_point_sums(0), one.fixed_point_sums(0))
    assert torch.equal(merged.counts, one.counts)
    assert torch.allclose(merged.sq_norms, one.sq_norms, rtol=1e-12)
    # means within 2**-17 of the float64 reference
    ref = torch.stack([feats.permute(0, 2, 3, 1)[labels == k].double().mean(0) for k in range(4)])
    assert (one.class_means(0) - ref).abs().max() <= 2.0**-(FEATURE_FRAC_BITS + 1)


def test_bad_input_is_rejected():
    stats = ClassFeatureStats(2, 3)
    stats.update(0, torch.zeros(1, 4, 2, 2), torch.zeros(1, 2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match='features have 5 channels, earlier batches had 4'):
        stats.update(0, torch.zeros(1, 5, 2, 2), torch.zeros(1, 2, 2, dtype=torch.long))
    big = torch.zeros(1, 4, 2, 2)
    big[0, 0, 0, 0] = MAX_ABS_FEATURE
    with pytest.raises(ValueError, match='exceeds the fixed-point bound'):
        stats.update(0, big, torch.zeros(1, 2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match='NaN or infinite'):
        stats.update(0, torch.full((1, 4, 2, 2), math.nan), torch.zeros(1, 2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match=r'labels have shape \(1, 3, 3\), expected \(1, 2, 2\)'):
        stats.update(0, torch.zeros(1, 4, 2, 2), torch.zeros(1, 3, 3, dtype=torch.long))
    with pytest.raises(RuntimeError, match='point 1 has no statistics yet'):
        stats.class_means(1)


def test_labels_on_feature_map_flip_pad_resize():
    label = torch.tensor([[[0, 1, 2, 3], [4, 5, 6, 7]]])  # (1, 2, 4) at ori_shape
    meta = dict(img_shape=(4, 8), padding_size=[0, 0, 0, 4], flip=True, flip_direction='horizontal')
    out = labels_on_feature_map(label, meta, (8, 8), (4, 4), 255)
    # flipped -> [[3,2,1,0],[7,6,5,4]], x2 nearest to 4x8, 4 rows of padding, then every second row/column
    assert out.tolist() == [[3, 2, 1, 0], [7, 6, 5, 4], [255] * 4, [255] * 4]


def test_gather_equals_a_dense_reference_on_toy_city(toy_cfg, tiny_city, tmp_path):
    """Class means of every exit point over the tiny toy-city split equal a direct float64 computation from the
    plain one-call HRNet forward (branches resized and concatenated here, labels resized with nearest)."""
    from mmseg_cbt.calibration.calibrate import build_calibration_dataloader
    model = build_tiny_model(toy_cfg)
    randomise_bn(model)
    model.eval()
    cfg = tiny_run_cfg(toy_cfg, tiny_city, tmp_path)
    loader = build_calibration_dataloader(cfg)
    stages = [1, 2, 3]
    stats = gather_class_feature_stats(
        model, loader, 3, lambda x: backbone_exit_features(model, x, stages), progress=False)
    k = model.num_classes
    sums = [None] * 3
    counts = torch.zeros(3, k, dtype=torch.int64)
    with torch.no_grad():
        for data in copy.deepcopy(loader):
            data = model.data_preprocessor(data, False)
            x = data['inputs']
            bb = model.backbone
            feats = [bb.layer1(bb.forward_stem(x))]
            outs = [feats]
            for stage in (2, 3):
                feats = bb.forward_stage(stage, feats)
                outs.append(feats)
            for p, branches in enumerate(outs):
                size = branches[0].shape[2:]
                f = torch.cat([branches[0]] +
                              [F.interpolate(b, size=size, mode='bilinear', align_corners=False) for b in branches[1:]],
                              1)
                gt = torch.stack([s.gt_sem_seg.data for s in data['data_samples']]).float()
                lab = F.interpolate(gt, size=size, mode='nearest')[:, 0].long()
                rows, lab = f.permute(0, 2, 3, 1).reshape(-1, f.shape[1]).double(), lab.reshape(-1)
                keep = lab < k
                s = torch.zeros(k, f.shape[1], dtype=torch.float64).index_add_(0, lab[keep], rows[keep])
                sums[p] = s if sums[p] is None else sums[p] + s
                counts[p] += torch.bincount(lab[keep], minlength=k)
    assert torch.equal(stats.counts, counts)
    assert int(counts.sum()) > 0
    for p in range(3):
        ref = sums[p] / counts[p].clamp(min=1).unsqueeze(1)
        assert torch.allclose(stats.class_means(p), ref, rtol=0, atol=2.0**-16)
    assert stats.channels == [64, 24, 56]
