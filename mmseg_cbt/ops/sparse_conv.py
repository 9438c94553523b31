"""Masked ("sparse") 2-D convolution for early-exit inference, pure PyTorch.

Semantics (the ones that keep a trained network unchanged, cf. ADP-C's dense simulation and mmcv's
``MaskedConv2d``): outputs are computed only at *active* output positions (``mask == True``); every
window reads the **full** input map, so input positions of stopped pixels contribute whatever value the
caller has left there (their last value, a fill, ...). Zero padding at the image border is as in
:func:`torch.nn.functional.conv2d`. At active positions the result equals the dense convolution.

Two levels of API:

* :func:`sparse_conv2d` - a drop-in functional op on NCHW tensors (one conv, one mask). Convenient, but it
  pays an NCHW -> padded-NHWC conversion and an index build per call.
* The *stage* API for a caller that runs many convs at one resolution with one mask (an HRNet stage):

  .. code-block:: python

      idx = SparseIndex.build(mask)                      # once per exit mask and resolution
      buf = to_padded_nhwc(x)                            # once per stage: persistent channels-last buffer
      conv = PackedConv.from_conv(conv_module, bn=bn)    # once per layer (BN folded)
      y_rows = sparse_conv_rows(buf, idx, conv.wmat, conv.bias, relu=True)   # (M, Cout) active rows
      scatter_rows(out_buf, idx, y_rows)                 # write active positions, keep stopped ones
      # or, fused and with the dense fallback that writes straight into the buffer:
      conv.apply(buf, idx, out_buf, residual=res_buf, relu=True)

Why this representation (measured on the 2-core CPU machines, see the project reference, section 7):

* Features live in a zero-bordered channels-last buffer ``(N, H + 2p, W + 2p, C)``: one pixel is one
  contiguous row of C floats, so a 3x3 window is 9 row gathers at *constant* flat offsets
  ``dy * (W + 2p) + dx`` and needs no bounds checks (the border rows are the zero padding). Converting
  NCHW <-> NHWC per layer costs 5-58 % of a dense conv, so the layout is kept through a stage.
* Active positions are turned into flat row indices once (:class:`SparseIndex`); each conv geometry
  (1x1, 3x3 stride 1, 3x3 stride 2 reading a finer input buffer) gets its neighbour table built lazily
  once and cached on the index, so all convs of a stage share it.
* Work is chunked (~1-4k active rows): gather ``(rows, k*k*Cin)`` -> one GEMM with the
  ``(k*k*Cin, Cout)`` weight matrix -> epilogue (bias, residual, ReLU) while the chunk is hot in cache.
  Un-chunked im2col was 2.7-3.2x slower than the dense conv at C=48, 50 % active.
* Above a measured active fraction (:data:`DENSE_CROSSOVER`) the dense conv is cheaper and is used.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    'DENSE_CROSSOVER',
    'SparseIndex',
    'PackedConv',
    'sparse_conv2d',
    'sparse_conv_rows',
    'sparse_conv_buffer',
    'dense_conv_buffer',
    'gather_rows',
    'scatter_rows',
    'to_padded_nhwc',
    'padded_interior',
    'new_padded_buffer',
    'conv_weight_matrix',
    'fold_bn',
    'conv_output_size',
]

# Active fraction above which the dense conv is used instead of gather + GEMM + scatter.
# Measured with tools/analysis_tools/benchmark_masked.py (2 shared CPU cores, fp32, torch 2.13 CPU,
# oneDNN dense conv on channels-last input, blob masks): the masked/dense wall ratio crosses 1.0
# between ~65 % and ~85 % active depending on the shape (earliest for few channels at high resolution,
# e.g. C=18 @ 128x256, where the dense conv is most efficient per MAC), so 0.6 keeps every measured
# HRNet shape at or below the dense time. See the report in the benchmark script's docstring.
DENSE_CROSSOVER: float = 0.6

# Target size of one gathered chunk (rows x k*k*Cin fp32). ~1 MiB keeps the gathered block in the
# 2 MiB per-core L2 while the GEMM reads it; measured flat between 0.5 and 2 MiB, worse at 8+ MiB.
_CHUNK_BYTES: int = 1 << 20
_MIN_CHUNK_ROWS: int = 256
_MAX_CHUNK_ROWS: int = 4096

_SUPPORTED_KERNELS = (1, 3)
_SUPPORTED_STRIDES = (1, 2)


def conv_output_size(size: int, kernel_size: int, stride: int, padding: int) -> int:
    """Output length of a convolution along one axis (dilation 1), as in :func:`F.conv2d`.

    Args:
        size: Input length.
        kernel_size: Kernel length.
        stride: Stride.
        padding: Zero padding on each side.

    Returns:
        ``(size + 2 * padding - kernel_size) // stride + 1``.
    """
    return (size + 2 * padding - kernel_size) // stride + 1


def _check_geometry(kernel_size: int, stride: int, padding: int) -> None:
    if kernel_size not in _SUPPORTED_KERNELS:
        raise ValueError(f'sparse conv supports kernel sizes {_SUPPORTED_KERNELS}, got {kernel_size}')
    if stride not in _SUPPORTED_STRIDES:
        raise ValueError(f'sparse conv supports strides {_SUPPORTED_STRIDES}, got {stride}')
    if not isinstance(padding, int) or padding < 0:
        raise ValueError(f'padding must be a non-negative int, got {padding!r}')


# --------------------------------------------------------------------------------------------------
# Buffers
# --------------------------------------------------------------------------------------------------
def new_padded_buffer(n: int, c: int, h: int, w: int, pad: int = 1, *,
                      dtype: torch.dtype = torch.float32,
                      device: Union[str, torch.device, None] = None) -> Tensor:
    """Allocates a zero channels-last buffer ``(n, h + 2 pad, w + 2 pad, c)``.

    Args:
        n: Batch size.
        c: Channels.
        h: Interior height.
        w: Interior width.
        pad: Width of the zero border (the largest conv padding that will read this buffer).
        dtype: Data type.
        device: Device.

    Returns:
        A contiguous zero tensor of shape ``(n, h + 2 pad, w + 2 pad, c)``.
    """
    return torch.zeros(n, h + 2 * pad, w + 2 * pad, c, dtype=dtype, device=device)


def to_padded_nhwc(x: Tensor, pad: int = 1, out: Optional[Tensor] = None) -> Tensor:
    """Copies an NCHW map into a zero-bordered channels-last buffer.

    Do this once per stage, not per conv: the conversion costs a sizeable part of a dense conv.

    Args:
        x: Input ``(N, C, H, W)`` (any memory format; channels-last input copies fastest).
        pad: Border width.
        out: Optional existing buffer ``(N, H + 2 pad, W + 2 pad, C)`` to fill; its border must be zero
            (it is not re-zeroed).

    Returns:
        The buffer ``(N, H + 2 pad, W + 2 pad, C)``, contiguous.
    """
    if x.dim() != 4:
        raise ValueError(f'expected an NCHW tensor, got shape {tuple(x.shape)}')
    n, c, h, w = x.shape
    if out is None:
        out = new_padded_buffer(n, c, h, w, pad, dtype=x.dtype, device=x.device)
    elif tuple(out.shape) != (n, h + 2 * pad, w + 2 * pad, c) or not out.is_contiguous():
        raise ValueError(f'out must be a contiguous buffer of shape {(n, h + 2 * pad, w + 2 * pad, c)}, '
                         f'got {tuple(out.shape)}')
    out[:, pad:pad + h, pad:pad + w, :].copy_(x.permute(0, 2, 3, 1))
    return out


def padded_interior(buf: Tensor, pad: int = 1) -> Tensor:
    """NCHW view (no copy, channels-last strides) of the interior of a padded buffer.

    Args:
        buf: Buffer ``(N, H + 2 pad, W + 2 pad, C)``.
        pad: Border width.

    Returns:
        A view of shape ``(N, C, H, W)``; writing into it writes the buffer.
    """
    if pad == 0:
        return buf.permute(0, 3, 1, 2)
    return buf[:, pad:-pad, pad:-pad, :].permute(0, 3, 1, 2)


def _check_buffer(buf: Tensor, name: str = 'buffer') -> None:
    if buf.dim() != 4 or not buf.is_contiguous():
        raise ValueError(f'{name} must be a contiguous channels-last (N, Hp, Wp, C) tensor, '
                         f'got shape {tuple(buf.shape)} contiguous={buf.is_contiguous()}')


# --------------------------------------------------------------------------------------------------
# Index
# --------------------------------------------------------------------------------------------------
class SparseIndex:
    """Active output positions of one mask at one resolution, as flat row indices into padded buffers.

    Build it once per exit mask and resolution; every conv whose *output* lives at this resolution
    (3x3 or 1x1 at the same resolution, or a stride-2 conv reading a 2x finer buffer) reuses it. Tables
    depend only on geometry and are built lazily and cached:

    * :meth:`rows` - flat row of each active position in an output buffer with a given border
      (used by scatter, residual gather and 1x1 convs),
    * :meth:`windows` - flat row of the top-left tap of each active position's window in an input
      buffer, plus the ``k*k`` neighbour rows (used by the gather).

    Attributes:
        mask: The bool mask ``(N, H, W)`` it was built from.
        n, y, x: int64 coordinates of the active positions (row-major order: image, row, column).
        num_active: Number of active positions ``M``.
        active_fraction: ``M / (N * H * W)``.
    """

    def __init__(self, mask: Tensor, n: Tensor, y: Tensor, x: Tensor) -> None:
        self.mask = mask
        self.n, self.y, self.x = n, y, x
        self.batch, self.height, self.width = (int(s) for s in mask.shape)
        self.num_active = int(n.numel())
        total = self.batch * self.height * self.width
        self.active_fraction = self.num_active / total if total else 0.0
        self._rows: Dict[Tuple[int, int], Tensor] = {}
        self._windows: Dict[Tuple[int, int, int, int, int, int], Tuple[Tensor, Tensor]] = {}

    @classmethod
    def build(cls, mask: Tensor) -> 'SparseIndex':
        """Builds the index of a mask.

        Args:
            mask: Bool tensor ``(N, H, W)`` at the output resolution, True = compute.

        Returns:
            The index (on the mask's device).

        Raises:
            TypeError: If the mask is not bool.
            ValueError: If the mask is not 3-D.
        """
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
            raise TypeError(f'mask must be a bool tensor, got '
                            f'{mask.dtype if isinstance(mask, Tensor) else type(mask).__name__}')
        if mask.dim() != 3:
            raise ValueError(f'mask must have shape (N, H_out, W_out), got {tuple(mask.shape)}')
        n, y, x = mask.nonzero(as_tuple=True)
        return cls(mask, n, y, x)

    @property
    def device(self) -> torch.device:
        """Device of the index tensors."""
        return self.mask.device

    @property
    def shape(self) -> Tuple[int, int, int]:
        """``(N, H, W)`` of the mask."""
        return self.batch, self.height, self.width

    def rows(self, pad: int = 1) -> Tensor:
        """Flat row index of every active position in a buffer ``(N, H + 2 pad, W + 2 pad, C)``.

        Args:
            pad: Border width of the buffer.

        Returns:
            int64 tensor ``(M,)``, cached.
        """
        key = (pad, 0)
        r = self._rows.get(key)
        if r is None:
            hp, wp = self.height + 2 * pad, self.width + 2 * pad
            r = (self.n * hp + self.y + pad) * wp + self.x + pad
            self._rows[key] = r
        return r

    def windows(self, in_hw: Optional[Tuple[int, int]] = None, kernel_size: int = 3, stride: int = 1,
                padding: Optional[int] = None, in_pad: int = 1) -> Tuple[Tensor, Tensor]:
        """Window tables of a conv whose output is this index's grid.

        Args:
            in_hw: Interior ``(H_in, W_in)`` of the input buffer; default: this index's ``(H, W)``
                (stride 1, same resolution). For a stride-2 conv pass the finer input's size.
            kernel_size: 1 or 3.
            stride: 1 or 2.
            padding: Conv zero padding; default ``kernel_size // 2``. Must be ``<= in_pad``.
            in_pad: Border width of the input buffer.

        Returns:
            ``(top_left, neighbours)``: int64 ``(M,)`` flat row of each window's top-left tap in the
            input buffer, and int64 ``(M * k * k,)`` flat rows of all taps, ordered (position, ky, kx),
            matching :func:`conv_weight_matrix`. Cached.

        Raises:
            ValueError: On unsupported geometry, a border too thin for the padding, or an output size
                that does not match this index's grid.
        """
        if padding is None:
            padding = kernel_size // 2
        _check_geometry(kernel_size, stride, padding)
        if in_hw is None:
            in_hw = (self.height, self.width)
        h_in, w_in = int(in_hw[0]), int(in_hw[1])
        if padding > in_pad:
            raise ValueError(f'conv padding {padding} exceeds the input buffer border {in_pad}')
        h_out = conv_output_size(h_in, kernel_size, stride, padding)
        w_out = conv_output_size(w_in, kernel_size, stride, padding)
        if (h_out, w_out) != (self.height, self.width):
            raise ValueError(
                f'mask spatial shape {(self.height, self.width)} does not match the conv output '
                f'{(h_out, w_out)} of input {(h_in, w_in)} (kernel {kernel_size}, stride {stride}, '
                f'padding {padding})')
        key = (h_in, w_in, kernel_size, stride, padding, in_pad)
        t = self._windows.get(key)
        if t is None:
            hp, wp = h_in + 2 * in_pad, w_in + 2 * in_pad
            off = in_pad - padding  # buffer coordinate of conv input coordinate -padding
            top_left = (self.n * hp + self.y * stride + off) * wp + self.x * stride + off
            taps = torch.tensor([ky * wp + kx for ky in range(kernel_size) for kx in range(kernel_size)],
                                dtype=torch.int64, device=self.device)
            neighbours = (top_left[:, None] + taps[None, :]).reshape(-1)
            t = (top_left, neighbours)
            self._windows[key] = t
        return t

    def input_footprint(self, in_hw: Tuple[int, int], kernel_size: int = 3, stride: int = 2,
                        padding: Optional[int] = None) -> Tensor:
        """Mask of the input positions that the active outputs' windows read.

        Useful for chains of stride-2 convs (HRNet fuse layers i -> i+2): the intermediate conv must be
        computed on the footprint of the next one to keep the result exact.

        Args:
            in_hw: Input size ``(H_in, W_in)``.
            kernel_size: 1 or 3.
            stride: 1 or 2.
            padding: Conv padding; default ``kernel_size // 2``.

        Returns:
            Bool tensor ``(N, H_in, W_in)``.
        """
        if padding is None:
            padding = kernel_size // 2
        _, nb = self.windows(in_hw, kernel_size, stride, padding, in_pad=padding)
        h_in, w_in = in_hw
        grid = torch.zeros(self.batch * (h_in + 2 * padding) * (w_in + 2 * padding), dtype=torch.bool,
                           device=self.device)
        grid[nb] = True
        grid = grid.view(self.batch, h_in + 2 * padding, w_in + 2 * padding)
        return grid[:, padding:padding + h_in, padding:padding + w_in].contiguous()

    def __repr__(self) -> str:
        return (f'{type(self).__name__}(shape={self.shape}, active={self.num_active}, '
                f'fraction={self.active_fraction:.3f})')


# --------------------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------------------
def conv_weight_matrix(weight: Tensor) -> Tensor:
    """Reshapes a conv weight ``(Cout, Cin, k, k)`` into the GEMM matrix ``(k*k*Cin, Cout)``.

    Row order is (ky, kx, cin), matching the gathered window ``(M, k, k, Cin)`` of
    :meth:`SparseIndex.windows`.

    Args:
        weight: Conv weight ``(Cout, Cin, k, k)``.

    Returns:
        Contiguous ``(k*k*Cin, Cout)`` tensor.
    """
    if weight.dim() != 4 or weight.shape[2] != weight.shape[3]:
        raise ValueError(f'expected a square conv weight (Cout, Cin, k, k), got {tuple(weight.shape)}')
    cout = weight.shape[0]
    return weight.permute(2, 3, 1, 0).reshape(-1, cout).contiguous()


def fold_bn(weight: Tensor, bias: Optional[Tensor], bn: torch.nn.modules.batchnorm._BatchNorm
            ) -> Tuple[Tensor, Tensor]:
    """Folds an inference-mode BatchNorm that follows a conv into the conv's weight and bias.

    Args:
        weight: Conv weight ``(Cout, Cin, k, k)``.
        bias: Conv bias ``(Cout,)`` or None.
        bn: The BatchNorm (running statistics are used).

    Returns:
        ``(weight, bias)`` of the equivalent conv.
    """
    std = torch.sqrt(bn.running_var + bn.eps)
    gamma = bn.weight if bn.weight is not None else torch.ones_like(std)
    beta = bn.bias if bn.bias is not None else torch.zeros_like(std)
    scale = gamma / std
    b = bias if bias is not None else torch.zeros_like(bn.running_mean)
    return weight * scale.reshape(-1, 1, 1, 1), beta + (b - bn.running_mean) * scale


@dataclass
class PackedConv:
    """A conv prepared for masked inference: both the GEMM matrix and the dense weight.

    Attributes:
        weight: ``(Cout, Cin, k, k)`` contiguous weight, used by the dense fallback.
        wmat: ``(k*k*Cin, Cout)`` GEMM matrix, used by the sparse path.
        bias: ``(Cout,)`` or None.
        stride: 1 or 2.
        padding: Zero padding.
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
    def from_weight(cls, weight: Tensor, bias: Optional[Tensor] = None, stride: int = 1,
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
        _check_geometry(k, stride, padding)
        weight = weight.detach().contiguous()
        return cls(weight=weight, wmat=conv_weight_matrix(weight),
                   bias=None if bias is None else bias.detach().contiguous(),
                   stride=stride, padding=padding)

    @classmethod
    def from_conv(cls, conv: torch.nn.Conv2d,
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

    def rows(self, buf: Tensor, idx: SparseIndex, *, residual: Optional[Tensor] = None,
             relu: bool = False, in_pad: int = 1, res_pad: int = 1, **kwargs) -> Tensor:
        """:func:`sparse_conv_rows` with this conv's weights and geometry."""
        return sparse_conv_rows(buf, idx, self.wmat, self.bias, stride=self.stride,
                                padding=self.padding, residual=residual, relu=relu, in_pad=in_pad,
                                res_pad=res_pad, dense_weight=self.weight, **kwargs)

    def apply(self, buf: Tensor, idx: SparseIndex, out_buf: Tensor, *,
              residual: Optional[Tensor] = None, relu: bool = False, in_pad: int = 1,
              out_pad: int = 1, res_pad: int = 1, **kwargs) -> Tensor:
        """:func:`sparse_conv_buffer` with this conv's weights and geometry."""
        return sparse_conv_buffer(buf, idx, self.wmat, self.bias, out_buf, stride=self.stride,
                                  padding=self.padding, residual=residual, relu=relu, in_pad=in_pad,
                                  out_pad=out_pad, res_pad=res_pad, dense_weight=self.weight, **kwargs)


def _kernel_from_wmat(wmat: Tensor, cin: int) -> int:
    if wmat.dim() != 2 or cin == 0 or wmat.shape[0] % cin:
        raise ValueError(f'weight matrix must be (k*k*Cin, Cout) with Cin={cin}, got {tuple(wmat.shape)}')
    kk = wmat.shape[0] // cin
    k = math.isqrt(kk)
    if k * k != kk or k not in _SUPPORTED_KERNELS:
        raise ValueError(f'weight matrix rows {wmat.shape[0]} = {kk} x Cin: kernel must be 1x1 or 3x3')
    return k


# --------------------------------------------------------------------------------------------------
# Row kernels (PyTorch reference / CPU path)
# --------------------------------------------------------------------------------------------------
def gather_rows(buf: Tensor, idx: SparseIndex, pad: int = 1) -> Tensor:
    """Gathers the feature rows of the active positions from a padded buffer.

    Args:
        buf: Buffer ``(N, H + 2 pad, W + 2 pad, C)`` at the index's resolution.
        pad: Its border width.

    Returns:
        ``(M, C)`` compact rows (a copy).
    """
    _check_buffer(buf)
    _check_buffer_matches(buf, idx, pad, 'buffer')
    return torch.index_select(buf.view(-1, buf.shape[-1]), 0, idx.rows(pad))


def scatter_rows(buf: Tensor, idx: SparseIndex, rows: Tensor, pad: int = 1) -> Tensor:
    """Writes compact rows into the active positions of a padded buffer, in place.

    Stopped positions and the border are left untouched.

    Args:
        buf: Buffer ``(N, H + 2 pad, W + 2 pad, C)`` at the index's resolution.
        idx: The index.
        rows: ``(M, C)``.
        pad: Border width of ``buf``.

    Returns:
        ``buf``.
    """
    _check_buffer(buf)
    _check_buffer_matches(buf, idx, pad, 'buffer')
    if rows.shape != (idx.num_active, buf.shape[-1]):
        raise ValueError(f'rows must be {(idx.num_active, buf.shape[-1])}, got {tuple(rows.shape)}')
    buf.view(-1, buf.shape[-1]).index_copy_(0, idx.rows(pad), rows)
    return buf


def _check_buffer_matches(buf: Tensor, idx: SparseIndex, pad: int, name: str) -> None:
    want = (idx.batch, idx.height + 2 * pad, idx.width + 2 * pad)
    if tuple(buf.shape[:3]) != want:
        raise ValueError(f'{name} of shape {tuple(buf.shape)} does not match the index grid '
                         f'{idx.shape} with border {pad} (expected (N, Hp, Wp) = {want})')


def _chunk_rows(k: int, cin: int, chunk_rows: Optional[int]) -> int:
    if chunk_rows is not None:
        return max(1, int(chunk_rows))
    rows = _CHUNK_BYTES // max(1, 4 * k * k * cin)
    return max(_MIN_CHUNK_ROWS, min(_MAX_CHUNK_ROWS, rows))


def _residual_rows(residual: Tensor, idx: SparseIndex, res_pad: int, cout: int) -> Tuple[Tensor, bool]:
    """Returns ``(source, is_buffer)``: a flat buffer view to gather from, or compact rows."""
    if residual.dim() == 4:
        _check_buffer(residual, 'residual buffer')
        _check_buffer_matches(residual, idx, res_pad, 'residual buffer')
        if residual.shape[-1] != cout:
            raise ValueError(f'residual has {residual.shape[-1]} channels, conv output has {cout}')
        return residual.view(-1, cout), True
    if tuple(residual.shape) != (idx.num_active, cout):
        raise ValueError(f'residual rows must be {(idx.num_active, cout)} or a padded buffer, '
                         f'got {tuple(residual.shape)}')
    return residual, False


def _dense_weight(wmat: Tensor, k: int, cin: int) -> Tensor:
    return wmat.view(k, k, cin, -1).permute(3, 2, 0, 1).contiguous()


def _dense_nhwc(buf: Tensor, weight: Tensor, bias: Optional[Tensor], h_in: int, w_in: int, stride: int,
                padding: int, in_pad: int) -> Tensor:
    """Dense conv of a padded buffer; returns the output as a contiguous NHWC tensor."""
    off = in_pad - padding
    k = weight.shape[-1]
    # crop the buffer to exactly the conv's zero-padded input, then convolve with padding 0
    x = buf[:, off:off + h_in + 2 * padding, off:off + w_in + 2 * padding, :].permute(0, 3, 1, 2)
    y = F.conv2d(x, weight, bias, stride=stride)
    del k
    # oneDNN returns channels-last output for channels-last input; .contiguous() is then free
    return y.permute(0, 2, 3, 1).contiguous()


def sparse_conv_rows(buf: Tensor, idx: SparseIndex, wmat: Tensor, bias: Optional[Tensor] = None, *,
                     stride: int = 1, padding: Optional[int] = None, residual: Optional[Tensor] = None,
                     relu: bool = False, in_pad: int = 1, res_pad: int = 1,
                     out: Optional[Tensor] = None, chunk_rows: Optional[int] = None,
                     dense_weight: Optional[Tensor] = None, dense_threshold: Optional[float] = None,
                     backend: str = 'auto') -> Tensor:
    """Computes a conv (+ bias, residual, ReLU) at the active positions only, as compact rows.

    ``y[i] = relu(sum_taps buf[window_i] @ wmat + bias + residual[i])`` for the ``M`` active positions of
    ``idx`` in its row order. The input buffer is read in full (stopped positions included).

    Args:
        buf: Input buffer ``(N, H_in + 2 in_pad, W_in + 2 in_pad, Cin)``, contiguous, zero border.
            ``H_in = H`` for stride 1; for stride 2 the finer map (e.g. ``2 H``).
        idx: Index of the output mask ``(N, H, W)``.
        wmat: ``(k*k*Cin, Cout)`` from :func:`conv_weight_matrix` (k = 1 or 3 is inferred from it).
        bias: ``(Cout,)`` or None (BN folded in by the caller).
        stride: 1 or 2.
        padding: Conv padding, default ``k // 2``; must be ``<= in_pad``.
        residual: Added before the ReLU: compact rows ``(M, Cout)`` or a padded buffer
            ``(N, H + 2 res_pad, W + 2 res_pad, Cout)`` at the output resolution (gathered per chunk).
        relu: Apply ReLU last.
        in_pad: Border width of ``buf``.
        res_pad: Border width of a residual buffer.
        out: Optional ``(M, Cout)`` contiguous tensor receiving the rows.
        chunk_rows: Active rows per gather/GEMM chunk; default sized to ~1 MiB of gathered data.
        dense_weight: ``(Cout, Cin, k, k)`` weight for the dense fallback (derived from ``wmat`` if
            None, at the cost of a reshape copy).
        dense_threshold: Active fraction above which a dense conv + row gather is used; default
            :data:`DENSE_CROSSOVER`. Pass ``1.0`` (or more) to force the sparse path.
        backend: ``'auto'`` (Triton for CUDA tensors when importable, else PyTorch), ``'torch'`` or
            ``'triton'`` (also runs on CPU tensors under ``TRITON_INTERPRET=1``).

    Returns:
        ``(M, Cout)`` rows (``out`` if given).
    """
    _check_buffer(buf, 'input buffer')
    cin = buf.shape[-1]
    k = _kernel_from_wmat(wmat, cin)
    padding = k // 2 if padding is None else padding
    h_in = buf.shape[1] - 2 * in_pad
    w_in = buf.shape[2] - 2 * in_pad
    if buf.shape[0] != idx.batch:
        raise ValueError(f'batch mismatch: input buffer has {buf.shape[0]} images, mask has {idx.batch}')
    top_left, neighbours = idx.windows((h_in, w_in), k, stride, padding, in_pad)
    cout = wmat.shape[1]
    m = idx.num_active
    if bias is not None and tuple(bias.shape) != (cout,):
        raise ValueError(f'bias must be ({cout},), got {tuple(bias.shape)}')
    if out is None:
        out = torch.empty(m, cout, dtype=buf.dtype, device=buf.device)
    elif tuple(out.shape) != (m, cout) or not out.is_contiguous():
        raise ValueError(f'out must be a contiguous ({m}, {cout}) tensor, got {tuple(out.shape)}')
    res_src, res_is_buf = (None, False) if residual is None else _residual_rows(residual, idx, res_pad,
                                                                               cout)
    if m == 0:
        return out

    if _use_triton(backend, buf):
        from .sparse_conv_triton import sparse_conv_rows_triton
        return sparse_conv_rows_triton(buf, top_left, wmat, bias, in_row_width=buf.shape[2],
                                       kernel_size=k, residual=res_src,
                                       residual_rows=idx.rows(res_pad) if res_is_buf else None,
                                       relu=relu, out=out)

    threshold = DENSE_CROSSOVER if dense_threshold is None else dense_threshold
    if idx.active_fraction > threshold:
        w4 = dense_weight if dense_weight is not None else _dense_weight(wmat, k, cin)
        y = _dense_nhwc(buf, w4, bias, h_in, w_in, stride, padding, in_pad).view(-1, cout)
        torch.index_select(y, 0, idx.rows(0), out=out)
        if res_src is not None:
            out.add_(torch.index_select(res_src, 0, idx.rows(res_pad)) if res_is_buf else res_src)
        if relu:
            out.relu_()
        return out

    flat = buf.view(-1, cin)
    kkc = k * k * cin
    step = _chunk_rows(k, cin, chunk_rows)
    res_rows_all = idx.rows(res_pad) if res_is_buf else None
    for s in range(0, m, step):
        e = min(m, s + step)
        if k == 1:
            a = torch.index_select(flat, 0, top_left[s:e])
        else:
            a = torch.index_select(flat, 0, neighbours[s * k * k:e * k * k]).view(e - s, kkc)
        o = out[s:e]
        if bias is not None:
            torch.addmm(bias, a, wmat, out=o)
        else:
            torch.mm(a, wmat, out=o)
        # epilogue on the chunk while it is still in cache
        if res_src is not None:
            o.add_(torch.index_select(res_src, 0, res_rows_all[s:e]) if res_is_buf else res_src[s:e])
        if relu:
            o.relu_()
    return out


def dense_conv_buffer(buf: Tensor, wmat_or_weight: Tensor, bias: Optional[Tensor], out_buf: Tensor, *,
                      stride: int = 1, padding: Optional[int] = None,
                      residual: Optional[Tensor] = None, relu: bool = False,
                      mask: Optional[Tensor] = None, in_pad: int = 1, out_pad: int = 1,
                      res_pad: int = 1) -> Tensor:
    """Dense conv (+ bias, residual, ReLU) from one padded buffer into another.

    The fallback of :func:`sparse_conv_buffer`, usable on its own for the always-dense parts
    (no NCHW<->NHWC copies: the buffers are viewed as channels-last NCHW).

    Args:
        buf: Input buffer ``(N, H_in + 2 in_pad, W_in + 2 in_pad, Cin)``.
        wmat_or_weight: ``(Cout, Cin, k, k)`` weight (preferred) or a ``(k*k*Cin, Cout)`` matrix.
        bias: ``(Cout,)`` or None.
        out_buf: Output buffer ``(N, H + 2 out_pad, W + 2 out_pad, Cout)``.
        stride: 1 or 2.
        padding: Default ``k // 2``.
        residual: Padded buffer ``(N, H + 2 res_pad, W + 2 res_pad, Cout)`` added before the ReLU.
        relu: Apply ReLU.
        mask: Optional bool ``(N, H, W)``: only these positions of ``out_buf`` are written.
        in_pad: Border of ``buf``.
        out_pad: Border of ``out_buf``.
        res_pad: Border of ``residual``.

    Returns:
        ``out_buf``.
    """
    _check_buffer(buf, 'input buffer')
    _check_buffer(out_buf, 'output buffer')
    cin = buf.shape[-1]
    if wmat_or_weight.dim() == 2:
        k = _kernel_from_wmat(wmat_or_weight, cin)
        weight = _dense_weight(wmat_or_weight, k, cin)
    else:
        weight = wmat_or_weight
        k = int(weight.shape[-1])
    padding = k // 2 if padding is None else padding
    _check_geometry(k, stride, padding)
    if padding > in_pad:
        raise ValueError(f'conv padding {padding} exceeds the input buffer border {in_pad}')
    h_in, w_in = buf.shape[1] - 2 * in_pad, buf.shape[2] - 2 * in_pad
    y = _dense_nhwc(buf, weight, bias, h_in, w_in, stride, padding, in_pad)
    ho, wo = y.shape[1], y.shape[2]
    if tuple(out_buf.shape) != (buf.shape[0], ho + 2 * out_pad, wo + 2 * out_pad, y.shape[-1]):
        raise ValueError(f'output buffer {tuple(out_buf.shape)} does not fit the conv output '
                         f'{(buf.shape[0], ho, wo, y.shape[-1])} with border {out_pad}')
    if residual is not None:
        y.add_(residual[:, res_pad:res_pad + ho, res_pad:res_pad + wo, :])
    if relu:
        y.relu_()
    dst = out_buf[:, out_pad:out_pad + ho, out_pad:out_pad + wo, :]
    if mask is None or bool(mask.all()):
        dst.copy_(y)
    else:
        # copy semantics: stopped positions keep the buffer's value
        dst.copy_(torch.where(mask[..., None], y, dst))
    return out_buf


def sparse_conv_buffer(buf: Tensor, idx: SparseIndex, wmat: Tensor, bias: Optional[Tensor],
                       out_buf: Tensor, *, stride: int = 1, padding: Optional[int] = None,
                       residual: Optional[Tensor] = None, relu: bool = False, in_pad: int = 1,
                       out_pad: int = 1, res_pad: int = 1, chunk_rows: Optional[int] = None,
                       dense_weight: Optional[Tensor] = None, dense_threshold: Optional[float] = None,
                       backend: str = 'auto') -> Tensor:
    """Masked conv from a padded buffer into a padded buffer: active positions written, others kept.

    The stage-level entry point: picks the dense path above ``dense_threshold`` active fraction
    (writing only the active positions, so stopped ones keep their value either way), otherwise
    gather + GEMM + epilogue per chunk and a scatter of the rows (Triton: fused, scattered in-kernel).

    Args:
        buf: Input buffer (see :func:`sparse_conv_rows`).
        idx: Index of the output mask.
        wmat: ``(k*k*Cin, Cout)`` weight matrix.
        bias: ``(Cout,)`` or None.
        out_buf: Output buffer ``(N, H + 2 out_pad, W + 2 out_pad, Cout)``; must not alias ``buf``.
        stride: 1 or 2.
        padding: Default ``k // 2``.
        residual: Compact rows ``(M, Cout)`` or a padded buffer at the output resolution (may be
            ``out_buf`` itself: it is read before being written per chunk... only if rows are
            disjoint, which they are: each active row is read then written once).
        relu: Apply ReLU.
        in_pad: Border of ``buf``.
        out_pad: Border of ``out_buf``.
        res_pad: Border of a residual buffer.
        chunk_rows: See :func:`sparse_conv_rows`.
        dense_weight: ``(Cout, Cin, k, k)`` for the dense fallback.
        dense_threshold: Default :data:`DENSE_CROSSOVER`.
        backend: ``'auto'``, ``'torch'`` or ``'triton'``.

    Returns:
        ``out_buf``.
    """
    _check_buffer(out_buf, 'output buffer')
    _check_buffer_matches(out_buf, idx, out_pad, 'output buffer')
    if out_buf.data_ptr() == buf.data_ptr():
        raise ValueError('out_buf must not alias the input buffer (windows read neighbours)')
    if idx.num_active == 0:
        return out_buf
    threshold = DENSE_CROSSOVER if dense_threshold is None else dense_threshold
    if idx.active_fraction > threshold and not _use_triton(backend, buf):
        if residual is not None and residual.dim() != 4:
            rows = sparse_conv_rows(buf, idx, wmat, bias, stride=stride, padding=padding,
                                    residual=residual, relu=relu, in_pad=in_pad, res_pad=res_pad,
                                    dense_weight=dense_weight, dense_threshold=threshold,
                                    backend='torch')
            return scatter_rows(out_buf, idx, rows, out_pad)
        return dense_conv_buffer(buf, dense_weight if dense_weight is not None else wmat, bias, out_buf,
                                 stride=stride, padding=padding, residual=residual, relu=relu,
                                 mask=None if idx.num_active == idx.batch * idx.height * idx.width
                                 else idx.mask,
                                 in_pad=in_pad, out_pad=out_pad, res_pad=res_pad)
    if _use_triton(backend, buf):
        cin = buf.shape[-1]
        k = _kernel_from_wmat(wmat, cin)
        pad_ = k // 2 if padding is None else padding
        h_in, w_in = buf.shape[1] - 2 * in_pad, buf.shape[2] - 2 * in_pad
        if buf.shape[0] != idx.batch:
            raise ValueError(f'batch mismatch: input buffer has {buf.shape[0]} images, '
                             f'mask has {idx.batch}')
        top_left, _ = idx.windows((h_in, w_in), k, stride, pad_, in_pad)
        cout = wmat.shape[1]
        if out_buf.shape[-1] != cout:
            raise ValueError(f'output buffer has {out_buf.shape[-1]} channels, conv has {cout}')
        res_src, res_is_buf = (None, False) if residual is None else _residual_rows(residual, idx,
                                                                                   res_pad, cout)
        from .sparse_conv_triton import sparse_conv_rows_triton
        sparse_conv_rows_triton(buf, top_left, wmat, bias, in_row_width=buf.shape[2], kernel_size=k,
                                residual=res_src,
                                residual_rows=idx.rows(res_pad) if res_is_buf else None, relu=relu,
                                out=out_buf.view(-1, cout), out_rows=idx.rows(out_pad))
        return out_buf
    rows = sparse_conv_rows(buf, idx, wmat, bias, stride=stride, padding=padding, residual=residual,
                            relu=relu, in_pad=in_pad, res_pad=res_pad, chunk_rows=chunk_rows,
                            dense_threshold=float('inf'), backend='torch')
    return scatter_rows(out_buf, idx, rows, out_pad)


def _triton_available() -> bool:
    try:
        from .sparse_conv_triton import HAS_TRITON
    except ImportError:  # pragma: no cover - the module itself guards the triton import
        return False
    return HAS_TRITON


def _use_triton(backend: str, t: Tensor) -> bool:
    if backend == 'torch':
        return False
    if backend == 'triton':
        if not _triton_available():
            raise RuntimeError("backend='triton' requested but triton is not importable")
        return True
    if backend != 'auto':
        raise ValueError(f"backend must be 'auto', 'torch' or 'triton', got {backend!r}")
    return t.is_cuda and _triton_available()


# --------------------------------------------------------------------------------------------------
# Functional op on NCHW tensors
# --------------------------------------------------------------------------------------------------
def sparse_conv2d(input: Tensor, weight: Tensor, bias: Optional[Tensor], mask: Tensor, stride: int = 1,
                  padding: int = 0, out: Optional[Tensor] = None, *,
                  dense_threshold: Optional[float] = None, backend: str = 'auto') -> Tensor:
    """Masked 2-D convolution: the dense conv's values at active output positions only.

    Every window reads the full input (including positions the caller considers stopped, which hold
    whatever value the caller put there); zero padding at the border as in :func:`F.conv2d`.

    * Active positions (``mask == True``) hold exactly ``F.conv2d(input, weight, bias, stride, padding)``
      (up to fp32 summation order).
    * Stopped positions hold 0 - or, if ``out`` is given, the op writes the active positions into ``out``
      in place and leaves its stopped positions untouched (this is how a caller gets "copy" fill at zero
      cost: pass the previous values as ``out``).
    * An empty mask computes nothing (zeros, or ``out`` untouched); above ``dense_threshold`` active
      fraction (default :data:`DENSE_CROSSOVER`) the dense conv is run and masked; a full mask is the
      dense conv.

    This is the per-call convenience API: it converts the input to a padded channels-last buffer and
    builds the index on every call. A network running many convs on one mask should use
    :class:`SparseIndex` + :func:`sparse_conv_buffer` / :func:`sparse_conv_rows` instead.

    Args:
        input: ``(N, C, H, W)`` floating tensor.
        weight: ``(Cout, C, k, k)``, k in {1, 3}.
        bias: ``(Cout,)`` or None.
        mask: Bool ``(N, H_out, W_out)``, True = compute; each image has its own mask.
        stride: 1 or 2.
        padding: Zero padding (int).
        out: Optional ``(N, Cout, H_out, W_out)`` tensor written in place at active positions.
        dense_threshold: Active fraction above which the dense conv is used.
        backend: ``'auto'`` (Triton for CUDA tensors if importable), ``'torch'`` or ``'triton'``.

    Returns:
        ``(N, Cout, H_out, W_out)`` tensor (``out`` if given). A freshly allocated result may be in
        channels-last memory format.

    Raises:
        TypeError: Non-bool mask, non-floating input, dtype or device mismatches.
        ValueError: Unsupported kernel size or stride, bad shapes, batch or mask/output size mismatch.
    """
    if not isinstance(input, Tensor) or input.dim() != 4:
        raise ValueError(f'input must be (N, C, H, W), got '
                         f'{tuple(input.shape) if isinstance(input, Tensor) else type(input).__name__}')
    if not input.is_floating_point():
        raise TypeError(f'input must be floating point, got {input.dtype}')
    if weight.dim() != 4 or weight.shape[2] != weight.shape[3]:
        raise ValueError(f'weight must be (Cout, Cin, k, k), got {tuple(weight.shape)}')
    if weight.dtype != input.dtype or (bias is not None and bias.dtype != input.dtype):
        raise TypeError(f'dtype mismatch: input {input.dtype}, weight {weight.dtype}, '
                        f'bias {None if bias is None else bias.dtype}')
    if weight.device != input.device or mask.device != input.device:
        raise TypeError('input, weight and mask must be on the same device')
    n, c, h, w = input.shape
    cout, cin, k, _ = weight.shape
    if cin != c:
        raise ValueError(f'weight expects {cin} input channels, input has {c}')
    _check_geometry(k, stride, padding)
    if bias is not None and tuple(bias.shape) != (cout,):
        raise ValueError(f'bias must be ({cout},), got {tuple(bias.shape)}')
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
        raise TypeError(f'mask must be a bool tensor, got '
                        f'{mask.dtype if isinstance(mask, Tensor) else type(mask).__name__}')
    ho, wo = conv_output_size(h, k, stride, padding), conv_output_size(w, k, stride, padding)
    if ho <= 0 or wo <= 0:
        raise ValueError(f'input {(h, w)} too small for kernel {k} with padding {padding}')
    if mask.dim() != 3:
        raise ValueError(f'mask must be (N, H_out, W_out) = {(n, ho, wo)}, got {tuple(mask.shape)}')
    if mask.shape[0] != n:
        raise ValueError(f'batch mismatch: input has {n} images, mask has {mask.shape[0]}')
    if tuple(mask.shape[1:]) != (ho, wo):
        raise ValueError(f'mask spatial shape {tuple(mask.shape[1:])} does not match the conv output '
                         f'{(ho, wo)} (input {(h, w)}, kernel {k}, stride {stride}, padding {padding})')
    if out is not None:
        if tuple(out.shape) != (n, cout, ho, wo):
            raise ValueError(f'out must have the output shape {(n, cout, ho, wo)}, got {tuple(out.shape)}')
        if out.dtype != input.dtype or out.device != input.device:
            raise TypeError('out must have the dtype and device of input')

    idx = SparseIndex.build(mask)
    m = idx.num_active
    if m == 0:
        return out if out is not None else input.new_zeros(n, cout, ho, wo)
    threshold = DENSE_CROSSOVER if dense_threshold is None else dense_threshold
    use_triton = _use_triton(backend, input)
    if not use_triton and idx.active_fraction > threshold:
        y = F.conv2d(input, weight, bias, stride=stride, padding=padding)
        if m == n * ho * wo:
            return y if out is None else out.copy_(y)
        keep = mask[:, None]
        if out is None:
            return y.masked_fill_(~keep, 0)
        return out.copy_(torch.where(keep, y, out))

    buf = to_padded_nhwc(input, padding)
    rows = sparse_conv_rows(buf, idx, conv_weight_matrix(weight), bias, stride=stride, padding=padding,
                            in_pad=padding, dense_threshold=float('inf'),
                            backend='triton' if use_triton else 'torch')
    if out is None:
        res = input.new_zeros(n, ho, wo, cout)
        res.view(-1, cout).index_copy_(0, idx.rows(0), rows)
        return res.permute(0, 3, 1, 2)
    out.permute(0, 2, 3, 1).index_put_((idx.n, idx.y, idx.x), rows)
    return out
