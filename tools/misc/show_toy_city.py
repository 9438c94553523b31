"""Draws a grid of toy-city samples: image | colour-coded label (Cityscapes palette), with a legend.

    python tools/misc/show_toy_city.py                                  # renders samples in memory
    python tools/misc/show_toy_city.py --data-root data/toy_city --split val --num 3

Without ``--data-root`` the samples are rendered directly (same bytes as the generated files for the
same seed, split and size), so no dataset needs to exist. The PNG is palette-quantised to stay small.
"""
import argparse
import glob
import os
import os.path as osp
import sys
from typing import List, Optional, Tuple

import matplotlib

matplotlib.use('Agg')  # headless: never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

# The generator is a data tool (tools/dataset_converters/toy_city_gen), not part of the installed plugin.
sys.path.insert(0, osp.join(osp.dirname(osp.dirname(osp.abspath(__file__))), 'dataset_converters'))
import toy_city_gen as tcg  # noqa: E402


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    """Parses the command line.

    Args:
        argv: Arguments without the program name; None reads ``sys.argv``.

    Returns:
        The parsed arguments.
    """
    parser = argparse.ArgumentParser(description='Show toy-city samples with their labels.')
    parser.add_argument('--out', default='resources/toy_city_samples.png', help='output PNG')
    parser.add_argument('--data-root', default=None, help='read samples from this generated dataset')
    parser.add_argument('--split', default='train', choices=['train', 'val'])
    parser.add_argument('--num', type=int, default=4, help='number of samples (rows)')
    parser.add_argument('--start', type=int, default=0, help='index of the first sample')
    parser.add_argument('--seed', type=int, default=0, help='dataset seed (in-memory rendering)')
    parser.add_argument('--height', type=int, default=256, help='image height (in-memory rendering)')
    parser.add_argument('--width', type=int, default=512, help='image width (in-memory rendering)')
    parser.add_argument('--max-kb', type=float, default=400.0, help='size limit of the PNG in KiB')
    return parser.parse_args(argv)


def load_samples(args: argparse.Namespace) -> List[Tuple[str, np.ndarray, np.ndarray]]:
    """Returns ``(title, rgb image, label)`` for the requested samples.

    Args:
        args: Parsed command line.

    Returns:
        The samples in index order.
    """
    if args.num < 1:
        raise ValueError(f'--num must be >= 1, got {args.num}')
    samples = []
    if args.data_root:
        import cv2
        imgs = sorted(glob.glob(osp.join(args.data_root, tcg.IMG_DIR, args.split, '*', '*' + tcg.IMG_SUFFIX)))
        if not imgs:
            raise FileNotFoundError(f'no *{tcg.IMG_SUFFIX} under {osp.join(args.data_root, tcg.IMG_DIR, args.split)}')
        for path in imgs[args.start:args.start + args.num]:
            stem = osp.basename(path)[:-len(tcg.IMG_SUFFIX)]
            city = osp.basename(osp.dirname(path))
            ann = osp.join(args.data_root, tcg.ANN_DIR, args.split, city, stem + tcg.SEG_MAP_SUFFIX)
            img = cv2.imread(path, cv2.IMREAD_COLOR)[..., ::-1]
            lbl = cv2.imread(ann, cv2.IMREAD_UNCHANGED)
            samples.append((stem, img, lbl))
    else:
        for i in range(args.start, args.start + args.num):
            img, lbl = tcg.render_toy_city_sample(args.seed, args.split, i, args.height, args.width)
            samples.append((f'{args.split} #{i} (seed {args.seed})', img, lbl))
    return samples


def save_small_png(fig: 'plt.Figure', out: str, max_kb: float) -> int:
    """Saves a figure as a palette-quantised PNG, with fewer colours until it fits ``max_kb``.

    Args:
        fig: The figure.
        out: Output path.
        max_kb: Size limit in KiB (best effort: the smallest palette is used if it never fits).

    Returns:
        The size of the written file in bytes.
    """
    from PIL import Image
    fig.canvas.draw()
    rgb = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    pil = Image.fromarray(rgb)
    # The class colours are pinned in the palette: an adaptive palette alone merges similar ones
    # (traffic light / traffic sign) and the label panels would lie.
    fixed = [tuple(c) for c in tcg.TOY_CITY_PALETTE] + [(0, 0, 0), (255, 255, 255)]
    for colours in (256, 128, 64, 32):
        adaptive = pil.quantize(colors=colours - len(fixed), method=Image.Quantize.MEDIANCUT)
        palette = [v for c in fixed for v in c] + adaptive.getpalette()[:3 * (colours - len(fixed))]
        pal_img = Image.new('P', (1, 1))
        pal_img.putpalette(palette + [0] * (768 - len(palette)))
        pil.quantize(palette=pal_img, dither=Image.Dither.NONE).save(out, optimize=True)
        size = os.path.getsize(out)
        if size <= max_kb * 1024:
            break
    return size


def main(argv: Optional[List[str]] = None) -> int:
    """Draws the grid.

    Args:
        argv: Arguments without the program name; None reads ``sys.argv``.

    Returns:
        The process exit status.
    """
    args = parse_args(argv)
    samples = load_samples(args)
    h, w = samples[0][1].shape[:2]
    col_w = 4.6
    row_h = col_w * h / w
    fig, axes = plt.subplots(len(samples), 2, figsize=(2 * col_w, row_h * len(samples) + 1.3), dpi=100, squeeze=False)
    for row, (title, img, lbl) in enumerate(samples):
        axes[row, 0].imshow(img)
        axes[row, 0].set_title(title, fontsize=8)
        axes[row, 1].imshow(tcg.colorize_label(lbl))
        present = [tcg.TOY_CITY_CLASSES[c] for c in np.unique(lbl) if c < len(tcg.TOY_CITY_CLASSES)]
        axes[row, 1].set_title(f'label: {len(present)} classes', fontsize=8)
        for ax in axes[row]:
            ax.set_axis_off()
    handles = [
        Patch(color=np.asarray(c) / 255.0, label=name) for name, c in zip(tcg.TOY_CITY_CLASSES, tcg.TOY_CITY_PALETTE)
    ]
    handles.append(Patch(color=(0, 0, 0), label='ignore (255)'))
    fig.legend(handles=handles, loc='lower center', ncol=7, fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 1.1 / (row_h * len(samples) + 1.3), 1, 1), h_pad=0.4, w_pad=0.3)
    os.makedirs(osp.dirname(osp.abspath(args.out)), exist_ok=True)
    size = save_small_png(fig, args.out, args.max_kb)
    plt.close(fig)
    print(f'[show_toy_city] wrote {args.out} ({size / 1024:.0f} KiB, {len(samples)} samples)')
    return 0


if __name__ == '__main__':
    sys.exit(main())
