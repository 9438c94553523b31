"""``SparseIndex``: the active positions of one mask at one resolution, as flat rows of padded buffers."""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor

from .layout import check_geometry, conv_output_size, padded_row_index

__all__ = ['SparseIndex', 'check_buffer_matches', 'check_mask']


def check_mask(mask: Tensor) -> None:
    """Raises TypeError unless ``mask`` is a bool tensor, ValueError unless it is ``(N, H_out, W_out)``."""
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
        raise TypeError(f'mask must be a bool tensor, got '
                        f'{mask.dtype if isinstance(mask, Tensor) else type(mask).__name__}')
    if mask.dim() != 3:
        raise ValueError(f'mask must have shape (N, H_out, W_out), got {tuple(mask.shape)}')


class SparseIndex:
    """Active output positions of one mask at one resolution, as flat row indices into padded buffers.

    Build it once per exit mask and resolution; every conv whose *output* lives at this resolution (3x3 or 1x1 at
    the same resolution, or a stride-2 conv reading a 2x finer buffer) reuses it. Tables depend only on geometry
    and are built lazily and cached on the index, so keep one index object per mask and resolution (a masked
    HRNet: one per branch and exit) rather than rebuilding it per conv:

    * :meth:`rows` - flat row of each active position in a buffer with a given border (scatter, residual gathers,
      row gathers),
    * :meth:`windows` - flat row of the top-left tap of each active position's window in an input buffer, plus the
      rows where its k window strips start (the gather),
    * :meth:`stopped_rows` - rows of the stopped positions (the dense fallback),
    * :meth:`chunks` - cached chunk views of those tables.

    Attributes:
        mask (Tensor): The bool mask ``(N, H, W)`` it was built from.
        n, y, x (Tensor): int64 coordinates of the active positions (row-major order: image, row, column).
        num_active (int): Number of active positions ``M``.
        active_fraction (float): ``M / (N * H * W)``.
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
        self._row_span: Optional[Tuple[int, int]] = None
        self._reads: Dict[Tuple[int, int, int, int, int], Tensor] = {}

    @classmethod
    def build(cls, mask: Tensor) -> 'SparseIndex':
        """Builds the index of a mask.

        Args:
            mask (Tensor): Bool ``(N, H, W)`` at the output resolution, True = compute.

        Returns:
            SparseIndex: The index (on the mask's device).

        Raises:
            TypeError: If the mask is not bool.
            ValueError: If the mask is not 3-D.
        """
        check_mask(mask)
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

    @property
    def num_stopped(self) -> int:
        """Number of stopped (inactive) positions."""
        return self.batch * self.height * self.width - self.num_active

    def row_span(self) -> Tuple[int, int]:
        """First and last output row holding an active position, over all images (cached; ``(0, -1)`` if none).

        Returns:
            tuple: ``(y_min, y_max)``.
        """
        if self._row_span is None:
            if self.num_active == 0:
                self._row_span = (0, -1)
            else:
                lo, hi = torch.aminmax(self.y)
                self._row_span = (int(lo), int(hi))
        return self._row_span

    def input_reads(self, input_hw: Tuple[int, int], k: int, stride: int, padding: int) -> Tensor:
        """Which input pixels the windows of the active positions read (cached per geometry).

        Args:
            input_hw (tuple): ``(H_in, W_in)`` of the conv's input.
            k (int): Kernel size.
            stride (int): Conv stride.
            padding (int): Conv padding.

        Returns:
            Tensor: Contiguous bool ``(N, H_in, W_in)``.
        """
        key = (*input_hw, k, stride, padding)
        need = self._reads.get(key)
        if need is None:
            h_in, w_in = input_hw
            # every active output spreads its k x k window onto the input: a transposed conv with a ones kernel
            out_pad = tuple(s - ((o - 1) * stride - 2 * padding + k) for s, o in zip(input_hw, self.shape[1:]))
            hits = torch.nn.functional.conv_transpose2d(
                self.mask[:, None].float(),
                self.mask.new_ones(1, 1, k, k, dtype=torch.float32),
                stride=stride,
                padding=padding,
                output_padding=out_pad if max(out_pad) < stride else 0)
            need = torch.zeros(self.batch, h_in, w_in, dtype=torch.bool, device=self.device)
            hh, ww = min(h_in, hits.shape[2]), min(w_in, hits.shape[3])
            need[:, :hh, :ww] = hits[:, 0, :hh, :ww] > 0
            self._reads[key] = need
        return need

    def rows(self, pad: int = 1) -> Tensor:
        """Flat row index of every active position in a buffer ``(N, H + 2 pad, W + 2 pad, C)`` (cached).

        Args:
            pad (int): Border width of the buffer.

        Returns:
            Tensor: int64 ``(M,)``.
        """
        key = (pad, 0)
        r = self._rows.get(key)
        if r is None:
            r = self._rows[key] = padded_row_index(self.n, self.y, self.x, self.height, self.width, pad)
        return r

    def stopped_rows(self, pad: int = 1) -> Tensor:
        """Flat row index of every *stopped* position in a buffer with border ``pad`` (cached).

        The dense fallback at high active fractions overwrites the whole map and restores these, which is cheaper
        than writing the many active ones individually.

        Args:
            pad (int): Border width of the buffer.

        Returns:
            Tensor: int64 ``(N * H * W - M,)``.
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
        """Window tables of a conv whose output is this index's grid (cached).

        Args:
            in_hw (tuple, optional): Interior ``(H_in, W_in)`` of the input buffer; default this index's ``(H, W)``
                (stride 1). For a stride-2 conv pass the finer input's size.
            kernel_size (int): 1 or 3.
            stride (int): 1 or 2.
            padding (int, optional): Conv zero padding; default ``kernel_size // 2``. Must be ``<= in_pad``.
            in_pad (int): Border width of the input buffer.

        Returns:
            tuple: ``(top_left, strips)``: int64 ``(M,)`` flat row of each window's top-left tap in the input
            buffer, and int64 ``(M * k,)`` flat rows where each of the window's k horizontal strips starts, ordered
            (position, ky). A strip is ``k * Cin`` contiguous values, so the gathered ``(M, k, k*Cin)`` block is
            ordered (ky, kx, cin), matching :func:`~mmseg_cbt.ops.conv_weight_matrix`.

        Raises:
            ValueError: On unsupported geometry, a border too thin for the padding, or an output size that does not
                match this index's grid.
        """
        if padding is None:
            padding = kernel_size // 2
        check_geometry(kernel_size, stride, padding)
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
            t = self._windows[key] = (top_left, strips)
        return t

    def chunks(self, table: Tensor, per_position: int, step: int) -> List[Tensor]:
        """Views of ``table`` (one of this index's cached tables) split into chunks of ``step`` positions.

        Args:
            table (Tensor): A table returned by :meth:`rows` or :meth:`windows` (kept alive by this index, so its
                identity is a valid cache key).
            per_position (int): Entries per position in ``table`` (1 for rows / top-left, k for strips).
            step (int): Positions per chunk.

        Returns:
            list[Tensor]: Consecutive views, cached.
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

        For chains of stride-2 convs (HRNet fuse layers i -> i+2): the intermediate conv must be computed on the
        footprint of the next one to keep the result exact.

        Args:
            in_hw (tuple): Input size ``(H_in, W_in)``.
            kernel_size (int): 1 or 3.
            stride (int): 1 or 2.
            padding (int, optional): Conv padding; default ``kernel_size // 2``.

        Returns:
            Tensor: Bool ``(N, H_in, W_in)``.
        """
        if padding is None:
            padding = kernel_size // 2
        top_left, _ = self.windows(in_hw, kernel_size, stride, padding, in_pad=padding)
        h_in, w_in = in_hw
        hp, wp = h_in + 2 * padding, w_in + 2 * padding
        taps = torch.tensor([ky * wp + kx for ky in range(kernel_size) for kx in range(kernel_size)],
                            dtype=torch.int64,
                            device=self.device)
        grid = torch.zeros(self.batch * hp * wp, dtype=torch.bool, device=self.device)
        grid[(top_left[:, None] + taps[None, :]).reshape(-1)] = True
        grid = grid.view(self.batch, hp, wp)
        return grid[:, padding:padding + h_in, padding:padding + w_in].contiguous()

    def __repr__(self) -> str:
        return (f'{type(self).__name__}(shape={self.shape}, active={self.num_active}, '
                f'fraction={self.active_fraction:.3f})')


def check_buffer_matches(buf: Tensor, idx: SparseIndex, pad: int, name: str) -> None:
    """Raises ValueError unless ``buf``'s ``(N, Hp, Wp)`` is the index grid with a ``pad``-wide border."""
    want = (idx.batch, idx.height + 2 * pad, idx.width + 2 * pad)
    if tuple(buf.shape[:3]) != want:
        raise ValueError(f'{name} of shape {tuple(buf.shape)} does not match the index grid '
                         f'{idx.shape} with border {pad} (expected (N, Hp, Wp) = {want})')
