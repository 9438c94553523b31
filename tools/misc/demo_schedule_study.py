"""Trains the toy-city demo model under a few schedules and tabulates what each reaches (the demo-model study)::

    python tools/misc/demo_schedule_study.py --variants base ohem wide --out-dir work_dirs/schedule_study

Every variant is the tiny test config (``configs/ee_hrnet/ee-fcn_hr-tiny_1xb4-1k_toycity-256x512.py``, the demo
model before this study) with a few fields changed (listed by ``--list``), trained with mmseg's ``tools/train.py``
in its own work dir and validated once at the end (the CBT calibration hook is switched off: it does not change the
dense numbers). The table gives the training minutes, every exit's mIoU and the final exit's per-class IoU, read
from the run's own log; classes that cover at least ``--min-share`` of the val pixels are checked against
``--min-iou``. A finished variant is not
trained again (its log is read), so a study can be extended one variant at a time.
"""
import argparse
import copy
import json
import os
import os.path as osp
import re
import subprocess
import sys
import time
from typing import Dict, List, Optional

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
BASE = osp.join(ROOT, 'configs/ee_hrnet/ee-fcn_hr-tiny_1xb4-1k_toycity-256x512.py')


def _widths(widths: List[int]) -> dict:
    """Backbone, exit and final-head fields of HRNet branch widths ``widths`` (4 branches)."""
    w = list(widths)
    return {
        'model.backbone.extra.stage1.num_channels': (2 * w[0], ),
        'model.backbone.extra.stage2.num_channels': tuple(w[:2]),
        'model.backbone.extra.stage3.num_channels': tuple(w[:3]),
        'model.backbone.extra.stage4.num_channels': tuple(w),
        'model.exit_heads.0.in_channels': [8 * w[0]],
        'model.exit_heads.1.in_channels': w[:2],
        'model.exit_heads.2.in_channels': w[:3],
        'model.decode_head.in_channels': w,
        'model.decode_head.channels': sum(w),
    }


def _ohem(thresh: float = 0.7, min_kept: int = 50000) -> dict:
    sampler = dict(type='OHEMPixelSampler', thresh=thresh, min_kept=min_kept)
    out = {f'model.exit_heads.{i}.sampler': sampler for i in range(3)}
    out['model.decode_head.sampler'] = sampler
    return out


def _iters(n: int, lr: Optional[float] = None) -> dict:
    out = {
        'train_cfg.max_iters': n,
        'train_cfg.val_interval': n,
        'default_hooks.checkpoint.interval': n,
        'param_scheduler.1.end': n
    }
    if lr is not None:
        out['optim_wrapper.optimizer.lr'] = lr
    return out


# name -> (what it changes, cfg fields)
VARIANTS: Dict[str, tuple] = {
    'base': ('the demo config as it was: widths 8/16/32/64, 1000 it, AdamW 2e-3', {}),
    'lr4e-3': ('AdamW lr 4e-3', _iters(1000, 4e-3)),
    'ohem': ('OHEM pixel sampler (thresh 0.7, min_kept 50k) at every exit', _ohem()),
    'wide': ('widths 16/32/64/128', _widths([16, 32, 64, 128])),
    '2k': ('2000 it', _iters(2000)),
    'wide-ohem': ('widths 16/32/64/128 + OHEM', {
        **_widths([16, 32, 64, 128]),
        **_ohem()
    }),
    'wide-ohem-2k': ('widths 16/32/64/128 + OHEM, 2000 it', {
        **_widths([16, 32, 64, 128]),
        **_ohem(),
        **_iters(2000)
    }),
    'ohem-2k-lr4e-3': ('OHEM, 2000 it, lr 4e-3', {
        **_ohem(),
        **_iters(2000, 4e-3)
    }),
    'wide-2k': ('widths 16/32/64/128, 2000 it', {
        **_widths([16, 32, 64, 128]),
        **_iters(2000)
    }),
    'wide-lr4e-3': ('widths 16/32/64/128, AdamW lr 4e-3 (the shipped demo config)', {
        **_widths([16, 32, 64, 128]),
        **_iters(1000, 4e-3)
    }),
}


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description='train the toy-city demo model under several schedules and compare')
    p.add_argument('--variants', nargs='+', default=['base'], help=f'variants to run, of: {", ".join(VARIANTS)}')
    p.add_argument('--out-dir', default='work_dirs/schedule_study')
    p.add_argument('--min-share', type=float, default=0.005, help='class share of val pixels checked (default 0.5%%)')
    p.add_argument('--min-iou', type=float, default=10.0, help='IoU (%%) such classes must reach (default 10)')
    p.add_argument('--list', action='store_true', help='list the variants and exit')
    args = p.parse_args(argv)
    bad = [v for v in args.variants if v not in VARIANTS]
    if bad:
        p.error(f'argument --variants: unknown {bad}; allowed: {sorted(VARIANTS)}')
    if not 0.0 <= args.min_share < 1.0:
        p.error(f'argument --min-share: must be in [0, 1), got {args.min_share}')
    if not 0.0 <= args.min_iou <= 100.0:
        p.error(f'argument --min-iou: must be in [0, 100], got {args.min_iou}')
    return args


def _write_config(name: str, work_dir: str) -> str:
    from mmengine.config import Config
    cfg = Config.fromfile(BASE)
    cfg.merge_from_dict(copy.deepcopy(VARIANTS[name][1]))
    cfg.custom_hooks = []  # calibration does not change the dense numbers compared here
    path = osp.join(work_dir, f'{name}.py')
    cfg.dump(path)
    return path


def _read_log(work_dir: str) -> Optional[dict]:
    """Per-exit mIoU and the final per-class IoU table from the newest run log under ``work_dir``."""
    logs = sorted(
        osp.join(dp, f) for dp, _, fs in os.walk(work_dir) for f in fs if re.fullmatch(r'\d{8}_\d{6}\.log', f))
    for log in reversed(logs):
        text = open(log).read()
        exits = {int(m.group(1)): float(m.group(2)) for m in re.finditer(r'exit(\d+)\.mIoU: ([\d.]+)', text)}
        classes = {
            m.group(1).strip(): float(m.group(2))
            for m in re.finditer(r'^\|\s*([A-Za-z][\w ]*?)\s*\|\s*([\d.]+|nan)\s*\|', text, re.M)
        }
        if exits:
            return dict(log=log, exits=exits, classes=classes)
    return None


def val_class_shares(names: List[str], root: str = osp.join(ROOT, 'data/toy_city/gtFine/val')) -> Dict[str, float]:
    """Share (%) of the val label pixels (ignore included in the total) per class name, in train-id order."""
    import glob

    import cv2
    import numpy as np
    counts = np.zeros(256, np.int64)
    for f in sorted(glob.glob(osp.join(root, '*', '*_labelTrainIds.png'))):
        counts += np.bincount(cv2.imread(f, cv2.IMREAD_UNCHANGED).ravel(), minlength=256)
    total = max(int(counts.sum()), 1)
    return {n: 100.0 * counts[i] / total for i, n in enumerate(names)}


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    if args.list:
        for k, (what, _) in VARIANTS.items():
            print(f'{k:16s} {what}')
        return 0
    os.makedirs(args.out_dir, exist_ok=True)
    summary_path = osp.join(args.out_dir, 'summary.json')
    summary = json.load(open(summary_path)) if osp.exists(summary_path) else {}
    for name in args.variants:
        work_dir = osp.join(args.out_dir, name)
        if name in summary and _read_log(work_dir):
            print(f'[{name}] done before, reading its log')
            continue
        os.makedirs(work_dir, exist_ok=True)
        cfg_path = _write_config(name, work_dir)
        print(f'[{name}] {VARIANTS[name][0]}: training ({cfg_path})', flush=True)
        start = time.time()
        with open(osp.join(work_dir, 'stdout.txt'), 'w') as out:
            rc = subprocess.call(
                [sys.executable, osp.join(ROOT, 'tools/train.py'), cfg_path, '--work-dir', work_dir],
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=ROOT)
        if rc != 0:
            print(f'[{name}] training failed (rc {rc}); see {work_dir}/stdout.txt', file=sys.stderr)
            return rc
        summary[name] = dict(minutes=(time.time() - start) / 60)
        json.dump(summary, open(summary_path, 'w'), indent=1)
    rows = []
    for name in args.variants:
        res = _read_log(osp.join(args.out_dir, name))
        if res is None:
            continue
        summary[name].update(res)
        rows.append((name, summary[name]))
    json.dump(summary, open(summary_path, 'w'), indent=1)
    print('| variant | train min | ' + ' | '.join(f'exit {n}' for n in sorted(rows[0][1]['exits'])) + ' |')
    for name, r in rows:
        print(f'| {name} | {r["minutes"]:.1f} | ' + ' | '.join(f'{r["exits"][n]:.2f}'
                                                               for n in sorted(r['exits'])) + ' |')
    print('\nfinal-exit IoU per class:')
    classes = list(rows[0][1]['classes'])
    shares = val_class_shares(classes)
    print('| class | val share % | ' + ' | '.join(n for n, _ in rows) + ' |')
    for c in classes:
        print(f'| {c} | {shares[c]:.2f} | ' + ' | '.join(f'{r["classes"].get(c, float("nan")):.2f}'
                                                         for _, r in rows) + ' |')
    checked = [c for c in classes if shares[c] >= 100 * args.min_share]
    for name, r in rows:
        low = [c for c in checked if not r['classes'].get(c, 0.0) > args.min_iou]
        print(f'{name}: final mIoU {r["exits"][max(r["exits"])]:.2f}; classes with >= {100 * args.min_share:g} % of '
              f'the val pixels at or below {args.min_iou:g} IoU: {", ".join(low) if low else "none"}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
