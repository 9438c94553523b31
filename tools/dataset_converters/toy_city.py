"""Generates the built-in toy-city dataset (Cityscapes layout) for mmseg's ``CityscapesDataset``.

    python tools/dataset_converters/toy_city.py                       # data/toy_city, 200 train / 50 val
    python tools/dataset_converters/toy_city.py --out data/tc --num-train 20 --num-val 5 --force

The target is left alone when its ``toy_city_meta.json`` records a finished generation with the same parameters
and generator version (the data is deterministic, so regenerating would give the same bytes); ``--force``
regenerates. Regenerating deletes only the files the previous generation listed in its metadata, and an
interrupted generation is cleaned up by the next run. The generator itself is the package ``toy_city_gen`` next to
this script.
"""
import argparse
import os.path as osp
import sys
from typing import Callable, List, Optional

_HERE = osp.dirname(osp.abspath(__file__))
if _HERE not in sys.path:
    # Loaded by path (tests) rather than run as a script: the generator package sits next to this file.
    sys.path.insert(0, _HERE)

import toy_city_gen as tcg  # noqa: E402


def _int_in(lo: int, hi: Optional[int] = None) -> Callable[[str], int]:
    """An argparse ``type`` accepting integers in ``[lo, hi]`` (no upper bound when ``hi`` is None)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f'must be an integer, got {text!r}') from None
        if value < lo or (hi is not None and value > hi):
            allowed = f'>= {lo}' if hi is None else f'in [{lo}, {hi}]'
            raise argparse.ArgumentTypeError(f'must be {allowed}, got {value}')
        return value

    return parse


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    """Parses and range-checks the command line (argparse exits with status 2 naming a bad option).

    Args:
        argv: Arguments without the program name; None reads ``sys.argv``.

    Returns:
        The parsed arguments.
    """
    parser = argparse.ArgumentParser(description='Generate the toy-city street-scene dataset (Cityscapes layout).')
    parser.add_argument('--out', default='data/toy_city', help='dataset root to write')
    parser.add_argument(
        '--num-train',
        type=_int_in(1, tcg.MAX_IMAGES),
        default=200,
        help=f'number of training images (1..{tcg.MAX_IMAGES})')
    parser.add_argument(
        '--num-val',
        type=_int_in(0, tcg.MAX_IMAGES),
        default=50,
        help=f'number of validation images (0..{tcg.MAX_IMAGES})')
    size = _int_in(tcg.MIN_IMAGE_SIZE, tcg.MAX_IMAGE_SIZE)
    parser.add_argument(
        '--height', type=size, default=256, help=f'image height in pixels ({tcg.MIN_IMAGE_SIZE}..{tcg.MAX_IMAGE_SIZE})')
    parser.add_argument(
        '--width', type=size, default=512, help=f'image width in pixels ({tcg.MIN_IMAGE_SIZE}..{tcg.MAX_IMAGE_SIZE})')
    parser.add_argument('--seed', type=_int_in(0), default=0, help='dataset seed (>= 0)')
    parser.add_argument('--force', action='store_true', help='regenerate even if matching data exists')
    parser.add_argument('--no-progress', action='store_true', help='hide the progress bar')
    args = parser.parse_args(argv)
    if not args.out:
        parser.error('argument --out: must be a non-empty path')
    if osp.exists(args.out) and not osp.isdir(args.out):
        parser.error(f'argument --out: {args.out} exists and is not a folder')
    return args


def main(argv: Optional[List[str]] = None) -> int:
    """Runs the converter.

    Args:
        argv: Arguments without the program name; None reads ``sys.argv``.

    Returns:
        The process exit status.
    """
    args = parse_args(argv)
    params = dict(num_train=args.num_train, num_val=args.num_val, height=args.height, width=args.width, seed=args.seed)
    if not args.force and tcg.is_toy_city_up_to_date(args.out, params):
        print(f'[toy_city] {args.out} is up to date ({params}); use --force to regenerate')
        return 0
    try:
        summary = tcg.generate_toy_city(args.out, progress=not args.no_progress, **params)
    except (ValueError, OSError) as e:
        print(f'[toy_city] error: {e}', file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            f'\n[toy_city] interrupted: {args.out} is incomplete; run the same command again to finish it',
            file=sys.stderr)
        return 130
    print(f"\n[toy_city] wrote {summary['num_images']} images to {args.out} in {summary['elapsed_s']:.1f} s")
    frac = summary['class_pixel_fraction']['train']
    print('[toy_city] train pixel fractions: ' + ', '.join(f'{name} {frac[name] * 100:.2f}%'
                                                           for name in list(tcg.TOY_CITY_CLASSES) + ['ignore']))
    return 0


if __name__ == '__main__':
    sys.exit(main())
