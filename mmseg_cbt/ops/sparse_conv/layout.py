"""The feature layout of the masked conv: zero-bordered channels-last buffers ``(N, H + 2 pad, W + 2 pad, C)``.

One pixel is one contiguous row of C values, and the k taps of one window row are one contiguous strip of ``k * C``
values (also for stride 2), at constant flat offsets from the window's top-left pixel: the zero border replaces
bounds checks. Converting NCHW <-> NHWC per conv would cost a sizeable part of the conv, so a caller keeps this
layout through a stage (convert once with :func:`to_padded_nhwc`, view with :func:`padded_interior`).
"""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor

__all__ = [
    'SUPPORTED_KERNELS', 'SUPPORTED_STRIDES', 'check_buffer', 'check_geometry', 'conv_output_size', 'new_padded_buffer',
    'padded_interior', 'padded_row_index', 'to_padded_nhwc', 'zero_border'
]

SUPPORTED_KERNELS = (1, 3)
SUPPORTED_STRIDES = (1, 2)


def conv_output_size(size: int, kernel_size: int, stride: int, padding: int) -> int:
    """Output length of a convolution along one axis (dilation 1), as in :func:`torch.nn.functional.conv2d`.

    Args:
        size (int): Input length.
        kernel_size (int): Kernel length.
        stride (int): Stride.
        padding (int): Zero padding on each side.

    Returns:
        int: ``(size + 2 * padding - kernel_size) // stride + 1``.
    """
    return (size + 2 * padding - kernel_size) // stride + 1


def check_geometry(kernel_size: int, stride: int, padding: int) -> None:
    """Raises ValueError unless the masked conv supports this kernel size, stride and padding."""
    if kernel_size not in SUPPORTED_KERNELS:
        raise ValueError(f'sparse conv supports kernel sizes {SUPPORTED_KERNELS}, got {kernel_size}')
    if stride not in SUPPORTED_STRIDES:
        raise ValueError(f'sparse conv supports strides {SUPPORTED_STRIDES}, got {stride}')
    if not isinstance(padding, int) or padding < 0:
        raise ValueError(f'padding must be a non-negative int, got {padding!r}')


def check_buffer(buf: Tensor, name: str = 'buffer') -> None:
    """Raises ValueError unless ``buf`` is a contiguous 4-D channels-last buffer."""
    if buf.dim() != 4 or not buf.is_contiguous():
        raise ValueError(f'{name} must be a contiguous channels-last (N, Hp, Wp, C) tensor, '
                         f'got shape {tuple(buf.shape)} contiguous={buf.is_contiguous()}')


def zero_border(buf: Tensor, pad: int) -> Tensor:
    """Writes zeros into the ``pad``-wide border of a buffer ``(N, Hp, Wp, C)``, in place; returns ``buf``."""
    if pad:
        h, w = buf.shape[1] - 2 * pad, buf.shape[2] - 2 * pad
        buf[:, :pad].zero_()
        buf[:, pad + h:].zero_()
        buf[:, pad:pad + h, :pad].zero_()
        buf[:, pad:pad + h, pad + w:].zero_()
    return buf


def new_padded_buffer(n: int,
                      c: int,
                      h: int,
                      w: int,
                      pad: int = 1,
                      *,
                      dtype: torch.dtype = torch.float32,
                      device: Union[str, torch.device, None] = None) -> Tensor:
    """Allocates a zero channels-last buffer ``(n, h + 2 pad, w + 2 pad, c)``.

    Args:
        n (int): Batch size.
        c (int): Channels.
        h (int): Interior height.
        w (int): Interior width.
        pad (int): Width of the zero border (the largest conv padding that will read this buffer).
        dtype (torch.dtype): Data type.
        device (str | torch.device, optional): Device.

    Returns:
        Tensor: A contiguous zero tensor of shape ``(n, h + 2 pad, w + 2 pad, c)``.
    """
    return torch.zeros(n, h + 2 * pad, w + 2 * pad, c, dtype=dtype, device=device)


def to_padded_nhwc(x: Tensor, pad: int = 1, out: Optional[Tensor] = None) -> Tensor:
    """Copies an NCHW map into a zero-bordered channels-last buffer.

    Do this once per stage, not per conv: the conversion costs a sizeable part of a dense conv.

    Args:
        x (Tensor): Input ``(N, C, H, W)`` (any memory format; channels-last input copies fastest).
        pad (int): Border width.
        out (Tensor, optional): Existing buffer ``(N, H + 2 pad, W + 2 pad, C)`` to fill; its border must be zero
            (it is not re-zeroed).

    Returns:
        Tensor: The buffer ``(N, H + 2 pad, W + 2 pad, C)``, contiguous.
    """
    if x.dim() != 4:
        raise ValueError(f'expected an NCHW tensor, got shape {tuple(x.shape)}')
    n, c, h, w = x.shape
    if out is None:
        # only the border is zeroed: the interior is overwritten below (a full zero fill costs about the copy)
        out = zero_border(torch.empty(n, h + 2 * pad, w + 2 * pad, c, dtype=x.dtype, device=x.device), pad)
    elif tuple(out.shape) != (n, h + 2 * pad, w + 2 * pad, c) or not out.is_contiguous():
        raise ValueError(f'out must be a contiguous buffer of shape {(n, h + 2 * pad, w + 2 * pad, c)}, '
                         f'got {tuple(out.shape)}')
    out[:, pad:pad + h, pad:pad + w, :].copy_(x.permute(0, 2, 3, 1))
    return out


def padded_interior(buf: Tensor, pad: int = 1) -> Tensor:
    """NCHW view (no copy, channels-last strides) of the interior of a padded buffer.

    Args:
        buf (Tensor): Buffer ``(N, H + 2 pad, W + 2 pad, C)``.
        pad (int): Border width.

    Returns:
        Tensor: A view of shape ``(N, C, H, W)``; writing into it writes the buffer.
    """
    if pad == 0:
        return buf.permute(0, 3, 1, 2)
    return buf[:, pad:-pad, pad:-pad, :].permute(0, 3, 1, 2)


def padded_row_index(n: Tensor, y: Tensor, x: Tensor, height: int, width: int, pad: int = 1) -> Tensor:
    """Flat row of positions ``(n, y, x)`` of a ``height x width`` map in its padded buffer.

    Args:
        n (Tensor): int64 image index of each position.
        y (Tensor): int64 row in the map's interior.
        x (Tensor): int64 column in the map's interior.
        height (int): Interior height.
        width (int): Interior width.
        pad (int): Border width of the buffer ``(N, height + 2 pad, width + 2 pad, C)``.

    Returns:
        Tensor: int64 rows into ``buf.view(-1, C)``.
    """
    return (n * (height + 2 * pad) + y + pad) * (width + 2 * pad) + x + pad
