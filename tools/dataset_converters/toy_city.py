"""Generates the built-in toy-city dataset (Cityscapes layout) for mmseg's ``CityscapesDataset``.

    python tools/dataset_converters/toy_city.py                       # data/toy_city, 200 train / 50 val
    python tools/dataset_converters/toy_city.py --out data/tc --num-train 20 --num-val 5 --force

The target is left alone when its ``toy_city_meta.json`` records the same parameters and generator
version (the data is deterministic, so regenerating would give the same bytes); ``--force`` regenerates.
"""
import argparse
import os.path as osp
import sys
from typing import Any, Dict, List, Optional

try:
    import mmseg_cbt  # noqa: F401
except ImportError:
    # Not installed yet (before ``pip install -e .``): use the checkout this script lives in.
    sys.path.insert(0, osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__)))))

from mmseg_cbt.datasets.toy_city import (ANN_DIR, GENERATOR_VERSION, IMG_DIR, IMG_SUFFIX, SEG_MAP_SUFFIX,  # noqa: E402
                                         TOY_CITY_CLASSES, generate_toy_city, read_toy_city_meta)


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    """Parses the command line.

    Args:
        argv: Arguments without the program name; None reads ``sys.argv``.

    Returns:
        The parsed arguments.
    """
    parser = argparse.ArgumentParser(description='Generate the toy-city street-scene dataset (Cityscapes layout).')
    parser.add_argument('--out', default='data/toy_city', help='dataset root to write')
    parser.add_argument('--num-train', type=int, default=200, help='number of training images')
    parser.add_argument('--num-val', type=int, default=50, help='number of validation images')
    parser.add_argument('--height', type=int, default=256, help='image height in pixels')
    parser.add_argument('--width', type=int, default=512, help='image width in pixels')
    parser.add_argument('--seed', type=int, default=0, help='dataset seed')
    parser.add_argument('--force', action='store_true', help='regenerate even if matching data exists')
    parser.add_argument('--no-progress', action='store_true', help='hide the progress bar')
    return parser.parse_args(argv)


def _count_files(root: str, sub: str, split: str, suffix: str) -> int:
    """Counts the files with ``suffix`` under ``root/sub/split`` (recursively)."""
    import glob
    return len(glob.glob(osp.join(root, sub, split, '*', '*' + suffix)))


def is_up_to_date(out_dir: str, params: Dict[str, Any]) -> bool:
    """Tells whether ``out_dir`` already holds a complete toy city made with ``params``.

    Args:
        out_dir: Dataset root.
        params: ``num_train``, ``num_val``, ``height``, ``width``, ``seed``.

    Returns:
        True when the metadata matches the parameters and generator version and every image and label
        file is present.
    """
    meta = read_toy_city_meta(out_dir)
    if meta is None or meta.get('version') != GENERATOR_VERSION or meta.get('params') != params:
        return False
    for split, n in (('train', params['num_train']), ('val', params['num_val'])):
        if (_count_files(out_dir, IMG_DIR, split, IMG_SUFFIX) != n
                or _count_files(out_dir, ANN_DIR, split, SEG_MAP_SUFFIX) != n):
            return False
    return True


def main(argv: Optional[List[str]] = None) -> int:
    """Runs the converter.

    Args:
        argv: Arguments without the program name; None reads ``sys.argv``.

    Returns:
        The process exit status.
    """
    args = parse_args(argv)
    params = dict(num_train=args.num_train, num_val=args.num_val, height=args.height, width=args.width,
                  seed=args.seed)
    if not args.force and is_up_to_date(args.out, params):
        print(f'[toy_city] {args.out} is up to date ({params}); use --force to regenerate')
        return 0
    try:
        summary = generate_toy_city(args.out, progress=not args.no_progress, **params)
    except (ValueError, FileExistsError) as e:
        print(f'[toy_city] error: {e}', file=sys.stderr)
        return 2
    print(f"\n[toy_city] wrote {summary['num_images']} images to {args.out} in {summary['elapsed_s']:.1f} s")
    frac = summary['class_pixel_fraction']['train']
    print('[toy_city] train pixel fractions: ' +
          ', '.join(f'{name} {frac[name] * 100:.2f}%' for name in list(TOY_CITY_CLASSES) + ['ignore']))
    return 0


if __name__ == '__main__':
    sys.exit(main())
