"""Masked ("sparse") 2-D convolution for early-exit inference: the PyTorch path, and the dispatch to the compiled
CPU kernel (:mod:`.sparse_conv_cpu`, same algorithm fused per chunk) and the Triton kernel (CUDA).

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

The stage API is inference-only (it writes into preallocated buffers, which autograd cannot track);
:func:`sparse_conv2d` / :class:`SparseConv2d` fall back to a differentiable dense-and-mask computation
when autograd is active.

Why this representation (measured on the 2-core CPU machines, see the project reference, section 7, and
``tools/analysis_tools/benchmark_masked.py``):

* Features live in a zero-bordered channels-last buffer ``(N, H + 2p, W + 2p, C)``: one pixel is one
  contiguous row of C floats, a window row (k horizontally adjacent pixels, also for stride 2) is one
  contiguous *strip* of ``k * C`` floats, and the strips of a window are at *constant* flat offsets
  ``ky * (W + 2p)`` from its top-left pixel, with no bounds checks (the border is the zero padding).
  Converting NCHW <-> NHWC per layer costs 5-58 % of a dense conv, so the layout is kept through a stage.
* Active positions are turned into flat row indices once (:class:`SparseIndex`); each conv geometry
  (1x1, 3x3 stride 1, 3x3 stride 2 reading a 2x finer input buffer) gets its strip table built lazily
  once and cached on the index, so all convs of a stage share it.
* Work is chunked (1 MiB of gathered data single-threaded, 4 MiB multi-threaded, 256-4096 active
  rows): gather k strips per position into
  ``(rows, k*k*Cin)`` -> one GEMM with the ``(k*k*Cin, Cout)`` weight matrix -> bias / residual / ReLU
  -> scatter, while the chunk is hot in cache. Gathering whole strips instead of single
  pixels halves the gather time at C=18; un-chunked im2col is much slower (cache misses).
* Above a measured active fraction (:func:`dense_crossover`: 0.55-0.75 for the PyTorch ops depending on the
  conv's MACs per position, 0.72-0.9 for the compiled kernel, 0.8-0.9 for its direct algorithm) the dense conv
  is cheaper and is used.
* On CPU the chunk loop runs in a compiled kernel when it is built (:mod:`.sparse_conv_cpu`): each thread owns
  whole chunks (gather, single-threaded GEMM, epilogue, scatter in its own L2), which took 15-25 % off the masked
  HRNet stages and up to 40 % off single convs against the same loop as PyTorch ops (:func:`_torch_sparse`, kept as
  the fallback and as the kernel's test reference). On AVX-512 CPUs its direct algorithm runs float32 convs with
  up to 100 output channels without the gather (:func:`cpu_kernel_direct`; 0.52 instead of 0.88 of the dense time
  for an 18-channel 3x3 conv at 50 % active).
* 1x1 convs between 3x3 convs can also run on compact rows (:func:`gather_rows` once, then
  ``torch.mm(rows, wmat).add_(bias)``), with no gather/scatter at all.
* A second CPU algorithm for 3x3 convs, ``method='segments'`` (:meth:`SparseIndex.segments`): the active
  positions' horizontal runs are packed, with their k input rows, into a small dense image that oneDNN's
  direct convolution processes (3x fewer gathered bytes than im2col, no thin GEMM). It is exact too and
  wins on single thin convs at 128x256 / 64x128, but lost inside the whole masked HRNet, so ``'auto'``
  uses the GEMM (numbers at :func:`choose_method`).
"""
from __future__ import annotations

import itertools
import math
import threading
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from .sparse_conv_cpu import load_cpu_ext

__all__ = [
    'dense_crossover',
    'cpu_kernel_direct',
    'choose_method',
    'SparseIndex',
    'SegmentTables',
    'PackedConv',
    'sparse_conv2d',
    'sparse_conv_rows',
    'sparse_conv_buffer',
    'dense_conv_buffer',
    'gather_rows',
    'scatter_rows',
    'add_weighted_rows_',
    'to_padded_nhwc',
    'padded_interior',
    'padded_row_index',
    'new_padded_buffer',
    'conv_weight_matrix',
    'fold_bn',
    'conv_output_size',
]

# Active fraction above which the dense fallback is used instead of gather + GEMM + scatter, as a
# function of the conv's MACs per output position (k*k*Cin*Cout). The alternative is not the bare dense
# conv: with "copy" semantics the fallback must also write only the active positions (or restore the
# stopped ones), which costs 1.1-1.3x the dense conv for 3x3 and 1.2-3x for thin 1x1 convs. The sparse
# path's GEMM is as efficient as oneDNN's direct conv for wide convs, while its per-row gather/scatter is
# a fixed cost per active position, so thin convs cross over earlier.
# Measured with benchmark_masked.py --sections crossover (fp32, blob masks, HRNet W18-small/W48 branch
# shapes for a 512x1024 input, sparse vs fallback both through sparse_conv_buffer):
# * 2 threads, wall clock, idle machine (the target): 3x3 stride 1 crosses at 0.63-0.75 for 20k-330k
#   MAC/px (C=48..192) and above 0.9 for C=144/384 at 16x32; 3x3 stride 2 at 0.70-0.79 for 1.5k-41k
#   (C=9..48 -> 18..96), 0.85 to >0.9 beyond. (The thinnest 3x3 and the 1x1 rows of that run were
#   disturbed by other jobs.)
# * 1 thread, CPU time: about 0.05-0.15 higher: 3x3 0.67-0.70 at 1.5-3k MAC/px, 0.78-0.83 at 6-21k,
#   0.82 to >0.9 above 40k; 1x1 0.61-0.66 below 2.3k, 0.75 at 5-9k, 0.82 to >0.9 above 20k.
# The points follow the 2-thread numbers, rounded down (near the crossover both paths cost the same).
_CROSSOVER_POINTS: Dict[int, Tuple[Tuple[int, float], ...]] = {
    3: ((1458, 0.62), (20736, 0.66), (82944, 0.66), (331776, 0.75)),
    1: ((324, 0.55), (2304, 0.58), (5184, 0.65), (36864, 0.72), (147456, 0.75)),
}
# The same with the compiled CPU kernel (sparse_conv_cpu), which moves the crossover up. Its GEMM algorithm (float64,
# wide convs, CPUs without AVX-512), measured with the same command (2 threads, idle machine,
# resources/benchmark_masked_crossover_kernel_2026-11-22.txt): 3x3 stride 1 at 0.73 (2916 MAC/px, C=18) and 0.78
# (20736, C=48), above 0.9 for C=36 and >= 72; 3x3 stride 2 at 0.86 (1458) and above 0.9 beyond; 1x1 at 0.74 (324),
# 0.79 (1296), 0.84 (2304-5184), 0.86 (20736), above 0.9 otherwise. (The fallback itself costs 1.1-1.6x the plain
# dense conv: it must keep the stopped positions' values.) Rounded down.
_CROSSOVER_POINTS_KERNEL: Dict[int, Tuple[Tuple[int, float], ...]] = {
    3: ((1458, 0.72), (20736, 0.76), (46656, 0.9)),
    1: ((324, 0.72), (2304, 0.8), (20736, 0.85), (36864, 0.9)),
}
# Its direct algorithm (float32, <= 100 output channels, AVX-512; wider convs keep the GEMM, whose points above
# are 0.9 there too), same command (resources/benchmark_masked_crossover_direct_2026-11-22.txt): every 3x3 shape
# (stride 1 and 2) above 0.9 (sparse 0.85-0.99 of the dense conv at 80-90 % active, the fallback 1.2-1.6); 1x1 at
# 0.83 (324 MAC/px, C=18) and 0.80 (1296, C=36), above 0.9 from 2304 (C=48) on. Rounded down.
_CROSSOVER_POINTS_DIRECT: Dict[int, Tuple[Tuple[int, float], ...]] = {
    3: ((1458, 0.9), ),
    1: ((324, 0.8), (1296, 0.8), (2304, 0.9)),
}


def dense_crossover(kernel_size: int, cin: int, cout: int, compiled: bool = False, direct: bool = False) -> float:
    """Measured active fraction above which the dense conv beats the sparse path on CPU.

    Piecewise-linear in log2(MACs per output position) between the measured points, clamped at the
    ends. ``sparse_conv_buffer`` / ``sparse_conv_rows`` / ``sparse_conv2d`` use it when no
    ``dense_threshold`` is given.

    Args:
        kernel_size: 1 or 3.
        cin: Input channels.
        cout: Output channels.
        compiled: The sparse path is the compiled CPU kernel (its table) rather than the PyTorch ops.
        direct: With ``compiled``: the kernel runs its direct algorithm for this conv (:func:`cpu_kernel_direct`).

    Returns:
        Threshold in [0, 1].
    """
    table = (_CROSSOVER_POINTS_DIRECT if direct else _CROSSOVER_POINTS_KERNEL) if compiled else _CROSSOVER_POINTS
    pts = table[3 if kernel_size != 1 else 1]
    x = math.log2(max(1, kernel_size * kernel_size * cin * cout))
    if x <= math.log2(pts[0][0]):
        return pts[0][1]
    for (m0, f0), (m1, f1) in zip(pts, pts[1:]):
        x0, x1 = math.log2(m0), math.log2(m1)
        if x <= x1:
            return f0 + (f1 - f0) * (x - x0) / (x1 - x0)
    return pts[-1][1]


# Size of one gathered chunk (rows x k*k*Cin fp32), by torch thread count. Single-threaded, ~1 MiB keeps
# the gathered block in the 2 MiB L2 while the GEMM reads it (256-1600 rows best, 4096 rows 20 % worse at
# C=18). With 2 threads every op of a chunk is an OpenMP fork/join, and 1024-4096-row chunks were 10-35 %
# faster than 256-600-row ones (C=18..192, 50 % active, idle machine), so chunks grow to ~4 MiB.
_CHUNK_BYTES_1T, _MIN_CHUNK_ROWS_1T = 1 << 20, 256
_CHUNK_BYTES_MT, _MIN_CHUNK_ROWS_MT = 4 << 20, 1024
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
        # zero the border only: the interior is overwritten below (a full zero fill costs ~as much as the copy)
        out = torch.empty(n, h + 2 * pad, w + 2 * pad, c, dtype=x.dtype, device=x.device)
        if pad:
            out[:, :pad].zero_()
            out[:, pad + h:].zero_()
            out[:, pad:pad + h, :pad].zero_()
            out[:, pad:pad + h, pad + w:].zero_()
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
def padded_row_index(n: Tensor, y: Tensor, x: Tensor, height: int, width: int, pad: int = 1) -> Tensor:
    """Flat row of positions ``(n, y, x)`` of a ``height x width`` map in its padded buffer.

    Args:
        n, y, x: int64 coordinates (image, row, column) in the map's interior.
        height: Interior height.
        width: Interior width.
        pad: Border width of the buffer ``(N, height + 2 pad, width + 2 pad, C)``.

    Returns:
        int64 rows into ``buf.view(-1, C)``.
    """
    return (n * (height + 2 * pad) + y + pad) * (width + 2 * pad) + x + pad


class SparseIndex:
    """Active output positions of one mask at one resolution, as flat row indices into padded buffers.

    Build it once per exit mask and resolution; every conv whose *output* lives at this resolution
    (3x3 or 1x1 at the same resolution, or a stride-2 conv reading a 2x finer buffer) reuses it. Tables
    depend only on geometry and are built lazily and cached:

    * :meth:`rows` - flat row of each active position in a buffer with a given border (used by the
      scatter, residual gathers and :func:`gather_rows`),
    * :meth:`windows` - flat row of the top-left tap of each active position's window in an input
      buffer, plus the rows where its k window strips start (used by the gather),
    * :meth:`stopped_rows` - rows of the stopped positions (used by the dense fallback),
    * :meth:`chunks` - cached chunk views of those tables.

    The tables of an index are cached on it, so keep one index object per mask and resolution (a
    masked HRNet: one per branch and exit) rather than rebuilding it per conv. Building costs ~1-2 ms at
    128x256 (``mask.nonzero`` plus a few int64 ops), i.e. 0.1-0.5 of one dense conv there.

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
        self._chunks: Dict[Tuple[int, int, int], List[Tensor]] = {}
        self._segments: Dict[tuple, 'SegmentTables'] = {}

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
            r = self._rows[key] = padded_row_index(self.n, self.y, self.x, self.height, self.width, pad)
        return r

    @property
    def num_stopped(self) -> int:
        """Number of stopped (inactive) positions."""
        return self.batch * self.height * self.width - self.num_active

    def stopped_rows(self, pad: int = 1) -> Tensor:
        """Flat row index of every *stopped* position in a buffer with border ``pad`` (cached).

        Used by the dense fallback at high active fractions: it overwrites the whole map and restores
        the stopped positions, which is cheaper than writing the active ones individually.
        """
        key = (pad, 1)
        r = self._rows.get(key)
        if r is None:
            n, y, x = (~self.mask).nonzero(as_tuple=True)
            r = self._rows[key] = padded_row_index(n, y, x, self.height, self.width, pad)
        return r

    def windows(self,
                in_hw: Optional[Tuple[int, int]] = None,
                kernel_size: int = 3,
                stride: int = 1,
                padding: Optional[int] = None,
                in_pad: int = 1) -> Tuple[Tensor, Tensor]:
        """Window tables of a conv whose output is this index's grid.

        Args:
            in_hw: Interior ``(H_in, W_in)`` of the input buffer; default: this index's ``(H, W)``
                (stride 1, same resolution). For a stride-2 conv pass the finer input's size.
            kernel_size: 1 or 3.
            stride: 1 or 2.
            padding: Conv zero padding; default ``kernel_size // 2``. Must be ``<= in_pad``.
            in_pad: Border width of the input buffer.

        Returns:
            ``(top_left, strips)``: int64 ``(M,)`` flat row of each window's top-left tap in the input
            buffer, and int64 ``(M * k,)`` flat rows where each of the window's k horizontal strips
            starts, ordered (position, ky). A strip is ``k * Cin`` *contiguous* values (the k taps of one
            window row are adjacent pixels in the channels-last buffer, also for stride 2), so the
            PyTorch path gathers k strips instead of k*k pixel rows (measured ~2x faster for small
            Cin). The gathered ``(M, k, k*Cin)`` block is ordered (ky, kx, cin), matching
            :func:`conv_weight_matrix`. Cached.

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
            raise ValueError(f'mask spatial shape {(self.height, self.width)} does not match the conv output '
                             f'{(h_out, w_out)} of input {(h_in, w_in)} (kernel {kernel_size}, stride {stride}, '
                             f'padding {padding})')
        key = (h_in, w_in, kernel_size, stride, padding, in_pad)
        t = self._windows.get(key)
        if t is None:
            hp, wp = h_in + 2 * in_pad, w_in + 2 * in_pad
            off = in_pad - padding  # buffer coordinate of conv input coordinate -padding
            top_left = (self.n * hp + self.y * stride + off) * wp + self.x * stride + off
            if kernel_size == 1:
                strips = top_left
            else:
                ky = torch.arange(kernel_size, dtype=torch.int64, device=self.device) * wp
                strips = (top_left[:, None] + ky[None, :]).reshape(-1)
            t = (top_left, strips)
            self._windows[key] = t
        return t

    def segments(self,
                 in_hw: Optional[Tuple[int, int]] = None,
                 kernel_size: int = 3,
                 stride: int = 1,
                 padding: Optional[int] = None,
                 in_pad: int = 1,
                 group: Optional[int] = None) -> 'SegmentTables':
        """Row-segment packing of the active positions for the dense-conv-on-packed-rows path.

        Active positions are split into horizontal runs (raster order). Every run becomes a line of
        output *slots*: its positions, gaps of at most ``d`` stopped positions inside the run filled
        with slots (computed, never written), and ``d`` trailing slots that continue the run, where
        ``d = ceil((k - stride) / stride)`` is the number of slots whose input columns the last real
        window still reads (2 for 3x3 stride 1, 1 for stride 2). The line of all runs is cut into
        groups of ``group`` slots; group ``g`` gathers its ``k`` input rows (columns of its slots plus
        the next ``d`` slots' columns) into a packed image of height ``k`` and width
        ``group * stride + k - stride``, and one dense convolution with stride ``(k, stride)`` over the
        stacked groups computes every slot. Consecutive slots of a line are adjacent input columns of
        one image row, so the packed windows of the real slots are exactly their windows in the buffer.

        Why: the gather copies ``k`` input pixels per slot instead of ``k * k`` (3x fewer bytes than the
        im2col gather for 3x3), and the convolution runs in oneDNN's direct-convolution kernels, which
        stay efficient for thin layers (18-96 channels) where a ``(M, 9 Cin) x (9 Cin, Cout)`` GEMM
        does not. The price is ``d`` extra slots per run, so masks made of long runs (blobs) profit and
        salt-and-pepper masks do not (:attr:`SegmentTables.overhead`).

        Args:
            in_hw: Interior size of the input buffer (default: this grid; a stride-2 conv's finer input).
            kernel_size: 3 (1x1 convs have no halo and use the compact-rows GEMM).
            stride: 1 or 2.
            padding: Conv padding (default ``kernel_size // 2``).
            in_pad: Border of the input buffer.
            group: Slots per group (default: 256, or fewer for small lines).

        Returns:
            :class:`SegmentTables`, cached.
        """
        if padding is None:
            padding = kernel_size // 2
        top_left, _ = self.windows(in_hw, kernel_size, stride, padding, in_pad)  # validates geometry
        if kernel_size != 3:
            raise ValueError('segment packing is for 3x3 convs (1x1 convs use compact rows)')
        h_in, w_in = (self.height, self.width) if in_hw is None else (int(in_hw[0]), int(in_hw[1]))
        key = (h_in, w_in, kernel_size, stride, padding, in_pad, group)
        t = self._segments.get(key)
        if t is None:
            t = self._segments[key] = SegmentTables.build(self, top_left, h_in + 2 * in_pad, w_in + 2 * in_pad,
                                                          kernel_size, stride, group)
        return t

    def chunks(self, table: Tensor, per_position: int, step: int) -> List[Tensor]:
        """Views of ``table`` (one of this index's cached tables) split into chunks of ``step`` positions.

        Args:
            table: A table returned by :meth:`rows` or :meth:`windows` (kept alive by this index, so
                its identity is a valid cache key).
            per_position: Entries per position in ``table`` (1 for rows / top-left, k for strips).
            step: Positions per chunk.

        Returns:
            List of consecutive views, cached.
        """
        key = (id(table), per_position, step)
        c = self._chunks.get(key)
        if c is None:
            c = self._chunks[key] = list(torch.split(table, step * per_position))
        return c

    def input_footprint(self,
                        in_hw: Tuple[int, int],
                        kernel_size: int = 3,
                        stride: int = 2,
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
        top_left, _ = self.windows(in_hw, kernel_size, stride, padding, in_pad=padding)
        h_in, w_in = in_hw
        wp = w_in + 2 * padding
        taps = torch.tensor([ky * wp + kx for ky in range(kernel_size) for kx in range(kernel_size)],
                            dtype=torch.int64,
                            device=self.device)
        nb = (top_left[:, None] + taps[None, :]).reshape(-1)
        grid = torch.zeros(
            self.batch * (h_in + 2 * padding) * (w_in + 2 * padding), dtype=torch.bool, device=self.device)
        grid[nb] = True
        grid = grid.view(self.batch, h_in + 2 * padding, w_in + 2 * padding)
        return grid[:, padding:padding + h_in, padding:padding + w_in].contiguous()

    def __repr__(self) -> str:
        return (f'{type(self).__name__}(shape={self.shape}, active={self.num_active}, '
                f'fraction={self.active_fraction:.3f})')


def _bucket(n: int) -> int:
    """Rounds a group count up to one of ~4 values per octave (1..8 exact, then steps of n/8 .. n/4)."""
    if n <= 8:
        return n
    step = 1 << (n.bit_length() - 3)
    return -(-n // step) * step


@dataclass
class SegmentTables:
    """Gather and output tables of :meth:`SparseIndex.segments` (one conv geometry, one mask).

    The groups are convolved in chunks of at most ``_SEGMENT_CHUNK_GROUPS`` groups; the group width is fixed
    (``_SEGMENT_GROUP`` slots, or a multiple of 32 for short lines) and the last chunk's group count is rounded
    up to a few buckets per octave, so that the convolutions of a layer take a handful of shapes whatever the
    mask. (oneDNN creates, JIT-compiles and caches a primitive per input shape: 2-15 ms per new shape measured
    here, which per image would cost more than the conv.)

    Attributes:
        gather: int64 ``(B * k * W_in,)`` flat input-buffer row of every packed input pixel, ordered
            (group, kernel row, column); ``B`` includes the padding groups of the last chunk.
        groups: Number of groups ``B``.
        group: Output slots per group.
        in_width: Packed input width ``W_in = group * stride + k - stride``.
        real: int64 ``(M,)`` slot of every active position (in the index's row order).
        chunks: ``(first group, groups, first position, end position, real slots relative to the chunk)``
            per chunk; the active positions ``first .. end-1`` (index order) have their slots in it.
        slots: Slots that carry a real output or a filler (excluding padding).
        overhead: Computed slots per active position, ``B * group / M`` (1.0 = no waste).
    """

    gather: Tensor
    groups: int
    group: int
    in_width: int
    real: Tensor
    chunks: List[Tuple[int, int, int, int, Tensor]]
    slots: int
    overhead: float

    @classmethod
    def build(cls, idx: 'SparseIndex', top_left: Tensor, hp: int, wp: int, k: int, stride: int,
              group: Optional[int]) -> 'SegmentTables':
        """See :meth:`SparseIndex.segments`; ``top_left`` are the windows' top-left rows, ``hp x wp``
        the padded input buffer's grid."""
        m = idx.num_active
        dev = top_left.device
        d = -(-(k - stride) // stride)  # trailing slots a run's last window reads into
        if m == 0:
            empty = torch.zeros(0, dtype=torch.int64, device=dev)
            return cls(empty, 0, max(1, group or 1), 0, empty, [], 0, 1.0)
        # extra slots after position i: the gap to the next position of the same run (<= d stopped
        # positions, computed rather than split) or d trailing slots where the run ends
        same_row = (idx.n[1:] == idx.n[:-1]) & (idx.y[1:] == idx.y[:-1])
        gap = idx.x[1:] - idx.x[:-1] - 1
        extra = torch.where(same_row & (gap <= d), gap, torch.full_like(gap, d))
        extra = torch.cat([extra, torch.full((1, ), d, dtype=torch.int64, device=dev)])
        counts = extra + 1
        ends = torch.cumsum(counts, 0)
        real = ends - counts  # slot of every active position
        slots = int(ends[-1])
        group = _SEGMENT_GROUP if group is None else max(1, int(group))
        if slots < group:  # short line: one group, its width rounded up to a multiple of 32 slots
            group = -(-slots // 32) * 32
        used = -(-slots // group)
        full, rest = divmod(used, _SEGMENT_CHUNK_GROUPS)
        sizes = [_SEGMENT_CHUNK_GROUPS] * full + ([_bucket(rest)] if rest else [])
        groups = sum(sizes)
        # slot -> its owner (the last active position at or before it) and its distance from the owner
        owner = torch.repeat_interleave(torch.arange(m, device=dev), counts)
        step = torch.arange(slots, device=dev) - real[owner]
        base = top_left[owner] + step * stride
        # padding slots (end of the line, padding groups, the next d slots read by the last windows): any
        # valid row, their outputs are never read
        need = groups * group + d
        base = torch.cat([base, torch.zeros(need - slots, dtype=torch.int64, device=dev)])
        in_width = group * stride + k - stride
        col = torch.arange(in_width, device=dev)
        slot_of_col = torch.arange(groups, device=dev)[:, None] * group + col[None, :] // stride  # (B, W_in)
        first = base[slot_of_col] + col[None, :] % stride  # kernel row 0
        rows = torch.arange(k, device=dev) * wp
        gather = (first[:, None, :] + rows[None, :, None]).reshape(-1)
        # filler slots past the right edge of the last image row can point beyond the buffer: clamp (their
        # values are never read by a real output)
        gather.clamp_(0, idx.batch * hp * wp - 1)
        group_end = list(itertools.accumulate(sizes))
        pos_end = torch.searchsorted(real, torch.tensor(group_end, device=dev) * group).tolist()
        chunks = [(g1 - size, size, p0, p1, real[p0:p1] - (g1 - size) * group)
                  for size, g1, p0, p1 in zip(sizes, group_end, [0] + pos_end[:-1], pos_end)]
        return cls(gather, groups, group, in_width, real, chunks, slots, groups * group / m)


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


def fold_bn(weight: Tensor, bias: Optional[Tensor], bn: torch.nn.modules.batchnorm._BatchNorm) -> Tuple[Tensor, Tensor]:
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
        _check_geometry(k, stride, padding)
        weight = weight.detach().contiguous()
        return cls(
            weight=weight,
            wmat=conv_weight_matrix(weight),
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


def add_weighted_rows_(acc: Tensor, src: Tensor, rows: Tensor, weights: Tensor, backend: str = 'auto') -> Tensor:
    """``acc[i] += sum_t weights[i, t] * src[rows[i, t]]`` in place (e.g. bilinear upsampling at active rows only).

    Args:
        acc: ``(M, C)`` contiguous rows, updated in place.
        src: ``(R, C)`` source rows (e.g. a padded buffer's ``view(-1, C)``).
        rows: int64 ``(M, T)`` source row of each tap.
        weights: ``(M, T)`` tap weights.
        backend: ``'auto'`` (the compiled CPU kernel for float32/64 CPU tensors when built: one pass over ``acc``),
            ``'torch'`` (T ``index_select`` + ``addcmul_`` passes) or ``'cpp'``.

    Returns:
        ``acc``.
    """
    if rows.dim() != 2 or tuple(weights.shape) != tuple(rows.shape) or rows.shape[0] != acc.shape[0]:
        raise ValueError(f'rows and weights must both be (M, T) with M = {acc.shape[0]}, got '
                         f'{tuple(rows.shape)} and {tuple(weights.shape)}')
    if src.dim() != 2 or src.shape[1] != acc.shape[1]:
        raise ValueError(f'src must be (rows, {acc.shape[1]}), got {tuple(src.shape)}')
    if backend not in ('auto', 'torch', 'cpp'):
        raise ValueError(f"backend must be 'auto', 'torch' or 'cpp', got {backend!r}")
    ext = None if backend == 'torch' or not acc.is_contiguous() else _cpu_ext(backend, acc)
    if ext is not None and rows.shape[0]:
        ext.add_weighted_rows(acc, src.contiguous(), rows.contiguous(), weights.to(acc.dtype).contiguous())
        return acc
    for t in range(rows.shape[1]):
        acc.addcmul_(src.index_select(0, rows[:, t]), weights[:, t:t + 1])
    return acc


def _check_buffer_matches(buf: Tensor, idx: SparseIndex, pad: int, name: str) -> None:
    want = (idx.batch, idx.height + 2 * pad, idx.width + 2 * pad)
    if tuple(buf.shape[:3]) != want:
        raise ValueError(f'{name} of shape {tuple(buf.shape)} does not match the index grid '
                         f'{idx.shape} with border {pad} (expected (N, Hp, Wp) = {want})')


def _chunk_rows(k: int, cin: int, chunk_rows: Optional[int]) -> int:
    if chunk_rows is not None:
        return max(1, int(chunk_rows))
    if torch.get_num_threads() > 1:
        target, low = _CHUNK_BYTES_MT, _MIN_CHUNK_ROWS_MT
    else:
        target, low = _CHUNK_BYTES_1T, _MIN_CHUNK_ROWS_1T
    return max(low, min(_MAX_CHUNK_ROWS, target // max(1, 4 * k * k * cin)))


def _residual_source(residual: Optional[Tensor], idx: SparseIndex, res_pad: int,
                     cout: int) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    """Returns ``(flat source, rows)``: rows is None for compact residual rows ``(M, Cout)``."""
    if residual is None:
        return None, None
    if residual.dim() == 4:
        _check_buffer(residual, 'residual buffer')
        _check_buffer_matches(residual, idx, res_pad, 'residual buffer')
        if residual.shape[-1] != cout:
            raise ValueError(f'residual has {residual.shape[-1]} channels, conv output has {cout}')
        return residual.view(-1, cout), idx.rows(res_pad)
    if tuple(residual.shape) != (idx.num_active, cout) or not residual.is_contiguous():
        raise ValueError(f'residual must be contiguous rows {(idx.num_active, cout)} or a padded '
                         f'buffer, got {tuple(residual.shape)}')
    return residual, None


def _dense_weight(wmat: Tensor, k: int, cin: int) -> Tensor:
    return wmat.view(k, k, cin, -1).permute(3, 2, 0, 1).contiguous()


def _dense_nhwc(buf: Tensor, weight: Tensor, bias: Optional[Tensor], h_in: int, w_in: int, stride: int, padding: int,
                in_pad: int) -> Tensor:
    """Dense conv of a padded buffer; returns the output as a contiguous NHWC tensor."""
    off = in_pad - padding
    # crop the buffer to exactly the conv's zero-padded input, then convolve with padding 0: the view is
    # channels-last NCHW, which oneDNN consumes without a layout conversion
    x = buf[:, off:off + h_in + 2 * padding, off:off + w_in + 2 * padding, :].permute(0, 3, 1, 2)
    y = F.conv2d(x, weight, bias, stride=stride)
    # oneDNN returns channels-last output for channels-last input; .contiguous() is then a no-op
    return y.permute(0, 2, 3, 1).contiguous()


class _ConvCall:
    """Validated arguments of one masked conv call (shared by the row and buffer entry points)."""

    def __init__(self, buf: Tensor, idx: SparseIndex, wmat: Tensor, bias: Optional[Tensor], stride: int,
                 padding: Optional[int], in_pad: int) -> None:
        _check_buffer(buf, 'input buffer')
        self.cin = buf.shape[-1]
        self.k = _kernel_from_wmat(wmat, self.cin)
        self.cout = wmat.shape[1]
        self.stride = stride
        self.padding = self.k // 2 if padding is None else padding
        self.in_pad = in_pad
        self.h_in = buf.shape[1] - 2 * in_pad
        self.w_in = buf.shape[2] - 2 * in_pad
        if buf.shape[0] != idx.batch:
            raise ValueError(f'batch mismatch: input buffer has {buf.shape[0]} images, '
                             f'mask has {idx.batch}')
        if wmat.dtype != buf.dtype or (bias is not None and bias.dtype != buf.dtype):
            raise TypeError(f'dtype mismatch: buffer {buf.dtype}, weight {wmat.dtype}, '
                            f'bias {None if bias is None else bias.dtype}')
        if bias is not None and tuple(bias.shape) != (self.cout, ):
            raise ValueError(f'bias must be ({self.cout},), got {tuple(bias.shape)}')
        # validates the geometry against the mask grid (and builds/caches the tables)
        self.top_left, self.strips = idx.windows((self.h_in, self.w_in), self.k, stride, self.padding, in_pad)


_TLS = threading.local()


def _scratch(name: str, numel: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """Per-thread reusable 1-D scratch tensor of at least ``numel`` elements (saves two allocations and
    their page faults per conv; per thread so concurrent callers never share one)."""
    cache = getattr(_TLS, 'scratch', None)
    if cache is None:
        cache = _TLS.scratch = {}
    key = (name, dtype, device)
    t = cache.get(key)
    if t is None or t.numel() < numel:
        # a normal (not inference-mode) tensor: usable both inside and outside torch.inference_mode
        with torch.inference_mode(False):
            t = cache[key] = torch.empty(numel, dtype=dtype, device=device)
    return t[:numel]


def _run_chunks(src: Tensor, k: int, kkc: int, cout: int, wmat: Tensor, bias: Optional[Tensor],
                res_src: Optional[Tensor], relu: bool, dst: Tensor, step: int, strip_chunks: List[Tensor],
                dst_chunks: Optional[List[Tensor]], res_chunks: Optional[List[Tensor]], res_is_rows: bool, first: int,
                last: int) -> None:
    """Chunks ``first .. last-1``: gather -> GEMM -> epilogue (-> scatter)."""
    scatter = dst_chunks is not None
    a_buf = _scratch('a', step * kkc, src.dtype, src.device).view(-1, src.shape[1])
    o_buf = _scratch('o', step * cout, src.dtype, src.device).view(step, cout) if scatter else None
    for i in range(first, last):
        st = strip_chunks[i]
        s = i * step
        n = st.shape[0] // k
        a = a_buf[:n * k]
        torch.index_select(src, 0, st, out=a)
        a = a.view(n, kkc)
        o = o_buf[:n] if scatter else dst[s:s + n]
        torch.mm(a, wmat, out=o)
        # epilogue on the chunk while it is in cache. (mm + add_ rather than addmm: addmm first
        # broadcasts the bias into the output and runs the GEMM with beta=1, measured 10-15 % slower
        # for thin GEMMs like K=162, N=18 and never faster.)
        if bias is not None:
            o.add_(bias)
        if res_src is not None:
            o.add_(res_src[s:s + n] if res_is_rows else torch.index_select(res_src, 0, res_chunks[i]))
        if relu:
            o.relu_()
        if scatter:
            dst.index_copy_(0, dst_chunks[i], o)


def _torch_sparse(buf: Tensor, idx: SparseIndex, call: _ConvCall, wmat: Tensor, bias: Optional[Tensor],
                  res_src: Optional[Tensor], res_rows: Optional[Tensor], relu: bool, dst: Tensor,
                  dst_rows: Optional[Tensor], chunk_rows: Optional[int]) -> None:
    """Chunked gather -> GEMM -> epilogue (-> scatter). The PyTorch (CPU) path.

    ``dst`` is ``(M, Cout)`` compact rows if ``dst_rows`` is None, else a flat ``(rows, Cout)`` buffer view
    that chunk results are scattered into (while still in cache).
    """
    k, cin, cout = call.k, call.cin, call.cout
    flat = buf.view(-1, cin)
    # Overlapping "strip" view: row r holds the k*cin contiguous values of pixels r .. r+k-1, i.e. one
    # horizontal row of a window. Gathering k strips per window instead of k*k pixel rows halves the
    # gather time for small Cin (fewer, longer row copies).
    src = flat if k == 1 else flat.as_strided((flat.shape[0] - k + 1, k * cin), (cin, 1))
    m = idx.num_active
    kkc = k * k * cin
    step = min(m, _chunk_rows(k, cin, chunk_rows))
    # chunk views of the index tables are cached on the index (slicing costs ~1 us per tensor per call)
    strip_chunks = idx.chunks(call.strips, k, step)
    dst_chunks = idx.chunks(dst_rows, 1, step) if dst_rows is not None else None
    res_chunks = idx.chunks(res_rows, 1, step) if res_rows is not None else None
    # Parallelism: each op uses torch's intra-op (OpenMP) threads. Splitting the chunks over Python worker
    # threads running single-threaded ops instead was measured 1.5-2x slower on 2 idle cores (the OpenMP
    # threads of the surrounding dense convs keep spinning after their regions) and only 0-30 % faster
    # with one core busy elsewhere, so it was dropped.
    _run_chunks(src, k, kkc, cout, wmat, bias, res_src, relu, dst, step, strip_chunks, dst_chunks, res_chunks, res_rows
                is None, 0, len(strip_chunks))


# Slots per packed group (the packed image is ~this wide; 128-1024 measured equally fast at C=18..96) and
# groups per conv call (16 x 256 slots: a chunk's packed input stays within L2 for C <= 96).
_SEGMENT_GROUP = 256
_SEGMENT_CHUNK_GROUPS = 16


# 'auto' means the GEMM. Measured (2 threads, blob masks, W18s/W48 branch shapes at a 512x1024 input, tune_malloc
# on): as single convs, segments beat the GEMM by 5-20 % at 128x256 and 64x128 (C=18..96, 10-50 % active) and lose
# by 20-130 % on 16x32 maps and below ~1000 active positions. Inside the whole masked W18s/W48 stages 2-4, though,
# a rule picking segments for 3x3 convs with >= 1024 active positions and <= 1.3 slots per position was 2-25 %
# SLOWER than the GEMM everywhere (50/75/90 % stopped; e.g. W48 75 %: 510 vs 473 ms, W18s 75 %: 110 vs 87 ms),
# so segments stay an explicit option (method='segments').
def choose_method(method: str, idx: SparseIndex, call: '_ConvCall') -> str:
    """The CPU sparse algorithm for one conv call.

    ``'auto'`` is ``'gemm'``: the segment path wins as a single conv on large thin maps but lost inside the
    whole masked HRNet (numbers above this function).

    Args:
        method: ``'auto'``, ``'gemm'`` or ``'segments'``.
        idx: The output index.
        call: The validated conv call.

    Returns:
        ``'gemm'`` or ``'segments'``.

    Raises:
        ValueError: Unknown method, or ``'segments'`` for a 1x1 conv.
    """
    if method not in ('auto', 'gemm', 'segments'):
        raise ValueError(f"method must be 'auto', 'gemm' or 'segments', got {method!r}")
    if method == 'segments' and call.k != 3:
        raise ValueError('the segments method is for 3x3 convs; 1x1 convs use the gemm method')
    return 'gemm' if method == 'auto' else method


def _segment_sparse(buf: Tensor, idx: SparseIndex, call: _ConvCall, weight: Tensor, bias: Optional[Tensor],
                    res_src: Optional[Tensor], res_rows: Optional[Tensor], relu: bool, dst: Tensor,
                    dst_rows: Optional[Tensor]) -> None:
    """Packed row segments -> dense conv per chunk -> real slots -> epilogue (-> scatter). CPU path for 3x3.

    See :meth:`SparseIndex.segments`. ``dst`` / ``dst_rows`` as in :func:`_torch_sparse`.
    """
    t = idx.segments((call.h_in, call.w_in), call.k, call.stride, call.padding, call.in_pad)
    cin, cout, k = call.cin, call.cout, call.k
    flat = buf.view(-1, cin)
    per_group = k * t.in_width
    for g0, ng, p0, p1, real in t.chunks:
        # gather this chunk's packed image while the previous chunk's results are written: it stays in cache
        packed = torch.index_select(flat, 0, t.gather[g0 * per_group:(g0 + ng) * per_group])
        # (1, C, ng*k, W_in) in channels-last strides: oneDNN's layout, no conversion. Stride k vertically
        # puts the output of group g at row g.
        x = packed.view(1, ng * k, t.in_width, cin).permute(0, 3, 1, 2)
        y = F.conv2d(x, weight, bias, stride=(k, call.stride))
        y = y.permute(0, 2, 3, 1).reshape(-1, cout)  # a view for oneDNN's channels-last output
        if p1 == p0:
            continue
        if dst_rows is None:
            rows = torch.index_select(y, 0, real, out=dst[p0:p1])
        else:
            rows = torch.index_select(y, 0, real)
        if res_src is not None:
            rows.add_(res_src[p0:p1] if res_rows is None else torch.index_select(res_src, 0, res_rows[p0:p1]))
        if relu:
            rows.relu_()
        if dst_rows is not None:
            dst.index_copy_(0, dst_rows[p0:p1], rows)


# Chunk of the compiled CPU kernel: each thread gathers into its own block, so ~256 KiB (within a core's L2 next
# to the GEMM's packed weight panels), at least 128 rows so the GEMM amortises reading the weight. Measured on W48
# stages 2-4 (75 % stopped): 16-256-row minimums within 3 % of each other, 512 rows 7 % slower. The chunk count
# is then rounded up to a multiple of the thread count and the rows spread evenly: OpenMP gives each thread a
# contiguous share of the chunks, and 3 chunks on 2 threads took as long as 4 (a 144-channel conv at 16x32 ran
# 0.51 of the dense time at 50 % active but 0.98 at 60 %).
_EXT_CHUNK_BYTES, _EXT_MIN_CHUNK_ROWS, _EXT_MAX_CHUNK_ROWS = 256 << 10, 128, 1024

# Which of the compiled kernel's two float32 algorithms runs: -1 lets the kernel choose (its AVX-512 direct kernel for
# Cout <= 100, measured faster there; the gather + GEMM otherwise), 0 forces the GEMM, 1 the direct kernel. The tests
# set it to compare the two; see csrc/sparse_conv_cpu.cpp.
_CPU_DIRECT = -1


def _ext_chunk_rows(kkc: int, itemsize: int, m: int, threads: Optional[int] = None) -> int:
    """Rows per chunk of the compiled kernel for ``m`` active rows of ``kkc`` gathered values."""
    target = max(_EXT_MIN_CHUNK_ROWS, min(_EXT_MAX_CHUNK_ROWS, _EXT_CHUNK_BYTES // max(1, itemsize * kkc)))
    t = max(1, torch.get_num_threads() if threads is None else threads)
    per_thread = -(-m // (t * target))  # chunks per thread (ceil)
    return max(1, -(-m // (t * per_thread)))


def _cpu_sparse(buf: Tensor,
                idx: SparseIndex,
                call: _ConvCall,
                wmat: Tensor,
                dense_weight: Optional[Tensor],
                bias: Optional[Tensor],
                res_src: Optional[Tensor],
                res_rows: Optional[Tensor],
                relu: bool,
                dst: Tensor,
                dst_rows: Optional[Tensor],
                chunk_rows: Optional[int],
                method: str,
                backend: str = 'auto') -> None:
    """The CPU sparse path of :func:`sparse_conv_rows` / :func:`sparse_conv_buffer`, by ``method`` and backend.

    ``'gemm'`` runs in the compiled kernel (:mod:`mmseg_cbt.ops.sparse_conv_cpu`) when ``backend`` allows it and
    it is built, else in :func:`_torch_sparse` (its reference: same tables, same chunked algorithm).
    """
    if choose_method(method, idx, call) == 'segments':
        w4 = dense_weight if dense_weight is not None else _dense_weight(wmat, call.k, call.cin)
        _segment_sparse(buf, idx, call, w4, bias, res_src, res_rows, relu, dst, dst_rows)
        return
    ext = _cpu_ext(backend, buf)
    if ext is None:
        _torch_sparse(buf, idx, call, wmat, bias, res_src, res_rows, relu, dst, dst_rows, chunk_rows)
        return
    step = int(chunk_rows) if chunk_rows is not None else _ext_chunk_rows(call.k * call.k *
                                                                          call.cin, buf.element_size(), idx.num_active)
    ext.sparse_conv_gemm(
        buf.view(-1, call.cin), call.strips, call.k, wmat, None if bias is None else bias.contiguous(), res_src,
        res_rows, relu, dst, dst_rows, max(1, step), _CPU_DIRECT)


def _kernel_direct(ext, dtype: torch.dtype, cout: int) -> bool:
    """Whether the compiled kernel ``ext`` (None: not used) runs its direct algorithm for this conv."""
    if ext is None or _CPU_DIRECT == 0:
        return False
    if _CPU_DIRECT == 1:
        return dtype == torch.float32 and bool(ext.has_direct())
    return bool(ext.uses_direct(cout, dtype == torch.float32))


def _cpu_crossover(ext, kernel_size: int, cin: int, cout: int, dtype: torch.dtype) -> float:
    """:func:`dense_crossover` of the CPU path that runs the conv: ``ext`` is the compiled kernel, or None for
    the PyTorch ops."""
    return dense_crossover(kernel_size, cin, cout, ext is not None, _kernel_direct(ext, dtype, cout))


def cpu_kernel_direct(cout: int, dtype: torch.dtype = torch.float32) -> bool:
    """Whether masked convs with ``cout`` output channels run the compiled CPU kernel's direct algorithm.

    Args:
        cout: Output channels.
        dtype: Tensor dtype.

    Returns:
        True if the kernel is available and chooses (or is forced to) its AVX-512 direct algorithm.
    """
    return _kernel_direct(load_cpu_ext(), dtype, cout)


def _cpu_ext(backend: str, t: Tensor):
    """The compiled CPU kernel module if ``backend`` selects it for tensor ``t``, else None."""
    if backend in ('torch', 'triton') or t.is_cuda or t.dtype not in (torch.float32, torch.float64):
        if backend == 'cpp':
            raise ValueError(f"backend='cpp' runs float32/float64 CPU tensors, got {t.dtype} on {t.device}")
        return None
    ext = load_cpu_ext()
    if ext is None and backend == 'cpp':
        raise RuntimeError("backend='cpp' requested but the CPU kernel is not available (disabled by "
                           "MMSEG_CBT_CPU_EXT=0, or its build failed: see the warning)")
    return ext


def sparse_conv_rows(buf: Tensor,
                     idx: SparseIndex,
                     wmat: Tensor,
                     bias: Optional[Tensor] = None,
                     *,
                     stride: int = 1,
                     padding: Optional[int] = None,
                     residual: Optional[Tensor] = None,
                     relu: bool = False,
                     in_pad: int = 1,
                     res_pad: int = 1,
                     out: Optional[Tensor] = None,
                     chunk_rows: Optional[int] = None,
                     dense_weight: Optional[Tensor] = None,
                     dense_threshold: Optional[float] = None,
                     backend: str = 'auto',
                     method: str = 'auto') -> Tensor:
    """Computes a conv (+ bias, residual, ReLU) at the active positions only, as compact rows.

    ``y[i] = relu(window_i(buf) @ wmat + bias + residual[i])`` for the ``M`` active positions of ``idx``
    in its row order. The input buffer is read in full (stopped positions included).

    Args:
        buf: Input buffer ``(N, H_in + 2 in_pad, W_in + 2 in_pad, Cin)``, contiguous, zero border.
            ``H_in = H`` for stride 1; for stride 2 the finer map (e.g. ``2 H``).
        idx: Index of the output mask ``(N, H, W)``.
        wmat: ``(k*k*Cin, Cout)`` from :func:`conv_weight_matrix` (k = 1 or 3 is inferred from it).
        bias: ``(Cout,)`` or None (BN folded in by the caller).
        stride: 1 or 2.
        padding: Conv padding, default ``k // 2``; must be ``<= in_pad``.
        residual: Added before the ReLU: contiguous compact rows ``(M, Cout)`` or a padded buffer
            ``(N, H + 2 res_pad, W + 2 res_pad, Cout)`` at the output resolution (gathered per chunk).
        relu: Apply ReLU last.
        in_pad: Border width of ``buf``.
        res_pad: Border width of a residual buffer.
        out: Optional contiguous ``(M, Cout)`` tensor receiving the rows.
        chunk_rows: Active rows per gather/GEMM chunk; default from the gathered size (1 MiB with one
            torch thread, 4 MiB with more), clamped to 256 (1024 multi-threaded) .. 4096 rows.
        dense_weight: ``(Cout, Cin, k, k)`` weight for the dense fallback (derived from ``wmat`` if
            None, at the cost of a reshape copy).
        dense_threshold: Active fraction above which the dense conv (+ a row gather) is used; default
            :func:`dense_crossover`. Pass ``float('inf')`` to force the sparse path.
        backend: ``'auto'`` (CUDA tensors: Triton when importable, else PyTorch; float32/64 CPU tensors:
            the compiled CPU kernel when built, else PyTorch), ``'torch'`` (pure PyTorch, the reference),
            ``'cpp'`` (the compiled CPU kernel, error if unavailable) or ``'triton'`` (also runs on CPU
            tensors under ``TRITON_INTERPRET=1``). With Triton the
            default ``dense_threshold`` only sends full masks to the dense conv (its GPU crossover is
            not measured).
        method: CPU sparse algorithm: ``'gemm'`` (chunked im2col gather + GEMM), ``'segments'``
            (3x3 only: packed row segments + one dense conv, :meth:`SparseIndex.segments`) or
            ``'auto'`` (:func:`choose_method`).

    Returns:
        ``(M, Cout)`` rows (``out`` if given).
    """
    call = _ConvCall(buf, idx, wmat, bias, stride, padding, in_pad)
    m, cout = idx.num_active, call.cout
    if out is None:
        out = torch.empty(m, cout, dtype=buf.dtype, device=buf.device)
    elif tuple(out.shape) != (m, cout) or not out.is_contiguous():
        raise ValueError(f'out must be a contiguous ({m}, {cout}) tensor, got {tuple(out.shape)}')
    res_src, res_rows = _residual_source(residual, idx, res_pad, cout)
    if m == 0:
        return out
    use_triton = _use_triton(backend, buf)
    if idx.active_fraction > _threshold(dense_threshold, use_triton, call, backend, buf, method):
        w4 = dense_weight if dense_weight is not None else _dense_weight(wmat, call.k, call.cin)
        y = _dense_nhwc(buf, w4, bias, call.h_in, call.w_in, stride, call.padding, in_pad)
        torch.index_select(y.view(-1, cout), 0, idx.rows(0), out=out)
        if res_src is not None:
            out.add_(res_src if res_rows is None else torch.index_select(res_src, 0, res_rows))
        if relu:
            out.relu_()
        return out
    if use_triton:
        from .sparse_conv_triton import sparse_conv_rows_triton
        return sparse_conv_rows_triton(
            buf,
            call.top_left,
            wmat,
            bias,
            in_row_width=buf.shape[2],
            kernel_size=call.k,
            residual=res_src,
            residual_rows=res_rows,
            relu=relu,
            out=out)
    _cpu_sparse(buf, idx, call, wmat, dense_weight, bias, res_src, res_rows, relu, out, None, chunk_rows, method,
                backend)
    return out


def dense_conv_buffer(buf: Tensor,
                      weight: Tensor,
                      bias: Optional[Tensor],
                      out_buf: Tensor,
                      *,
                      stride: int = 1,
                      padding: Optional[int] = None,
                      residual: Optional[Tensor] = None,
                      relu: bool = False,
                      idx: Optional[SparseIndex] = None,
                      in_pad: int = 1,
                      out_pad: int = 1,
                      res_pad: int = 1) -> Tensor:
    """Dense conv (+ bias, residual, ReLU) from one padded buffer into another.

    The fallback of :func:`sparse_conv_buffer`, usable on its own for the always-dense parts of a
    network (no NCHW<->NHWC copies: the buffers are viewed as channels-last NCHW).

    Args:
        buf: Input buffer ``(N, H_in + 2 in_pad, W_in + 2 in_pad, Cin)``.
        weight: ``(Cout, Cin, k, k)`` weight (or a ``(k*k*Cin, Cout)`` matrix, reshaped per call).
        bias: ``(Cout,)`` or None.
        out_buf: Output buffer ``(N, H + 2 out_pad, W + 2 out_pad, Cout)``.
        stride: 1 or 2.
        padding: Default ``k // 2``.
        residual: Padded buffer ``(N, H + 2 res_pad, W + 2 res_pad, Cout)`` or, with ``idx``, compact
            rows ``(M, Cout)``; added before the ReLU.
        relu: Apply ReLU.
        idx: Optional index: only its active positions of ``out_buf`` are written (the others keep
            their values).
        in_pad: Border of ``buf``.
        out_pad: Border of ``out_buf``.
        res_pad: Border of ``residual``.

    Returns:
        ``out_buf``.
    """
    _check_buffer(buf, 'input buffer')
    _check_buffer(out_buf, 'output buffer')
    cin = buf.shape[-1]
    if weight.dim() == 2:
        k = _kernel_from_wmat(weight, cin)
        weight = _dense_weight(weight, k, cin)
    k = int(weight.shape[-1])
    padding = k // 2 if padding is None else padding
    _check_geometry(k, stride, padding)
    if padding > in_pad:
        raise ValueError(f'conv padding {padding} exceeds the input buffer border {in_pad}')
    h_in, w_in = buf.shape[1] - 2 * in_pad, buf.shape[2] - 2 * in_pad
    if (k == 1 and stride == 1 and padding == 0 and in_pad == out_pad
            and tuple(out_buf.shape[:3]) == tuple(buf.shape[:3])
            and (residual is None or
                 (residual.dim() == 4 and res_pad == out_pad and residual.data_ptr() != out_buf.data_ptr()))):
        return _dense_1x1_buffer(buf, weight, bias, out_buf, residual, relu, idx, out_pad)
    y = _dense_nhwc(buf, weight, bias, h_in, w_in, stride, padding, in_pad)
    n, ho, wo, cout = y.shape
    if tuple(out_buf.shape) != (n, ho + 2 * out_pad, wo + 2 * out_pad, cout):
        raise ValueError(f'output buffer {tuple(out_buf.shape)} does not fit the conv output '
                         f'{(n, ho, wo, cout)} with border {out_pad}')
    if idx is not None:
        _check_buffer_matches(out_buf, idx, out_pad, 'output buffer')
    full = idx is None or idx.num_active == n * ho * wo
    res_is_rows = residual is not None and residual.dim() != 4
    if res_is_rows and idx is None:
        raise ValueError('a compact-rows residual needs idx')
    dst = out_buf[:, out_pad:out_pad + ho, out_pad:out_pad + wo, :]
    if full or (not res_is_rows and idx.num_active > idx.num_stopped):
        # Write every position, restoring the (fewer) stopped ones afterwards: costs a plain copy plus a
        # gather/scatter of the stopped rows, much less than writing the many active rows one by one.
        if res_is_rows:  # full mask: the index's row order is the map's raster order
            res_src, _ = _residual_source(residual, idx, res_pad, cout)
            y.view(-1, cout).add_(res_src)
        elif residual is not None:
            y.add_(residual[:, res_pad:res_pad + ho, res_pad:res_pad + wo, :])
        if relu:
            y.relu_()
        if full:
            dst.copy_(y)
            return out_buf
        stopped = idx.stopped_rows(out_pad)
        flat = out_buf.view(-1, cout)
        saved = torch.index_select(flat, 0, stopped)
        dst.copy_(y)
        flat.index_copy_(0, stopped, saved)
        return out_buf
    # few active positions: write only those, epilogue on the gathered active rows only
    rows = torch.index_select(y.view(-1, cout), 0, idx.rows(0))
    res_src, res_rows = _residual_source(residual, idx, res_pad, cout)
    if res_src is not None:
        rows.add_(res_src if res_rows is None else torch.index_select(res_src, 0, res_rows))
    if relu:
        rows.relu_()
    out_buf.view(-1, cout).index_copy_(0, idx.rows(out_pad), rows)
    return out_buf


def _zero_border(buf: Tensor, pad: int) -> None:
    if pad:
        buf[:, :pad].zero_()
        buf[:, -pad:].zero_()
        buf[:, pad:-pad, :pad].zero_()
        buf[:, pad:-pad, -pad:].zero_()


def _dense_1x1_buffer(buf: Tensor, weight: Tensor, bias: Optional[Tensor], out_buf: Tensor, residual: Optional[Tensor],
                      relu: bool, idx: Optional[SparseIndex], pad: int) -> Tensor:
    """Dense 1x1 conv between same-geometry buffers as ONE GEMM written straight into ``out_buf``.

    The border rows are computed too (a few % extra rows) and re-zeroed: this avoids the input crop copy
    and the output copy of the generic path, which cost as much as the (memory-bound) 1x1 conv itself.
    Stopped positions of a partial mask are saved before and restored after.
    """
    cin, cout = buf.shape[-1], out_buf.shape[-1]
    flat_in, flat_out = buf.view(-1, cin), out_buf.view(-1, cout)
    saved = stopped = None
    if idx is not None and idx.num_stopped:
        _check_buffer_matches(out_buf, idx, pad, 'output buffer')
        stopped = idx.stopped_rows(pad)
        saved = torch.index_select(flat_out, 0, stopped)
    torch.mm(flat_in, weight.reshape(cout, cin).t(), out=flat_out)
    if bias is not None:  # separate add: addmm is 1.7x slower here at C=18 (see _run_chunks)
        flat_out.add_(bias)
    if residual is not None:
        flat_out.add_(residual.view(-1, cout))
    if relu:
        flat_out.relu_()
    _zero_border(out_buf, pad)
    if saved is not None:
        flat_out.index_copy_(0, stopped, saved)
    return out_buf


def sparse_conv_buffer(buf: Tensor,
                       idx: SparseIndex,
                       wmat: Tensor,
                       bias: Optional[Tensor],
                       out_buf: Tensor,
                       *,
                       stride: int = 1,
                       padding: Optional[int] = None,
                       residual: Optional[Tensor] = None,
                       relu: bool = False,
                       in_pad: int = 1,
                       out_pad: int = 1,
                       res_pad: int = 1,
                       chunk_rows: Optional[int] = None,
                       dense_weight: Optional[Tensor] = None,
                       dense_threshold: Optional[float] = None,
                       backend: str = 'auto',
                       method: str = 'auto') -> Tensor:
    """Masked conv from a padded buffer into a padded buffer: active positions written, others kept.

    The stage-level entry point. Below ``dense_threshold`` active fraction: per chunk of active rows,
    gather windows -> GEMM -> bias / residual / ReLU -> scatter into ``out_buf`` (Triton on CUDA: all
    fused in one kernel). Above it: the dense conv, then only the active positions are written, so
    stopped positions keep their value on both paths.

    Args:
        buf: Input buffer (see :func:`sparse_conv_rows`).
        idx: Index of the output mask.
        wmat: ``(k*k*Cin, Cout)`` weight matrix.
        bias: ``(Cout,)`` or None.
        out_buf: Output buffer ``(N, H + 2 out_pad, W + 2 out_pad, Cout)``; must not be ``buf``.
        stride: 1 or 2.
        padding: Default ``k // 2``.
        residual: Compact rows ``(M, Cout)`` or a padded buffer at the output resolution. It may be
            ``out_buf`` itself (each active row is read before it is overwritten).
        relu: Apply ReLU.
        in_pad: Border of ``buf``.
        out_pad: Border of ``out_buf``.
        res_pad: Border of a residual buffer.
        chunk_rows: See :func:`sparse_conv_rows`.
        dense_weight: ``(Cout, Cin, k, k)`` for the dense fallback (else derived from ``wmat``).
        dense_threshold: Default :func:`dense_crossover`; ``float('inf')`` forces the sparse path.
        backend: ``'auto'``, ``'torch'``, ``'cpp'`` or ``'triton'`` (see :func:`sparse_conv_rows`).
        method: ``'auto'``, ``'gemm'`` or ``'segments'`` (see :func:`sparse_conv_rows`).

    Returns:
        ``out_buf``.
    """
    call = _ConvCall(buf, idx, wmat, bias, stride, padding, in_pad)
    _check_buffer(out_buf, 'output buffer')
    _check_buffer_matches(out_buf, idx, out_pad, 'output buffer')
    if out_buf.shape[-1] != call.cout:
        raise ValueError(f'output buffer has {out_buf.shape[-1]} channels, conv has {call.cout}')
    if out_buf.data_ptr() == buf.data_ptr():
        raise ValueError('out_buf must not alias the input buffer (windows read neighbours)')
    res_src, res_rows = _residual_source(residual, idx, res_pad, call.cout)
    if idx.num_active == 0:
        return out_buf
    use_triton = _use_triton(backend, buf)
    if idx.active_fraction > _threshold(dense_threshold, use_triton, call, backend, buf, method):
        return dense_conv_buffer(
            buf,
            dense_weight if dense_weight is not None else wmat,
            bias,
            out_buf,
            stride=stride,
            padding=call.padding,
            residual=residual,
            relu=relu,
            idx=idx,
            in_pad=in_pad,
            out_pad=out_pad,
            res_pad=res_pad)
    if use_triton:
        from .sparse_conv_triton import sparse_conv_rows_triton
        sparse_conv_rows_triton(
            buf,
            call.top_left,
            wmat,
            bias,
            in_row_width=buf.shape[2],
            kernel_size=call.k,
            residual=res_src,
            residual_rows=res_rows,
            relu=relu,
            out=out_buf.view(-1, call.cout),
            out_rows=idx.rows(out_pad))
        return out_buf
    _cpu_sparse(buf, idx, call, wmat, dense_weight, bias, res_src, res_rows, relu, out_buf.view(-1, call.cout),
                idx.rows(out_pad), chunk_rows, method, backend)
    return out_buf


# On the Triton (GPU) path only a full mask falls back to the dense conv by default: the GPU crossover
# has not been measured (no GPU was available when this was written).
_TRITON_DEFAULT_THRESHOLD = 1.0 - 1e-9


def _threshold(dense_threshold: Optional[float], use_triton: bool, call: '_ConvCall', backend: str, buf: Tensor,
               method: str) -> float:
    if dense_threshold is not None:
        return dense_threshold
    if use_triton:
        return _TRITON_DEFAULT_THRESHOLD
    ext = _cpu_ext(backend, buf) if choose_method(method, None, call) == 'gemm' else None
    return _cpu_crossover(ext, call.k, call.cin, call.cout, buf.dtype)


def _triton_available() -> bool:
    try:
        from .sparse_conv_triton import HAS_TRITON
    except ImportError:  # pragma: no cover - the module itself guards the triton import
        return False
    return HAS_TRITON


def _use_triton(backend: str, t: Tensor) -> bool:
    if backend in ('torch', 'cpp'):
        return False
    if backend == 'triton':
        if not _triton_available():
            raise RuntimeError("backend='triton' requested but triton is not importable")
        return True
    if backend != 'auto':
        raise ValueError(f"backend must be 'auto', 'torch', 'cpp' or 'triton', got {backend!r}")
    return t.is_cuda and _triton_available()


# --------------------------------------------------------------------------------------------------
# Functional op on NCHW tensors
# --------------------------------------------------------------------------------------------------
def sparse_conv2d(input: Tensor,
                  weight: Tensor,
                  bias: Optional[Tensor],
                  mask: Tensor,
                  stride: int = 1,
                  padding: int = 0,
                  out: Optional[Tensor] = None,
                  *,
                  dense_threshold: Optional[float] = None,
                  backend: str = 'auto') -> Tensor:
    """Masked 2-D convolution: the dense conv's values at active output positions only.

    Every window reads the full input (including positions the caller considers stopped, which hold
    whatever value the caller put there); zero padding at the border as in :func:`F.conv2d`.

    * Active positions (``mask == True``) hold exactly ``F.conv2d(input, weight, bias, stride, padding)``
      (up to fp32 summation order).
    * Stopped positions hold 0 - or, if ``out`` is given, the op writes the active positions into ``out``
      in place and leaves its stopped positions untouched (this is how a caller gets "copy" fill at zero
      cost: pass the previous values as ``out``).
    * An empty mask computes nothing (zeros, or ``out`` untouched); above ``dense_threshold`` active
      fraction (default :func:`dense_crossover`) the dense conv is run and masked; a full mask is the
      dense conv.

    With autograd active (an input, the weight or the bias requires grad and grad mode is on) it
    computes the dense conv and masks it, so it stays differentiable; the fast paths are inference-only.

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
        backend: ``'auto'`` (Triton for CUDA tensors if importable, the compiled kernel for CPU ones if
            built), ``'torch'``, ``'cpp'`` or ``'triton'`` (see :func:`sparse_conv_rows`).

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
    if bias is not None and tuple(bias.shape) != (cout, ):
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

    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (input, weight, bias)):
        # The sparse kernels write into preallocated buffers (no autograd): to stay differentiable
        # (e.g. a SparseConv2d in training), compute the same values densely and mask them.
        y = F.conv2d(input, weight, bias, stride=stride, padding=padding)
        keep = mask[:, None]
        return torch.where(keep, y, 0.0) if out is None else out.copy_(torch.where(keep, y, out))
    if bool(mask.all()):
        # nothing stopped: exactly the dense conv, without building an index (a full nonzero() costs ~0.7x a
        # thin conv at 128x256)
        y = F.conv2d(input, weight, bias, stride=stride, padding=padding)
        return y if out is None else out.copy_(y)
    idx = SparseIndex.build(mask)
    m = idx.num_active
    if m == 0:
        return out if out is not None else input.new_zeros(n, cout, ho, wo)
    use_triton = _use_triton(backend, input)
    if dense_threshold is not None:
        threshold = dense_threshold
    elif use_triton:
        threshold = _TRITON_DEFAULT_THRESHOLD
    else:
        threshold = _cpu_crossover(_cpu_ext(backend, input), k, cin, cout, input.dtype)
    if idx.active_fraction > threshold:
        y = F.conv2d(input, weight, bias, stride=stride, padding=padding)
        if m == n * ho * wo:
            return y if out is None else out.copy_(y)
        keep = mask[:, None]
        if out is None:
            return y.masked_fill_(~keep, 0)
        return out.copy_(torch.where(keep, y, out))

    buf = to_padded_nhwc(input, padding)
    rows = sparse_conv_rows(
        buf,
        idx,
        conv_weight_matrix(weight),
        bias,
        stride=stride,
        padding=padding,
        in_pad=padding,
        dense_threshold=float('inf'),
        backend='triton' if use_triton else backend)
    if out is None:
        res = input.new_zeros(n, ho, wo, cout)
        res.view(-1, cout).index_copy_(0, idx.rows(0), rows)
        return res.permute(0, 3, 1, 2)
    out.permute(0, 2, 3, 1).index_put_((idx.n, idx.y, idx.x), rows)
    return out
