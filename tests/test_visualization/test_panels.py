"""The exit picture: panels where they belong, exit colours where the exit map says, the visualiser's fallbacks."""
import numpy as np
import pytest
import torch

CLASSES = ('a', 'b', 'c')
PALETTE = [[255, 0, 0], [0, 255, 0], [0, 0, 255]]


def _sample(h=32, w=64, with_gt=True):
    from mmengine.structures import PixelData

    from mmseg.structures import SegDataSample
    emap = torch.full((1, h, w), 4, dtype=torch.long)
    emap[:, :, :w // 4] = 1  # left quarter stopped at exit 1, the rest never stopped
    preds = [torch.full((1, h, w), n % 3, dtype=torch.long) for n in range(4)]
    s = SegDataSample(pred_sem_seg=PixelData(data=preds[-1]), exit_map=PixelData(data=emap))
    for n, p in enumerate(preds):
        s.set_data({f'exit{n + 1}_pred_sem_seg': PixelData(data=p)})
    if with_gt:
        s.gt_sem_seg = PixelData(data=torch.zeros((1, h, w), dtype=torch.long))
    s.set_data(dict(exit_macs=torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64) * 2**30))
    s.set_metainfo(dict(img_path='/x/img_0.png', exit_mode='cbt'))
    return s


def _find(picture, rgb):
    """(ys, xs) of the picture's pixels of exactly this colour."""
    return np.nonzero(np.all(picture == np.asarray(rgb, dtype=np.uint8), axis=-1))


def test_exit_map_panel_shows_each_exit_where_the_map_says():
    from mmseg_cbt.visualization import EarlyExitSegLocalVisualizer, exit_colours
    vis = EarlyExitSegLocalVisualizer(name='test_panels', classes=list(CLASSES), palette=PALETTE)
    image = np.full((32, 64, 3), 128, dtype=np.uint8)
    picture = vis.draw_exits(image, _sample())
    assert picture.dtype == np.uint8 and picture.shape[1] == 4 * 4 * 100  # 4 columns of 4 inches at 100 dpi
    col = np.rint(exit_colours(4) * 255).astype(np.uint8)
    # exit map panel: third of the top row (image, ground truth, exit map, legend)
    panel_w = picture.shape[1] // 4
    top = picture[:picture.shape[0] // 2]
    ys1, xs1 = _find(top[:, 2 * panel_w:3 * panel_w], col[0])
    ys4, xs4 = _find(top[:, 2 * panel_w:3 * panel_w], col[3])
    assert len(xs1) > 0 and len(xs4) > 3 * len(xs1) * 0.9  # a quarter of exit 1, three quarters of exit 4
    assert xs1.max() < xs4.min()  # exit 1 on the left, exit 4 on the right
    # the legend panel shows the colours of all four exits (patches), also those of no pixel
    for c in col:
        assert len(_find(top[:, 3 * panel_w:], c)[0]) > 0
    # bottom row: every exit's prediction in the palette over the grey image (alpha 0.8)
    bottom = picture[picture.shape[0] // 2:]
    for n in range(4):
        blended = (np.float32(128) * 0.2 + np.asarray(PALETTE[n % 3], np.float32) * 0.8).astype(np.uint8)
        assert len(_find(bottom[:, n * panel_w:(n + 1) * panel_w], blended)[0]) > 1000


def test_without_gt_and_for_plain_samples():
    from mmengine.structures import PixelData

    from mmseg.structures import SegDataSample

    from mmseg_cbt.visualization import EarlyExitSegLocalVisualizer, draw_exit_panels
    vis = EarlyExitSegLocalVisualizer(name='test_panels_plain', classes=list(CLASSES), palette=PALETTE)
    image = np.zeros((32, 64, 3), dtype=np.uint8)
    with_gt = vis.draw_exits(image, _sample())
    without = vis.draw_exits(image, _sample(with_gt=False))
    assert with_gt.shape == without.shape and not np.array_equal(with_gt, without)
    # a sample of a plain segmentor (no exit map) goes to mmseg's drawing: GT and prediction side by side
    plain = SegDataSample(pred_sem_seg=PixelData(data=torch.zeros((1, 32, 64), dtype=torch.long)))
    drawn = []
    vis.add_image = lambda name, img, step=0: drawn.append(img)
    vis.add_datasample('plain', image, plain)
    vis.add_datasample('ee', image, _sample())
    assert drawn[0].shape == (32, 64, 3) and drawn[1].shape == with_gt.shape
    with pytest.raises(ValueError, match=r'exit map values must lie in 1..4, got 0..4'):
        draw_exit_panels(image, [torch.zeros(32, 64)] * 4, torch.arange(5).repeat(32, 13)[:, :64], CLASSES, PALETTE)
    with pytest.raises(ValueError, match='dpi must be an integer in'):
        EarlyExitSegLocalVisualizer(name='test_panels_dpi', dpi=0)
