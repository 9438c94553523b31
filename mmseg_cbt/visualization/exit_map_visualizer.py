"""mmseg visualiser that draws every exit of an early-exit prediction and where its pixels stopped."""
import re
from typing import Optional

import mmcv
import numpy as np
from mmengine.dist import master_only

from mmseg.registry import VISUALIZERS
from mmseg.structures import SegDataSample
from mmseg.visualization import SegLocalVisualizer

from .panels import draw_exit_panels

__all__ = ['EarlyExitSegLocalVisualizer', 'exit_predictions']

_EXIT_KEY = re.compile(r'^exit(\d+)_pred_sem_seg$')
#: GFLOPs unit of the picture's legend (the papers' 1024^3 MACs).
_GFLOPS_UNIT = float(2**30)


def exit_predictions(data_sample: SegDataSample) -> list:
    """The ``exit{n}_pred_sem_seg`` label maps of a sample in exit order (empty for a plain segmentor)."""
    keys = sorted((int(m.group(1)), k) for k in data_sample.keys() for m in [_EXIT_KEY.match(k)] if m)
    return [data_sample.get(k).data for _, k in keys]


@VISUALIZERS.register_module()
class EarlyExitSegLocalVisualizer(SegLocalVisualizer):
    """:class:`SegLocalVisualizer` that draws the exits of :class:`EarlyExitEncoderDecoder` predictions.

    For a sample with an ``exit_map`` (what the early-exit segmentor's ``predict`` adds) one picture holds the
    image, the ground truth (when present and ``draw_gt``), the exit map with a legend (share of pixels stopped
    at each exit, cumulative GFLOPs per exit when the sample has ``exit_macs``) and the prediction of every exit
    in the dataset palette (see :func:`mmseg_cbt.visualization.panels.draw_exit_panels`). Other samples are drawn
    by mmseg's visualiser unchanged. So ``tools/test.py CONFIG CKPT --show-dir DIR`` (the config sets
    ``visualizer=dict(type='EarlyExitSegLocalVisualizer', ...)``) writes one such PNG per drawn image.

    Args:
        name (str): Instance name (mmengine's ManagerMixin). Default: ``'visualizer'``.
        classes (list, optional): Class names (default: those of ``dataset_name``, else Cityscapes').
        palette (list, optional): RGB colour per class (default as ``classes``).
        dataset_name (str, optional): mmseg dataset whose classes and palette are the default.
        dpi (int): Pixels per inch of the picture (a panel is 4 inches wide). Default: 100.
        **kwargs: :class:`SegLocalVisualizer` arguments (``alpha`` is the predictions' opacity over the image).
    """

    def __init__(self,
                 name: str = 'visualizer',
                 classes: Optional[list] = None,
                 palette: Optional[list] = None,
                 dataset_name: Optional[str] = None,
                 dpi: int = 100,
                 **kwargs):
        super().__init__(name=name, **kwargs)
        # set here: mmseg 1.2.2's __init__ passes classes and palette to set_dataset_meta in swapped order
        self.set_dataset_meta(classes=classes, palette=palette, dataset_name=dataset_name)
        if not isinstance(dpi, int) or isinstance(dpi, bool) or not 10 <= dpi <= 1000:
            raise ValueError(f'EarlyExitSegLocalVisualizer: dpi must be an integer in [10, 1000], got {dpi!r}')
        self.dpi = dpi

    def draw_exits(self, image: np.ndarray, data_sample: SegDataSample, draw_gt: bool = True) -> np.ndarray:
        """The picture of one early-exit sample (RGB uint8), see :func:`draw_exit_panels`."""
        classes = self.dataset_meta.get('classes', None)
        palette = self.dataset_meta.get('palette', None)
        if classes is None or palette is None:
            raise ValueError('EarlyExitSegLocalVisualizer needs dataset_meta with classes and palette')
        preds = exit_predictions(data_sample) or [data_sample.pred_sem_seg.data]
        gt = data_sample.gt_sem_seg.data if draw_gt and 'gt_sem_seg' in data_sample else None
        macs = data_sample.get('exit_macs', None)
        gflops = [float(v) / _GFLOPS_UNIT for v in macs] if macs is not None else None
        mode = data_sample.metainfo.get('exit_mode', None)
        title = data_sample.metainfo.get('img_path', None)
        title = '' if title is None else str(title).replace('\\', '/').split('/')[-1]
        if mode is not None:
            title += f'  exit_mode={mode}'
        if gflops is not None:
            title += f'  {gflops[-1]:.3f} GFLOPs (2^30) in all'
        return draw_exit_panels(
            image,
            preds,
            data_sample.exit_map.data,
            classes,
            palette,
            gt=gt,
            title=title.strip() or None,
            exit_gflops=gflops,
            alpha=self.alpha,
            dpi=self.dpi)

    @master_only
    def add_datasample(self,
                       name: str,
                       image: np.ndarray,
                       data_sample: Optional[SegDataSample] = None,
                       draw_gt: bool = True,
                       draw_pred: bool = True,
                       show: bool = False,
                       wait_time: float = 0,
                       out_file: Optional[str] = None,
                       step: int = 0,
                       with_labels: Optional[bool] = True) -> None:
        """Draws one sample and shows it, writes it to ``out_file`` or hands it to the storage backends.

        Arguments as :meth:`SegLocalVisualizer.add_datasample`; an early-exit sample (one with ``exit_map``) drawn
        with ``draw_pred`` gets the exit picture, every other case mmseg's drawing.
        """
        if data_sample is None or not draw_pred or 'exit_map' not in data_sample:
            return super().add_datasample(name, image, data_sample, draw_gt, draw_pred, show, wait_time, out_file, step,
                                          with_labels)
        drawn = self.draw_exits(image, data_sample, draw_gt)
        if show:
            self.show(drawn, win_name=name, wait_time=wait_time)
        if out_file is not None:
            mmcv.imwrite(mmcv.rgb2bgr(drawn), out_file)
        else:
            self.add_image(name, drawn, step)
