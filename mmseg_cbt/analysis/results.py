"""Per-exit MAC counts of a set of images: cumulative and exit-only, in both GFLOPs units."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Sequence, Tuple, Union

from .units import UNIT_1E9, UNIT_2_30

__all__ = ['ExitFlops', 'FlopsResult']

# ---------------------------------------------------------------------------------------------------------------
# results
# ---------------------------------------------------------------------------------------------------------------
Number = Union[int, float]


def _mean(xs: Sequence[Number]) -> float:
    return float(sum(xs)) / len(xs) if xs else float('nan')


@dataclass
class ExitFlops:
    """MACs of one exit, per image and averaged.

    Attributes:
        exit (int): 1-based exit (1 for a model without exits: the whole model).
        macs_per_image (list): Cumulative MACs (everything up to this exit) of every image.
        macs_exit_only_per_image (list): MACs of this exit's own stage and head (the increment), per image.
        fill_macs_per_image (list): Part of the increment that is RBF fill work (0 unless ``fill='rbf'``).
        backbone_macs_per_image (list): Part of the increment in the backbone stage (fill included).
        params (int): Cumulative parameters (stages and heads up to this exit).
        params_exit_only (int): Parameters of this exit's stage and head.
    """
    exit: int
    macs_per_image: List[Number] = field(default_factory=list)
    macs_exit_only_per_image: List[Number] = field(default_factory=list)
    fill_macs_per_image: List[Number] = field(default_factory=list)
    backbone_macs_per_image: List[Number] = field(default_factory=list)
    params: int = 0
    params_exit_only: int = 0

    @property
    def macs(self) -> float:
        """Cumulative MACs, mean over images."""
        return _mean(self.macs_per_image)

    @property
    def macs_exit_only(self) -> float:
        """This exit's own MACs, mean over images."""
        return _mean(self.macs_exit_only_per_image)

    @property
    def gflops_1e9(self) -> float:
        """Cumulative MACs / 1e9 (mmengine's units), mean over images."""
        return self.macs / UNIT_1E9

    @property
    def gflops_2_30(self) -> float:
        """Cumulative MACs / 2**30 (the papers' units), mean over images."""
        return self.macs / UNIT_2_30

    @property
    def gflops_exit_only_1e9(self) -> float:
        """This exit's own MACs / 1e9, mean over images."""
        return self.macs_exit_only / UNIT_1E9

    @property
    def gflops_exit_only_2_30(self) -> float:
        """This exit's own MACs / 2**30, mean over images."""
        return self.macs_exit_only / UNIT_2_30

    def to_dict(self, per_image: bool = True) -> Dict[str, Any]:
        """Plain dict (JSON-ready); ``per_image`` adds the per-image lists."""
        d: Dict[str, Any] = dict(
            exit=self.exit,
            macs=self.macs,
            macs_exit_only=self.macs_exit_only,
            gflops_1e9=self.gflops_1e9,
            gflops_2_30=self.gflops_2_30,
            gflops_exit_only_1e9=self.gflops_exit_only_1e9,
            gflops_exit_only_2_30=self.gflops_exit_only_2_30,
            fill_macs=_mean(self.fill_macs_per_image),
            params=self.params,
            params_exit_only=self.params_exit_only)
        if per_image:
            d.update(
                macs_per_image=list(self.macs_per_image),
                macs_exit_only_per_image=list(self.macs_exit_only_per_image),
                gflops_1e9_per_image=[m / UNIT_1E9 for m in self.macs_per_image],
                gflops_2_30_per_image=[m / UNIT_2_30 for m in self.macs_per_image])
        return d


@dataclass
class FlopsResult:
    """Per-exit MACs of a set of images.

    Attributes:
        exits (list[ExitFlops]): One entry per exit (one entry, exit 1, for a model without exits).
        early_exit (bool): Whether the model has exits.
        exit_mode (str): Stop rule the masks came from (``'dense'``: no masking).
        fill (str): Fill rule charged (``'rbf'`` adds ADP-C's fill work).
        input_shapes (list[tuple[int, int]]): Input (H, W) of every image, as counted (after padding).
    """
    exits: List[ExitFlops]
    early_exit: bool = True
    exit_mode: str = 'dense'
    fill: str = 'copy'
    input_shapes: List[Tuple[int, int]] = field(default_factory=list)

    @property
    def num_images(self) -> int:
        """Number of images counted."""
        return len(self.input_shapes)

    @property
    def total(self) -> ExitFlops:
        """The last exit (cumulative = the whole model)."""
        return self.exits[-1]

    def extend(self, other: 'FlopsResult') -> 'FlopsResult':
        """Appends the images of ``other`` (same model and settings) in place; returns ``self``."""
        if len(other.exits) != len(self.exits):
            raise ValueError('cannot merge results with different numbers of exits')
        for a, b in zip(self.exits, other.exits):
            a.macs_per_image.extend(b.macs_per_image)
            a.macs_exit_only_per_image.extend(b.macs_exit_only_per_image)
            a.fill_macs_per_image.extend(b.fill_macs_per_image)
            a.backbone_macs_per_image.extend(b.backbone_macs_per_image)
        self.input_shapes.extend(other.input_shapes)
        return self

    def to_dict(self, per_image: bool = True) -> Dict[str, Any]:
        """Plain dict (JSON-ready): settings, ``exits`` (list of :meth:`ExitFlops.to_dict`) and ``total``."""
        return dict(
            early_exit=self.early_exit,
            exit_mode=self.exit_mode,
            fill=self.fill,
            num_images=self.num_images,
            input_shapes=[list(s) for s in self.input_shapes] if per_image else None,
            units=dict(gflops_1e9='MACs / 1e9', gflops_2_30='MACs / 2**30'),
            exits=[e.to_dict(per_image) for e in self.exits],
            total=self.total.to_dict(per_image=False))

    def table(self, per_exit: bool = False) -> str:
        """A text table (cumulative GFLOPs in both units, params); ``per_exit`` adds the exit-only columns."""
        head = ['exit', 'GFLOPs (1e9) cum.', 'GFLOPs (2^30) cum.', 'params (M) cum.']
        if per_exit:
            head += ['GFLOPs (1e9) exit only', 'GFLOPs (2^30) exit only', 'params (M) exit only']
        rows = []
        for e in self.exits:
            row = [
                str(e.exit) if self.early_exit else 'total', f'{e.gflops_1e9:.3f}', f'{e.gflops_2_30:.3f}',
                f'{e.params / 1e6:.3f}'
            ]
            if per_exit:
                row += [
                    f'{e.gflops_exit_only_1e9:.3f}', f'{e.gflops_exit_only_2_30:.3f}', f'{e.params_exit_only / 1e6:.3f}'
                ]
            rows.append(row)
        widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
        line = '+'.join('-' * (w + 2) for w in widths)
        fmt = lambda r: '|'.join(f' {c:>{w}} ' for c, w in zip(r, widths))  # noqa: E731
        note = (f'MACs of conv/linear/attention layers (1 MAC = 1 FLOP), mean over {self.num_images} image(s), '
                f'exit_mode={self.exit_mode}, fill={self.fill}')
        return '\n'.join([note, line, fmt(head), line] + [fmt(r) for r in rows] + [line])
