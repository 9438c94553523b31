"""Exit maps of CBT and ADP-C at the same beta on one image, side by side (the README's picture)::

    python tools/misc/exit_map_pair.py IMG CONFIG CKPT [--beta 0.998] --out-file pair.png

CBT uses the thresholds stored in the checkpoint (calibrated into [alpha, beta]); ADP-C uses the one global
threshold ``beta`` on the max softmax. Both run with the config's ``test_cfg`` otherwise (feature mask, fill).
Prints each rule's share of pixels stopped per exit and the image's GFLOPs (2^30).
"""
import argparse
import os.path as osp
import sys
from typing import List, Optional

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))
from image_demo import cost_table, load_model  # noqa: E402

sys.path.insert(0, osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__)))))
from mmseg_cbt.utils.cli import positive_int  # noqa: E402


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description='CBT and ADP-C exit maps of one image, side by side')
    p.add_argument('img')
    p.add_argument('config')
    p.add_argument('checkpoint')
    p.add_argument('--beta', type=float, default=None, help="ADP-C's threshold (default: the checkpoint's CBT beta)")
    p.add_argument('--out-file', required=True, help='PNG to write')
    p.add_argument('--device', default='cpu')
    p.add_argument('--dpi', type=positive_int, default=60, help='pixels per inch (a panel is 4 inches wide)')
    args = p.parse_args(argv)
    for what in ('img', 'config', 'checkpoint'):
        if not osp.isfile(getattr(args, what)):
            p.error(f'{what} not found: {getattr(args, what)}')
    if args.beta is not None and not 0.0 <= args.beta <= 1.0:
        p.error(f'--beta must be in [0, 1], got {args.beta}')
    if not args.dpi <= 1000:
        p.error(f'--dpi must be <= 1000, got {args.dpi}')
    return args


def main(argv: Optional[List[str]] = None) -> list:
    """Writes the picture; returns the two predictions (CBT, ADP-C)."""
    args = parse_args(argv)
    import cv2
    import mmcv

    from mmseg.apis import inference_model

    from mmseg_cbt.utils.io import atomic_path
    from mmseg_cbt.visualization import draw_exit_map_comparison
    model = load_model(args.config, args.checkpoint, args.device, 'cbt')
    alpha, beta = (float(v) for v in model.cbt_range)
    t = beta if args.beta is None else args.beta
    results, entries = [], []
    for mode, title in (('cbt', f'CBT [{alpha:g}, {beta:g}]'), ('global', f'ADP-C t={t:g}')):
        model.test_cfg.exit_mode = mode
        model.test_cfg.global_threshold = t
        res = inference_model(model, args.img)
        print(f'== {title}\n{cost_table(res)}')
        gflops = [float(v) / 2**30 for v in res.exit_macs] if 'exit_macs' in res else None
        entries.append((title, res.exit_map.data, gflops))
        results.append(res)
    image = mmcv.imread(args.img, channel_order='rgb')
    picture = draw_exit_map_comparison(image, entries, model.num_exits, dpi=args.dpi)
    ok, png = cv2.imencode('.png', mmcv.rgb2bgr(picture))
    if not ok:
        raise RuntimeError(f'could not encode the picture for {args.out_file}')
    with atomic_path(args.out_file) as tmp, open(tmp, 'wb') as f:
        f.write(png.tobytes())
    print(f'wrote {args.out_file}')
    return results


if __name__ == '__main__':
    main()
