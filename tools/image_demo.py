"""Early-exit segmentation of one image: every exit's prediction, the exit map, and what the image cost.

In the style of mmseg's ``demo/image_demo.py`` (``mmseg.apis.init_model`` / ``inference_model``)::

    python tools/image_demo.py IMG CONFIG CKPT [--exit-mode cbt|global|entropy|dtop|dense] [--threshold T] \
        [--out-file OUT.png] [--device cpu]

Prints, per exit, the share of the image's pixels still computed there, the share that stopped there and the
cumulative GFLOPs (multiply-adds of conv / linear layers at the positions each conv computed, / 2^30, the count of
``tools/analysis_tools/miou_vs_gflops.py``), and draws the picture of
:class:`mmseg_cbt.visualization.EarlyExitSegLocalVisualizer` (image, exit map with legend, every exit's
prediction) to ``--out-file`` (or a window with ``--show``). The checkpoint is loaded strictly.
"""
import argparse
import os.path as osp
import sys
from typing import List, Optional

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))
from mmseg_cbt.utils.cli import positive_int  # noqa: E402

#: ``--exit-mode`` choices: the segmentor's stop rules (``dense``: nothing stops).
EXIT_MODES = ('dense', 'cbt', 'global', 'entropy', 'dtop')


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    """Command line; files, the mode and the threshold are checked here, before any work."""
    from mmengine.config import DictAction
    p = argparse.ArgumentParser(description='Early-exit segmentation of one image with its exit map')
    p.add_argument('img', help='image file')
    p.add_argument('config', help='config file')
    p.add_argument('checkpoint', help='checkpoint file')
    p.add_argument(
        '--exit-mode',
        choices=EXIT_MODES,
        default=None,
        help="stop rule (default: the config's test_cfg.exit_mode); cbt needs a calibrated checkpoint")
    p.add_argument(
        '--threshold',
        type=float,
        default=None,
        help='threshold of global / entropy / dtop (sets test_cfg.<mode>_threshold; in [0, 1])')
    p.add_argument('--out-file', default=None, help='where the picture goes (PNG)')
    p.add_argument('--show', action='store_true', help='show the picture in a window')
    p.add_argument('--device', default='cpu', help='device, e.g. cpu or cuda:0')
    p.add_argument('--opacity', type=float, default=0.8, help='opacity of the predictions over the image, in [0, 1]')
    p.add_argument('--dpi', type=positive_int, default=100, help='pixels per inch of the picture (panel: 4 inches)')
    p.add_argument('--cfg-options', nargs='+', action=DictAction, help='override config settings')
    args = p.parse_args(argv)
    for what in ('img', 'config', 'checkpoint'):
        if not osp.isfile(getattr(args, what)):
            p.error(f'{what} not found: {getattr(args, what)}')
    if args.threshold is not None:
        if args.exit_mode not in ('global', 'entropy', 'dtop'):
            p.error('--threshold needs --exit-mode global, entropy or dtop')
        if not 0.0 <= args.threshold <= 1.0:  # NaN fails too
            p.error(f'--threshold must be in [0, 1], got {args.threshold}')
    if not 0.0 <= args.opacity <= 1.0:
        p.error(f'--opacity must be in [0, 1], got {args.opacity}')
    if not args.dpi <= 1000:
        p.error(f'--dpi must be <= 1000, got {args.dpi}')
    return args


def cost_table(result) -> str:
    """The per-exit table printed for one prediction (computed %, stopped there %, cumulative GFLOPs 2^30)."""
    computed = [float(v) for v in result.exit_computed]
    macs = result.get('exit_macs', None)
    n = len(computed)
    lines = [f'{"exit":>4s} | {"computed %":>10s} | {"stopped here %":>14s} | {"GFLOPs (2^30, cumulative)":>25s}']
    for i in range(n):
        # a pixel that reached exit i stops there unless exit i + 1 computes it (the last exit stops every pixel)
        stopped = computed[i] - (computed[i + 1] if i + 1 < n else 0.0)
        gfl = f'{float(macs[i]) / 2**30:25.4f}' if macs is not None else f'{"-":>25s}'
        lines.append(f'{i + 1:>4d} | {100 * computed[i]:10.2f} | {100 * stopped:14.2f} | {gfl}')
    return '\n'.join(lines)


def default_dataset_meta(num_classes: int) -> dict:
    """Classes and palette of the first mmseg dataset with ``num_classes`` classes, else Cityscapes' (what
    ``mmseg.apis.init_model`` does for a checkpoint without ``dataset_meta``)."""
    from mmseg.utils import dataset_aliases, get_classes, get_palette
    name = next((n for n in dataset_aliases if len(get_classes(n)) == num_classes), 'cityscapes')
    return dict(classes=get_classes(name), palette=get_palette(name))


def load_model(config: str,
               checkpoint: str,
               device: str = 'cpu',
               exit_mode: Optional[str] = None,
               threshold: Optional[float] = None,
               cfg_options: Optional[dict] = None):
    """The early-exit model of ``config`` with ``checkpoint`` loaded strictly, in eval mode, with ``dataset_meta``.

    Args:
        config (str): Config file.
        checkpoint (str): Checkpoint file.
        device (str): Device.
        exit_mode (str, optional): Overrides ``test_cfg.exit_mode``.
        threshold (float, optional): Sets ``test_cfg.<exit_mode>_threshold``.
        cfg_options (dict, optional): Config overrides.
    """
    from mmengine.config import Config

    from mmseg.apis import init_model
    from mmseg.utils import register_all_modules

    import mmseg_cbt  # noqa: F401
    from mmseg_cbt.models.segmentors.options import check_stop_options
    from mmseg_cbt.utils.checkpoint import load_checkpoint_strict

    register_all_modules()
    cfg = Config.fromfile(config)
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    if exit_mode is not None:
        cfg.model.test_cfg.exit_mode = exit_mode
    if threshold is not None:
        cfg.model.test_cfg[f'{exit_mode}_threshold'] = threshold
    check_stop_options(cfg.model.get('test_cfg', None), 'test_cfg')
    model = init_model(cfg, None, device=device)
    if not hasattr(model, 'num_exits'):
        raise TypeError(f'{config} does not build an early-exit segmentor (EarlyExitEncoderDecoder)')
    ckpt = load_checkpoint_strict(model, checkpoint, config=config, logger=None)
    meta = ckpt.get('meta', {}) if isinstance(ckpt, dict) else {}
    model.dataset_meta = meta.get('dataset_meta', None) or default_dataset_meta(model.num_classes)
    return model.to(device).eval()


def main(argv: Optional[List[str]] = None):
    """Runs the demo; returns the prediction (a ``SegDataSample`` with the exit outputs)."""
    args = parse_args(argv)
    import mmcv

    from mmseg.apis import inference_model

    from mmseg_cbt.visualization import EarlyExitSegLocalVisualizer
    model = load_model(args.config, args.checkpoint, args.device, args.exit_mode, args.threshold, args.cfg_options)
    result = inference_model(model, args.img)
    mode = result.metainfo.get('exit_mode', '?')
    print(f'{args.img}: exit_mode={mode}, {result.exit_map.data.shape[-2]}x{result.exit_map.data.shape[-1]} pixels')
    print(cost_table(result))
    if args.out_file or args.show:
        vis = EarlyExitSegLocalVisualizer(
            name='image_demo',
            classes=model.dataset_meta['classes'],
            palette=model.dataset_meta['palette'],
            alpha=args.opacity,
            dpi=args.dpi)
        image = mmcv.imread(args.img, channel_order='rgb')
        vis.add_datasample(osp.basename(args.img), image, result, draw_gt=False, show=args.show, out_file=args.out_file)
        if args.out_file:
            print(f'wrote {args.out_file}')
    return result


if __name__ == '__main__':
    main()
