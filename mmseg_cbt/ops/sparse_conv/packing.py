"""Weight layouts of the masked conv: the GEMM matrix ``(k*k*Cin, Cout)``, the dense weight, BN folding."""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor

from .layout import SUPPORTED_KERNELS

__all__ = ['conv_weight_matrix', 'dense_weight', 'fold_bn', 'kernel_from_wmat']


def conv_weight_matrix(weight: Tensor) -> Tensor:
    """Reshapes a conv weight ``(Cout, Cin, k, k)`` into the GEMM matrix ``(k*k*Cin, Cout)``.

    Row order is (ky, kx, cin), matching the gathered windows of :meth:`~mmseg_cbt.ops.SparseIndex.windows`.

    Args:
        weight (Tensor): Conv weight ``(Cout, Cin, k, k)``.

    Returns:
        Tensor: Contiguous ``(k*k*Cin, Cout)``.
    """
    if weight.dim() != 4 or weight.shape[2] != weight.shape[3]:
        raise ValueError(f'expected a square conv weight (Cout, Cin, k, k), got {tuple(weight.shape)}')
    cout = weight.shape[0]
    return weight.permute(2, 3, 1, 0).reshape(-1, cout).contiguous()


def kernel_from_wmat(wmat: Tensor, cin: int) -> int:
    """The kernel size k of a ``(k*k*Cin, Cout)`` matrix; ValueError unless it is 1 or 3."""
    if wmat.dim() != 2 or cin == 0 or wmat.shape[0] % cin:
        raise ValueError(f'weight matrix must be (k*k*Cin, Cout) with Cin={cin}, got {tuple(wmat.shape)}')
    kk = wmat.shape[0] // cin
    k = math.isqrt(kk)
    if k * k != kk or k not in SUPPORTED_KERNELS:
        raise ValueError(f'weight matrix rows {wmat.shape[0]} = {kk} x Cin: kernel must be 1x1 or 3x3')
    return k


def dense_weight(wmat: Tensor, k: int, cin: int) -> Tensor:
    """Inverse of :func:`conv_weight_matrix`: the contiguous conv weight ``(Cout, Cin, k, k)``."""
    return wmat.view(k, k, cin, -1).permute(3, 2, 0, 1).contiguous()


def fold_bn(weight: Tensor, bias: Optional[Tensor], bn: torch.nn.modules.batchnorm._BatchNorm) -> Tuple[Tensor, Tensor]:
    """Folds an inference-mode BatchNorm that follows a conv into the conv's weight and bias.

    Args:
        weight (Tensor): Conv weight ``(Cout, Cin, k, k)``.
        bias (Tensor, optional): Conv bias ``(Cout,)``.
        bn (_BatchNorm): The BatchNorm (its running statistics are used).

    Returns:
        tuple: ``(weight, bias)`` of the equivalent conv.
    """
    std = torch.sqrt(bn.running_var + bn.eps)
    gamma = bn.weight if bn.weight is not None else torch.ones_like(std)
    beta = bn.bias if bn.bias is not None else torch.zeros_like(std)
    scale = gamma / std
    b = bias if bias is not None else torch.zeros_like(bn.running_mean)
    return weight * scale.reshape(-1, 1, 1, 1), beta + (b - bn.running_mean) * scale
