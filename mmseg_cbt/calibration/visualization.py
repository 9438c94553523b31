"""Bar chart of class based thresholds (the CBT paper's "thresholds per class" figure).

matplotlib is imported lazily (only :func:`plot_thresholds` needs it) and driven through its object API with
the Agg canvas, so importing this module never touches a global pyplot backend.
"""
from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from mmseg.datasets import CityscapesDataset

from ..utils.io import atomic_path

__all__ = ['CITYSCAPES_PALETTE', 'plot_thresholds']

#: Cityscapes' colours of the 19 evaluation classes in trainId order (road ... bicycle), from mmseg's METAINFO.
CITYSCAPES_PALETTE: Tuple[Tuple[int, int, int], ...] = tuple(map(tuple, CityscapesDataset.METAINFO['palette']))


def _class_colours(num_classes: int, palette: Optional[Sequence[Sequence[int]]]) -> List[Tuple[float, ...]]:
    """RGB colours in [0, 1] per class: the given palette, Cityscapes' for K == 19, else a colormap."""
    if palette is None and num_classes == len(CITYSCAPES_PALETTE):
        palette = CITYSCAPES_PALETTE
    if palette is not None:
        if len(palette) < num_classes:
            raise ValueError(f'palette has {len(palette)} colours for {num_classes} classes')
        return [tuple(c / 255.0 for c in palette[k][:3]) for k in range(num_classes)]
    from matplotlib import colormaps

    cmap = colormaps['tab20' if num_classes <= 20 else 'turbo']
    denom = max(num_classes - 1, 1)
    return [tuple(cmap(k if num_classes <= 20 else k / denom)[:3]) for k in range(num_classes)]


def plot_thresholds(thresholds: Union[Tensor, Sequence[float]],
                    class_names: Sequence[str],
                    out_file: str,
                    alpha: float,
                    beta: float,
                    title: Optional[str] = None,
                    palette: Optional[Sequence[Sequence[int]]] = None) -> str:
    """Draws the thresholds as a bar chart sorted ascending (easiest class first) and writes a PNG.

    Bars are coloured per class (Cityscapes' palette when K == 19, unless ``palette`` is given), the y-axis is
    zoomed to ``[alpha - margin, beta + margin]`` so that the differences are visible, ``alpha`` and ``beta``
    are drawn as dashed lines, and every bar carries its value. A ``(N, K)`` input (CBT-ns) gives one subplot
    per exit, each sorted on its own. The PNG is written to a temporary file in the target directory and
    moved into place with ``os.replace``, so readers never see a half-written file.

    Args:
        thresholds (Tensor | Sequence[float]): ``(K,)`` or ``(N, K)`` thresholds.
        class_names (Sequence[str]): K class names.
        out_file (str): PNG path; parent directories are created.
        alpha (float): Lower end of the threshold range (dashed line).
        beta (float): Upper end of the threshold range (dashed line).
        title (str, optional): Figure title. Defaults to ``'CBT thresholds in [alpha, beta]'``.
        palette (Sequence[Sequence[int]], optional): K RGB colours in 0..255, indexed by class.

    Returns:
        str: ``out_file``.
    """
    thr = torch.as_tensor(thresholds).detach().cpu().to(torch.float64)
    if thr.ndim == 1:
        thr = thr.unsqueeze(0)
        per_exit = False
    elif thr.ndim == 2:
        per_exit = True
    else:
        raise ValueError(f'thresholds must be (K,) or (N, K), got {tuple(thr.shape)}')
    num_rows, num_classes = thr.shape
    if len(class_names) != num_classes:
        raise ValueError(f'{len(class_names)} class names for {num_classes} thresholds')
    alpha, beta = float(alpha), float(beta)
    colours = _class_colours(num_classes, palette)

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    width = max(6.0, 0.45 * num_classes + 1.5)
    fig = Figure(figsize=(width, 3.6 * num_rows), layout='constrained')
    FigureCanvasAgg(fig)
    axes = fig.subplots(num_rows, 1, squeeze=False)[:, 0]
    # Zoom to the range: the paper's thresholds differ in the third decimal. A zero range (alpha == beta)
    # still needs a visible window.
    pad = 0.1 * (beta - alpha) if beta > alpha else 0.005
    lo = min(alpha, float(thr.min())) - pad
    hi = max(beta, float(thr.max())) + pad
    decimals = 4 if beta - alpha < 0.02 else 3  # e.g. [0.99, 0.998] needs the fourth decimal
    for row, ax in enumerate(axes):
        values = thr[row]
        order = sorted(range(num_classes), key=lambda k: (float(values[k]), k))  # stable for ties
        xs = list(range(num_classes))
        heights = [float(values[k]) for k in order]
        # Bars start at the bottom of the zoomed window, not at 0 (which is far outside it).
        bars = ax.bar(
            xs, [h - lo for h in heights],
            bottom=lo,
            color=[colours[k] for k in order],
            edgecolor='black',
            linewidth=0.5)
        ax.bar_label(bars, labels=[f'{h:.{decimals}f}' for h in heights], fontsize=7, rotation=90, padding=2)
        ax.axhline(alpha, color='tab:blue', linestyle='--', linewidth=1, label=f'alpha = {alpha:g}')
        ax.axhline(beta, color='tab:red', linestyle='--', linewidth=1, label=f'beta = {beta:g}')
        ax.set_ylim(lo, hi + pad)  # extra room above beta for the value labels
        ax.set_xticks(xs)
        ax.set_xticklabels([str(class_names[k]) for k in order], rotation=60, ha='right', fontsize=8)
        ax.set_ylabel('threshold')
        ax.grid(axis='y', linestyle=':', linewidth=0.5)
        ax.legend(loc='upper left', fontsize=7)
        if per_exit:
            ax.set_title(f'exit {row + 1}', fontsize=9)
    fig.suptitle(title if title is not None else f'CBT thresholds in [{alpha:g}, {beta:g}]')

    with atomic_path(out_file) as tmp:
        fig.savefig(tmp, format='png', dpi=120)
    return out_file
