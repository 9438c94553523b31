"""One picture of an early-exit prediction: image, ground truth, exit map with legend, every exit's prediction.

matplotlib is imported lazily and driven through its object API with the Agg canvas, so importing this module
never touches a global pyplot backend.
"""
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

__all__ = ['exit_colours', 'exit_stop_fractions', 'colourise', 'draw_exit_panels', 'draw_exit_map_comparison']

#: Width of one panel in inches (at ``dpi`` pixels per inch).
_PANEL_IN = 4.0


def exit_colours(num_exits: int) -> np.ndarray:
    """(num_exits, 3) RGB colours in [0, 1] of the exits, early (cheap, dark) to late (costly, yellow): viridis."""
    from matplotlib import colormaps
    rgb = np.asarray(colormaps['viridis'](np.linspace(0.0, 1.0, num_exits)))[:, :3]
    return np.rint(rgb * 255) / 255  # on the 8-bit grid: map pixels and legend patches get the same bytes


def exit_stop_fractions(exit_map: np.ndarray, num_exits: int) -> np.ndarray:
    """(num_exits,) fraction of the map's pixels that stopped at each exit (1..num_exits)."""
    counts = np.bincount(exit_map.reshape(-1).astype(np.int64), minlength=num_exits + 1)[1:num_exits + 1]
    return counts / max(exit_map.size, 1)


def colourise(labels: np.ndarray,
              palette: Sequence[Sequence[int]],
              image: Optional[np.ndarray] = None,
              alpha: float = 1.0) -> np.ndarray:
    """A label map (h, w) in the dataset palette (uint8 RGB), optionally blended over ``image`` with ``alpha``.

    Labels outside the palette (e.g. 255, ignore) are drawn black.
    """
    lut = np.zeros((256, 3), dtype=np.uint8)
    pal = np.asarray(palette, dtype=np.uint8)[:256, :3]
    lut[:len(pal)] = pal
    out = lut[np.clip(labels, 0, 255).astype(np.int64)]
    if image is not None and alpha < 1.0:
        out = (image.astype(np.float32) * (1 - alpha) + out.astype(np.float32) * alpha).astype(np.uint8)
    return out


def _as_map(data, hw: Tuple[int, int]) -> np.ndarray:
    """A (1, h, w) / (h, w) label tensor or array as an (H, W) int array at the image size (nearest)."""
    t = torch.as_tensor(data).detach().cpu()
    t = t.reshape(t.shape[-2:])
    if tuple(t.shape) != tuple(hw):
        t = torch.nn.functional.interpolate(t[None, None].float(), size=tuple(hw), mode='nearest')[0, 0]
    return t.long().numpy()


def draw_exit_panels(image: np.ndarray,
                     exit_preds: List,
                     exit_map,
                     classes: Sequence[str],
                     palette: Sequence[Sequence[int]],
                     gt=None,
                     title: Optional[str] = None,
                     exit_gflops: Optional[Sequence[float]] = None,
                     alpha: float = 0.8,
                     dpi: int = 100) -> np.ndarray:
    """Draws the panels of one image and returns them as one RGB picture.

    Layout: top row the image, the ground truth (when given), the exit map (each pixel coloured by the exit where
    it stopped) and its legend (the share of pixels per exit and, when given, the cumulative GFLOPs of each exit);
    bottom row the prediction of every exit (in the dataset palette, blended over the image with ``alpha``);
    under them a legend of the classes that appear.

    Args:
        image (np.ndarray): (H, W, 3) uint8 RGB.
        exit_preds (list): Per exit a (1, h, w) or (h, w) label map (resized to the image with nearest).
        exit_map: (1, h, w) or (h, w) exits 1..num_exits.
        classes (Sequence[str]): Class names.
        palette (Sequence[Sequence[int]]): RGB colours (0..255) per class.
        gt (optional): (1, h, w) or (h, w) ground-truth labels.
        title (str, optional): Figure title.
        exit_gflops (Sequence[float], optional): Cumulative GFLOPs (2^30) of every exit, shown in the legend.
        alpha (float): Opacity of the predictions over the image.
        dpi (int): Pixels per inch of the picture.

    Returns:
        np.ndarray: (H', W', 3) uint8 RGB.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    num_exits = len(exit_preds)
    if num_exits == 0:
        raise ValueError('draw_exit_panels needs at least one exit prediction')
    if len(palette) < len(classes):
        raise ValueError(f'palette has {len(palette)} colours for {len(classes)} classes')
    hw = image.shape[:2]
    preds = [_as_map(p, hw) for p in exit_preds]
    emap = _as_map(exit_map, hw)
    if emap.min() < 1 or emap.max() > num_exits:
        raise ValueError(f'exit map values must lie in 1..{num_exits}, got {emap.min()}..{emap.max()}')
    gt_map = _as_map(gt, hw) if gt is not None else None
    top: List[Tuple[str, np.ndarray]] = [('image', image)]
    if gt_map is not None:
        top.append(('ground truth', colourise(gt_map, palette, image, alpha)))
    ecol = exit_colours(num_exits)
    top.append(('exit map (where pixels stopped)', np.rint(ecol[emap - 1] * 255).astype(np.uint8)))
    cols = max(num_exits, len(top) + 1)
    present = np.unique(np.concatenate([p.reshape(-1) for p in preds + ([gt_map] if gt_map is not None else [])]))
    present = [int(k) for k in present if 0 <= k < len(classes)]
    class_cols = min(max(len(present), 1), 2 * cols)
    legend_in = 0.2 * -(-len(present) // class_cols) + 0.1  # the class legend's rows under the panels
    panel_h = _PANEL_IN * hw[0] / hw[1]
    title_in = 0.4 if title else 0.0
    fig_h = 2 * (panel_h + 0.3) + legend_in + title_in
    fig = Figure(figsize=(cols * _PANEL_IN, fig_h), dpi=dpi)
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, cols, squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    for ax, (name, img) in zip(axes[0], top):
        ax.imshow(img, interpolation='nearest')
        ax.set_title(name, fontsize=9)
    shares = exit_stop_fractions(emap, num_exits)
    labels = [
        f'exit {n + 1}: {100 * shares[n]:.1f}% of pixels' +
        (f', {exit_gflops[n]:.3f} GFLOPs' if exit_gflops is not None else '') for n in range(num_exits)
    ]
    axes[0][len(top)].legend(
        handles=[Patch(color=ecol[n], label=labels[n]) for n in range(num_exits)],
        loc='center left',
        fontsize=8,
        title='exit map: stopped at' + (' (GFLOPs 2^30, cumulative)' if exit_gflops is not None else ''),
        title_fontsize=8,
        frameon=False)
    for n, (ax, pred) in enumerate(zip(axes[1], preds)):
        ax.imshow(colourise(pred, palette, image, alpha), interpolation='nearest')
        ax.set_title(f'exit {n + 1} prediction', fontsize=9)
    if present:
        fig.legend(
            handles=[Patch(color=np.asarray(palette[k][:3]) / 255.0, label=classes[k]) for k in present],
            loc='lower center',
            ncol=class_cols,
            fontsize=7,
            frameon=False,
            handlelength=1.2,
            columnspacing=1.0)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.subplots_adjust(
        left=0.005, right=0.995, bottom=legend_in / fig_h, top=1 - (title_in + 0.05) / fig_h, wspace=0.03, hspace=0.25)
    fig.canvas.draw()
    rgba = np.asarray(fig.canvas.buffer_rgba())
    return np.ascontiguousarray(rgba[..., :3])


def draw_exit_map_comparison(image: np.ndarray,
                             entries: Sequence[Tuple[str, object, Optional[Sequence[float]]]],
                             num_exits: int,
                             dpi: int = 100) -> np.ndarray:
    """The image next to the exit maps of several stop rules (e.g. CBT and ADP-C at the same beta), one row.

    Args:
        image (np.ndarray): (H, W, 3) uint8 RGB.
        entries (list): Per rule ``(title, exit_map, exit_gflops)``: the exit map ((1, h, w) or (h, w), exits
            1..num_exits) and, optionally, the cumulative GFLOPs (2^30) of every exit (the total goes in the title).
        num_exits (int): Number of exits (the legend's length).
        dpi (int): Pixels per inch (a panel is 4 inches wide).

    Returns:
        np.ndarray: (H', W', 3) uint8 RGB.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    hw = image.shape[:2]
    ecol = exit_colours(num_exits)
    panel_h = _PANEL_IN * hw[0] / hw[1]
    fig_h = panel_h + 0.35 + 0.3 * num_exits
    fig = Figure(figsize=((len(entries) + 1) * _PANEL_IN, fig_h), dpi=dpi)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(entries) + 1, squeeze=False)[0]
    for ax in axes:
        ax.set_axis_off()
    axes[0].imshow(image, interpolation='nearest')
    axes[0].set_title('image', fontsize=10)
    for ax, (title, exit_map, gflops) in zip(axes[1:], entries):
        emap = _as_map(exit_map, hw)
        if emap.min() < 1 or emap.max() > num_exits:
            raise ValueError(f'exit map values must lie in 1..{num_exits}, got {emap.min()}..{emap.max()}')
        ax.imshow(np.rint(ecol[emap - 1] * 255).astype(np.uint8), interpolation='nearest')
        ax.set_title(title + (f': {gflops[-1]:.3f} GFLOPs (2^30)' if gflops is not None else ''), fontsize=10)
        shares = exit_stop_fractions(emap, num_exits)
        ax.legend(
            handles=[
                Patch(color=ecol[n], label=f'stopped at exit {n + 1}: {100 * shares[n]:.1f}%') for n in range(num_exits)
            ],
            loc='upper center',
            bbox_to_anchor=(0.5, -0.02),
            fontsize=9,
            frameon=False)
    fig.subplots_adjust(
        left=0.005, right=0.995, bottom=(0.3 * num_exits + 0.05) / fig_h, top=1 - 0.3 / fig_h, wspace=0.03)
    fig.canvas.draw()
    return np.ascontiguousarray(np.asarray(fig.canvas.buffer_rgba())[..., :3])
