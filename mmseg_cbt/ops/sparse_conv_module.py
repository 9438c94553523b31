"""``SparseConv2d``: an ``nn.Conv2d`` that can compute only the active output positions."""
from __future__ import annotations

from typing import Optional, Tuple

import torch.nn as nn
from torch import Tensor

from .sparse_conv import PackedConv, sparse_conv2d

__all__ = ['SparseConv2d']


class SparseConv2d(nn.Conv2d):
    """``nn.Conv2d`` with an optional output mask (same parameters and state dict as ``nn.Conv2d``).

    ``forward(x)`` is exactly the plain conv. ``forward(x, mask)`` returns the conv's values at the
    active positions of ``mask`` (bool ``(N, H_out, W_out)``) and 0 elsewhere, or writes the active
    positions into ``out`` and keeps its other values (see :func:`sparse_conv2d`). Supports square
    1x1 / 3x3 kernels, stride 1 / 2, int padding, groups 1, dilation 1, zero padding mode; other
    configurations still work unmasked.
    """

    def forward(self,
                x: Tensor,
                mask: Optional[Tensor] = None,
                out: Optional[Tensor] = None) -> Tensor:  # type: ignore[override]
        """Runs the conv.

        Args:
            x: Input ``(N, Cin, H, W)``.
            mask: Optional bool ``(N, H_out, W_out)``, True = compute.
            out: Optional ``(N, Cout, H_out, W_out)`` written in place at active positions (only with
                ``mask``).

        Returns:
            ``(N, Cout, H_out, W_out)``.
        """
        if mask is None:
            if out is not None:
                raise ValueError('out= is only supported together with a mask')
            return super().forward(x)
        self._check_sparse_supported()
        return sparse_conv2d(x, self.weight, self.bias, mask, stride=self.stride[0], padding=self.padding[0], out=out)

    def _check_sparse_supported(self) -> None:
        k: Tuple[int, ...] = tuple(self.kernel_size)
        if (isinstance(self.padding, str) or self.groups != 1 or tuple(self.dilation) != (1, 1)
                or self.padding_mode != 'zeros' or k[0] != k[1] or self.stride[0] != self.stride[1]
                or self.padding[0] != self.padding[1]):
            raise ValueError(f'masked forward supports square kernels, equal stride/padding, groups=1, '
                             f'dilation=1 and zero padding; got {self.extra_repr()}')

    def pack(self, bn: Optional[nn.Module] = None) -> PackedConv:
        """Packs this conv (optionally with a following BatchNorm folded in) for the stage API.

        Args:
            bn: Inference-mode BatchNorm applied after this conv.

        Returns:
            A :class:`PackedConv` (a snapshot: re-pack after changing the weights).
        """
        self._check_sparse_supported()
        return PackedConv.from_conv(self, bn)
