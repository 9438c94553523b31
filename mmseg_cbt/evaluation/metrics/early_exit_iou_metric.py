"""mIoU / aAcc / mAcc for every exit of an early-exit segmentor."""
import re
from collections import OrderedDict
from typing import Dict, List, Sequence

import numpy as np

from mmseg.evaluation.metrics import IoUMetric
from mmseg.registry import METRICS

__all__ = ['EarlyExitIoUMetric']

_EXIT_KEY = re.compile(r'^exit(\d+)_pred_sem_seg$')


@METRICS.register_module()
class EarlyExitIoUMetric(IoUMetric):
    """:class:`IoUMetric` evaluated at every exit.

    Reads the ``exit{n}_pred_sem_seg`` label maps that :class:`EarlyExitEncoderDecoder` puts into each data sample
    and reports ``exit{n}.mIoU``, ``exit{n}.aAcc``, ``exit{n}.mAcc`` (and the other ``iou_metrics``) for every
    exit. The final exit's numbers are also reported under the plain keys (``mIoU``, ...), with mmseg's per-class
    table, so ``save_best='mIoU'`` and every mmseg tool keep working. A data sample without per-exit predictions
    (a plain segmentor) counts as a one-exit model.

    Args:
        **kwargs: :class:`IoUMetric` arguments.
    """

    def process(self, data_batch: dict, data_samples: Sequence[dict]) -> None:
        """Stores, per image, one (intersect, union, pred area, label area) tuple per exit."""
        if self.format_only:
            return super().process(data_batch, data_samples)
        num_classes = len(self.dataset_meta['classes'])
        for data_sample in data_samples:
            keys = sorted((int(m.group(1)), k) for k in data_sample for m in [_EXIT_KEY.match(k)] if m)
            preds: List = [data_sample[k]['data'].squeeze() for _, k in keys]
            if not preds:
                preds = [data_sample['pred_sem_seg']['data'].squeeze()]
            label = data_sample['gt_sem_seg']['data'].squeeze().to(preds[-1])
            self.results.append(
                [self.intersect_and_union(p.to(label), label, num_classes, self.ignore_index) for p in preds])

    def _summary(self, results: list) -> Dict[str, float]:
        areas = tuple(zip(*results))
        ret = self.total_area_to_metrics(*(sum(a) for a in areas), self.metrics, self.nan_to_num, self.beta)
        out = OrderedDict()
        for key, val in ret.items():
            out[key if key == 'aAcc' else 'm' + key] = float(np.round(np.nanmean(val) * 100, 2))
        return out

    def compute_metrics(self, results: list) -> Dict[str, float]:
        """Per-exit summaries under ``exit{n}.`` keys, the final exit also under the plain keys."""
        if self.format_only:
            return super().compute_metrics(results)
        num_exits = {len(r) for r in results}
        if len(num_exits) != 1:
            raise ValueError(f'images have different numbers of exits: {sorted(num_exits)}')
        n_exits = num_exits.pop()
        metrics: Dict[str, float] = OrderedDict()
        for n in range(n_exits):
            per_exit = [r[n] for r in results]
            if n == n_exits - 1:
                final = super().compute_metrics(per_exit)  # logs mmseg's per-class table for the final exit
                metrics.update({f'exit{n + 1}.{k}': v for k, v in final.items()})
                metrics.update(final)
            else:
                metrics.update({f'exit{n + 1}.{k}': v for k, v in self._summary(per_exit).items()})
        return metrics
