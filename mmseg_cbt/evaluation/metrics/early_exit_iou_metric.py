"""mIoU / aAcc / mAcc for every exit of an early-exit segmentor."""
import re
from collections import OrderedDict
from typing import Dict, List, Sequence

import numpy as np
import torch
from mmengine.logging import print_log

from mmseg.evaluation.metrics import IoUMetric
from mmseg.registry import METRICS

__all__ = ['EarlyExitIoUMetric']

_EXIT_KEY = re.compile(r'^exit(\d+)_pred_sem_seg$')
#: GFLOPs unit of the cost keys (the papers' 1024^3 MACs, as the report tool prints them).
_GFLOPS_UNIT = float(2**30)


@METRICS.register_module()
class EarlyExitIoUMetric(IoUMetric):
    """:class:`IoUMetric` evaluated at every exit.

    Reads the ``exit{n}_pred_sem_seg`` label maps that :class:`EarlyExitEncoderDecoder` puts into each data sample
    and reports ``exit{n}.mIoU``, ``exit{n}.aAcc``, ``exit{n}.mAcc`` (and the other ``iou_metrics``) for every
    exit. The final exit's numbers are also reported under the plain keys (``mIoU``, ...), with mmseg's per-class
    table, so ``save_best='mIoU'`` and every mmseg tool keep working. A data sample without per-exit predictions
    (a plain segmentor) counts as a one-exit model.

    Cost: when the samples carry ``exit_computed`` / ``exit_macs`` (the segmentor's ``predict`` adds them), every
    exit also gets ``exit{n}.computed`` (mean fraction, in %, of the positions that exit computed) and
    ``exit{n}.GFLOPs`` (mean cumulative multiply-adds per image up to that exit / 2^30, the masked count of
    :class:`mmseg_cbt.analysis.EarlyExitFlopCounter`, as ``tools/analysis_tools/miou_vs_gflops.py`` reports
    it); the final exit's ``GFLOPs`` also goes under the plain key, and a per-exit table is logged. So one test
    run gives the mIoU-versus-GFLOPs point of its stop rule.

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
            areas = [self.intersect_and_union(p.to(label), label, num_classes, self.ignore_index) for p in preds]
            self.results.append((areas, self._cost(data_sample, len(preds))))

    @staticmethod
    def _cost(data_sample: dict, num_exits: int):
        """(computed fractions, MACs) per exit of one image as float64 arrays, None where the sample has none."""
        out = []
        for key in ('exit_computed', 'exit_macs'):
            val = data_sample.get(key, None)
            if val is not None:
                val = torch.as_tensor(val).double().cpu().numpy().reshape(-1)
                if val.shape != (num_exits, ):
                    raise ValueError(f'{key} has {val.size} values for {num_exits} exits')
            out.append(val)
        return tuple(out)

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
        num_exits = {len(areas) for areas, _ in results}
        if len(num_exits) != 1:
            raise ValueError(f'images have different numbers of exits: {sorted(num_exits)}')
        n_exits = num_exits.pop()
        metrics: Dict[str, float] = OrderedDict()
        for n in range(n_exits):
            per_exit = [areas[n] for areas, _ in results]
            if n == n_exits - 1:
                final = super().compute_metrics(per_exit)  # logs mmseg's per-class table for the final exit
                metrics.update({f'exit{n + 1}.{k}': v for k, v in final.items()})
                metrics.update(final)
            else:
                metrics.update({f'exit{n + 1}.{k}': v for k, v in self._summary(per_exit).items()})
        self._add_cost(metrics, [cost for _, cost in results], n_exits)
        return metrics

    @staticmethod
    def _add_cost(metrics: Dict[str, float], costs: List[tuple], n_exits: int) -> None:
        """Adds the per-exit computed fractions and GFLOPs (when every image has them) and logs their table."""
        # a plain sequential mean over images, the same arithmetic as the report tool's average
        computed, macs = (None if any(
            c[i] is None for c in costs) else [sum(float(c[i][n]) for c in costs) / len(costs) for n in range(n_exits)]
                          for i in range(2))
        if computed is None and macs is None:
            return
        rows = []
        for n in range(n_exits):
            miou = metrics.get(f'exit{n + 1}.mIoU', None)
            row = [f'exit{n + 1}', '-' if miou is None else f'{miou:.2f}']
            if computed is not None:
                metrics[f'exit{n + 1}.computed'] = float(np.round(computed[n] * 100, 2))
                row.append(f'{computed[n] * 100:.2f}')
            if macs is not None:
                metrics[f'exit{n + 1}.GFLOPs'] = float(macs[n] / _GFLOPS_UNIT)
                row.append(f'{macs[n] / _GFLOPS_UNIT:.4f}')
            rows.append(row)
        if macs is not None:
            metrics['GFLOPs'] = metrics[f'exit{n_exits}.GFLOPs']
        head = ['exit', 'mIoU'
                ] + (['computed %'] if computed is not None else []) + (['GFLOPs (2^30)'] if macs is not None else [])
        widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
        lines = [' | '.join(h.rjust(w) for h, w in zip(r, widths)) for r in [head] + rows]
        print_log(
            'per-exit cost (mean per image; GFLOPs cumulative, masked count):\n' + '\n'.join(lines), logger='current')
