"""Measures which CPU algorithm of the masked conv (a variant of the direct algorithm, or gather + GEMM) is fastest
on this machine, per width::

    python tools/analysis_tools/tune_sparse_conv.py            # tune once (kept when a result exists)
    python tools/analysis_tools/tune_sparse_conv.py --force    # re-tune (after a torch or kernel update)
    python tools/analysis_tools/tune_sparse_conv.py --show     # print the stored result

The result goes to ``$MMSEG_CBT_CACHE_DIR/tune/<cpu>.json`` (default ``~/.cache/mmseg_cbt``), keyed by the CPU
model, the kernel's instruction set and the torch thread count (``--threads``: tune for the count you run with);
``MMSEG_CBT_CPU_ALGO=auto`` (the default) then follows it (see ``mmseg_cbt.ops.sparse_conv.tune``).
"""
import argparse
import json
import os.path as osp
import sys
from typing import List, Optional

sys.path.insert(0, osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__)))))
from mmseg_cbt.utils.cli import positive_int  # noqa: E402


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description='tune the masked conv CPU algorithm choice for this machine')
    p.add_argument('--force', action='store_true', help='measure again even if this machine has a result')
    p.add_argument('--show', action='store_true', help='print the stored result and exit')
    p.add_argument('--threads', type=positive_int, default=None, help='torch threads (default: torch default)')
    p.add_argument('--repeats', type=positive_int, default=7, help='timed rounds per algorithm (default 7)')
    p.add_argument('--active', type=float, default=0.5, help='active fraction of the masks, in (0, 1) (default 0.5)')
    args = p.parse_args(argv)
    if not 0.0 < args.active < 1.0:
        p.error(f'argument --active: must be in (0, 1), got {args.active}')
    return args


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    import torch

    from mmseg_cbt.ops.sparse_conv import tune
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    path = tune.tune_path()
    if args.show or (osp.exists(path) and not args.force):
        if not osp.exists(path):
            print(f'not tuned: no {path}', file=sys.stderr)
            return 1
        with open(path) as f:
            result = json.load(f)
        print(f'stored result ({path}; --force to measure again):')
    else:
        from mmseg_cbt.utils import tune_malloc
        tune_malloc()
        try:
            result = tune.measure_algorithms(active=args.active, repeats=args.repeats)
        except RuntimeError as e:
            print(f'tune_sparse_conv.py: {e}', file=sys.stderr)
            return 2
        print(f'measured and saved to {path}:')
    key = result['key']
    print(f"cpu {key['cpu']!r}, isa {key['isa']}, {key['threads']} threads, {result['active']:.0%} active")
    print(' cout      HxW    thin ms    wide ms   vtail ms    gemm ms  gemm/direct  choice')
    for cout, row in result['widths'].items():
        h, w = row['shape']
        cols = ' '.join(f'{row[f]:10.3f}' if f in row else f"{'-':>10}" for f in ('thin_ms', 'wide_ms', 'vtail_ms'))
        choice = tune.row_algorithm(row)
        print(f"{int(cout):5d} {h:4d}x{w:<4d} {cols} {row['gemm_ms']:10.3f} "
              f"{row['gemm_ms'] / row['direct_ms']:12.2f}  {choice}")
    return 0


if __name__ == '__main__':
    sys.exit(main())
