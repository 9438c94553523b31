"""The objects a network holds: ``SparseConv2d`` (an ``nn.Conv2d`` that can compute only active output positions,
after mmcv's ``MaskedConv2d``) and ``PackedConv`` (a conv prepared for the stage API, BN folded)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.nn as nn
from torch import Tensor

from .cache import mark_snapshot
from .dispatch import sparse_conv_buffer, sparse_conv_rows
from .functional import sparse_conv2d
from .index import SparseIndex
from .layout import check_geometry
from .packing import conv_weight_matrix, fold_bn

__all__ = ['PackedConv', 'SparseConv2d']


@dataclass
class PackedConv:
    """A conv prepared for masked inference: both the GEMM matrix and the dense weight.

    A snapshot: its tensors are not to be changed in place (build a new one after changing the weights); what the
    compiled kernel derives from ``wmat`` is kept for the snapshot's lifetime, also under ``torch.inference_mode``.

    Attributes:
        weight (Tensor): ``(Cout, Cin, k, k)`` contiguous weight, used by the dense fallback.
        wmat (Tensor): ``(k*k*Cin, Cout)`` GEMM matrix, used by the sparse path.
        bias (Tensor, optional): ``(Cout,)``.
        stride (int): 1 or 2.
        padding (int): Zero padding.
    """

    weight: Tensor
    wmat: Tensor
    bias: Optional[Tensor]
    stride: int = 1
    padding: int = 1

    @property
    def kernel_size(self) -> int:
        """Kernel size k."""
        return int(self.weight.shape[-1])

    @classmethod
    def from_weight(cls,
                    weight: Tensor,
                    bias: Optional[Tensor] = None,
                    stride: int = 1,
                    padding: Optional[int] = None) -> 'PackedConv':
        """Packs a raw weight.

        Args:
            weight: ``(Cout, Cin, k, k)``, k in {1, 3}.
            bias: ``(Cout,)`` or None.
            stride: 1 or 2.
            padding: Default ``k // 2``.

        Returns:
            The packed conv (detached tensors).
        """
        k = int(weight.shape[-1])
        padding = k // 2 if padding is None else padding
        check_geometry(k, stride, padding)
        weight = weight.detach().contiguous()
        return cls(
            weight=weight,
            wmat=mark_snapshot(conv_weight_matrix(weight)),  # the kernel's packing of it is then kept, see cache
            bias=None if bias is None else bias.detach().contiguous(),
            stride=stride,
            padding=padding)

    @classmethod
    def from_conv(cls,
                  conv: torch.nn.Conv2d,
                  bn: Optional[torch.nn.modules.batchnorm._BatchNorm] = None) -> 'PackedConv':
        """Packs an ``nn.Conv2d`` (square kernel, dilation 1, groups 1), optionally folding a BN.

        Args:
            conv: The conv.
            bn: A BatchNorm following it, folded in (inference only).

        Returns:
            The packed conv.
        """
        if conv.groups != 1 or tuple(conv.dilation) != (1, 1):
            raise ValueError('sparse conv supports groups=1, dilation=1 only')
        if conv.stride[0] != conv.stride[1] or conv.padding[0] != conv.padding[1] \
                or isinstance(conv.padding, str) or conv.padding_mode != 'zeros':
            raise ValueError('sparse conv supports equal int stride/padding with zero padding only')
        weight, bias = conv.weight.detach(), None if conv.bias is None else conv.bias.detach()
        if bn is not None:
            weight, bias = fold_bn(weight, bias, bn)
            bias = bias.detach()
        return cls.from_weight(weight.detach(), bias, stride=conv.stride[0], padding=conv.padding[0])

    def rows(self,
             buf: Tensor,
             idx: SparseIndex,
             *,
             residual: Optional[Tensor] = None,
             relu: bool = False,
             in_pad: int = 1,
             res_pad: int = 1,
             **kwargs) -> Tensor:
        """:func:`sparse_conv_rows` with this conv's weights and geometry."""
        return sparse_conv_rows(
            buf,
            idx,
            self.wmat,
            self.bias,
            stride=self.stride,
            padding=self.padding,
            residual=residual,
            relu=relu,
            in_pad=in_pad,
            res_pad=res_pad,
            dense_weight=self.weight,
            **kwargs)

    def apply(self,
              buf: Tensor,
              idx: SparseIndex,
              out_buf: Tensor,
              *,
              residual: Optional[Tensor] = None,
              relu: bool = False,
              in_pad: int = 1,
              out_pad: int = 1,
              res_pad: int = 1,
              **kwargs) -> Tensor:
        """:func:`sparse_conv_buffer` with this conv's weights and geometry."""
        return sparse_conv_buffer(
            buf,
            idx,
            self.wmat,
            self.bias,
            out_buf,
            stride=self.stride,
            padding=self.padding,
            residual=residual,
            relu=relu,
            in_pad=in_pad,
            out_pad=out_pad,
            res_pad=res_pad,
            dense_weight=self.weight,
            **kwargs)


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
