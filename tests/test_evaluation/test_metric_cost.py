"""EarlyExitIoUMetric's cost keys: computed % and GFLOPs (2^30) per exit, the per-image mean of the samples' counts."""
import pytest
import torch


def _sample(computed, macs):
    from mmengine.structures import PixelData

    from mmseg.structures import SegDataSample
    gt = torch.tensor([[0, 0, 1, 1]])
    s = SegDataSample(
        gt_sem_seg=PixelData(data=gt),
        pred_sem_seg=PixelData(data=gt),
        exit1_pred_sem_seg=PixelData(data=gt),
        exit2_pred_sem_seg=PixelData(data=gt))
    if computed is not None:
        s.set_data(dict(exit_computed=torch.tensor(computed, dtype=torch.float64)))
    if macs is not None:
        s.set_data(dict(exit_macs=torch.tensor(macs, dtype=torch.float64)))
    return s.to_dict()


def test_cost_keys_are_per_image_means():
    from mmseg_cbt.evaluation import EarlyExitIoUMetric
    metric = EarlyExitIoUMetric()
    metric.dataset_meta = dict(classes=('a', 'b'))
    g = 2.0**30
    metric.process({}, [_sample([1.0, 0.5], [1 * g, 3 * g]), _sample([1.0, 0.25], [1 * g, 2 * g])])
    res = metric.evaluate(2)
    assert res['exit1.computed'] == 100.0 and res['exit2.computed'] == 37.5
    assert res['exit1.GFLOPs'] == 1.0 and res['exit2.GFLOPs'] == res['GFLOPs'] == 2.5
    assert res['exit2.mIoU'] == res['mIoU'] == 100.0


def test_no_cost_keys_without_counts_and_shape_errors():
    from mmseg_cbt.evaluation import EarlyExitIoUMetric
    metric = EarlyExitIoUMetric()
    metric.dataset_meta = dict(classes=('a', 'b'))
    metric.process({}, [_sample(None, None)])
    res = metric.evaluate(1)
    assert 'GFLOPs' not in res and not any(k.endswith(('.computed', '.GFLOPs')) for k in res)
    # computed fractions without MACs (predict with test_cfg.exit_cost=False): only the computed keys
    metric.process({}, [_sample([1.0, 0.5], None)])
    res = metric.evaluate(1)
    assert res['exit2.computed'] == 50.0 and 'exit2.GFLOPs' not in res
    with pytest.raises(ValueError, match='exit_macs has 3 values for 2 exits'):
        metric.process({}, [_sample([1.0, 0.5], [1.0, 2.0, 3.0])])
