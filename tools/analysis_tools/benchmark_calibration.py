"""Calibration cost versus one plain inference pass over the same data, measured side by side.

    python tools/analysis_tools/benchmark_calibration.py CONFIG CKPT [--max-batches N] [--repeats 3]

Both passes read the calibration loader (training split, test pipeline) and run the model on every image: the
inference pass is what ``tools/test.py`` does per image (``predict``: every exit, resized to the label size, argmax);
the calibration pass is :func:`gather_class_prob_stats` (every exit resized the same way, softmax, exact per-class
sums). The passes alternate ``--repeats`` times and the best time of each is compared, so machine noise affects
both alike. The data are read once into memory first so that decoding PNGs is not part of either time.
"""
import argparse
import os.path as osp
import sys
import time

import torch

sys.path.insert(0, osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__)))))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('config')
    p.add_argument('checkpoint')
    p.add_argument('--max-batches', type=int, default=50)
    p.add_argument('--repeats', type=int, default=3)
    args = p.parse_args(argv)
    from mmseg_cbt.calibration.calibrate import build_calibration_dataloader, gather_class_prob_stats
    from mmseg_cbt.utils.checkpoint import build_segmentor_strict
    cfg, model = build_segmentor_strict(args.config, args.checkpoint)
    model.test_cfg.exit_mode = 'dense'
    loader = build_calibration_dataloader(cfg, num_workers=0)
    batches = []
    for i, data in enumerate(loader):
        if i >= args.max_batches:
            break
        batches.append(data)

    def inference_pass():
        with torch.no_grad():
            for data in batches:
                d = model.data_preprocessor(data, False)
                model.predict(d['inputs'], d['data_samples'])

    def calibration_pass():
        gather_class_prob_stats(model, batches, progress=False)

    t_inf, t_cal = [], []
    for _ in range(args.repeats):
        for fn, store in ((inference_pass, t_inf), (calibration_pass, t_cal)):
            t0 = time.perf_counter()
            fn()
            store.append(time.perf_counter() - t0)
    res = dict(images=len(batches), inference_s=min(t_inf), calibration_s=min(t_cal), ratio=min(t_cal) / min(t_inf))
    print(f'{len(batches)} images, best of {args.repeats}: inference pass {res["inference_s"]:.2f} s, '
          f'calibration pass {res["calibration_s"]:.2f} s, ratio calibration/inference = {res["ratio"]:.3f}')
    return res


if __name__ == '__main__':
    main()
