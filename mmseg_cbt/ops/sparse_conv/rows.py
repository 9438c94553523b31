"""Row-level operations on padded buffers: gather / scatter of active rows, residual sources, weighted row sums."""
from __future__ import annotations

from typing import Optional, Tuple

from torch import Tensor

from .cpp_impl import cpu_ext_for
from .index import SparseIndex, check_buffer_matches
from .layout import check_buffer

__all__ = ['add_weighted_rows_', 'gather_rows', 'residual_source', 'rows_epilogue', 'scatter_rows']


def gather_rows(buf: Tensor, idx: SparseIndex, pad: int = 1) -> Tensor:
    """Gathers the feature rows of the active positions from a padded buffer.

    Args:
        buf (Tensor): Buffer ``(N, H + 2 pad, W + 2 pad, C)`` at the index's resolution.
        idx (SparseIndex): The index.
        pad (int): Its border width.

    Returns:
        Tensor: ``(M, C)`` compact rows (a copy).
    """
    check_buffer(buf)
    check_buffer_matches(buf, idx, pad, 'buffer')
    return buf.view(-1, buf.shape[-1]).index_select(0, idx.rows(pad))


def scatter_rows(buf: Tensor, idx: SparseIndex, rows: Tensor, pad: int = 1) -> Tensor:
    """Writes compact rows into the active positions of a padded buffer, in place.

    Stopped positions and the border are left untouched.

    Args:
        buf (Tensor): Buffer ``(N, H + 2 pad, W + 2 pad, C)`` at the index's resolution.
        idx (SparseIndex): The index.
        rows (Tensor): ``(M, C)``.
        pad (int): Border width of ``buf``.

    Returns:
        Tensor: ``buf``.
    """
    check_buffer(buf)
    check_buffer_matches(buf, idx, pad, 'buffer')
    if rows.shape != (idx.num_active, buf.shape[-1]):
        raise ValueError(f'rows must be {(idx.num_active, buf.shape[-1])}, got {tuple(rows.shape)}')
    buf.view(-1, buf.shape[-1]).index_copy_(0, idx.rows(pad), rows)
    return buf


def add_weighted_rows_(acc: Tensor, src: Tensor, rows: Tensor, weights: Tensor, backend: str = 'auto') -> Tensor:
    """``acc[i] += sum_t weights[i, t] * src[rows[i, t]]`` in place (e.g. bilinear upsampling at active rows only).

    Args:
        acc (Tensor): ``(M, C)`` contiguous rows, updated in place.
        src (Tensor): ``(R, C)`` source rows (e.g. a padded buffer's ``view(-1, C)``).
        rows (Tensor): int64 ``(M, T)`` source row of each tap.
        weights (Tensor): ``(M, T)`` tap weights.
        backend (str): ``'auto'`` (the compiled CPU kernel for float32/64 CPU tensors when built: one pass over
            ``acc``), ``'torch'`` (T ``index_select`` + ``addcmul_`` passes) or ``'cpp'``.

    Returns:
        Tensor: ``acc``.
    """
    if rows.dim() != 2 or tuple(weights.shape) != tuple(rows.shape) or rows.shape[0] != acc.shape[0]:
        raise ValueError(f'rows and weights must both be (M, T) with M = {acc.shape[0]}, got '
                         f'{tuple(rows.shape)} and {tuple(weights.shape)}')
    if src.dim() != 2 or src.shape[1] != acc.shape[1]:
        raise ValueError(f'src must be (rows, {acc.shape[1]}), got {tuple(src.shape)}')
    if backend not in ('auto', 'torch', 'cpp'):
        raise ValueError(f"backend must be 'auto', 'torch' or 'cpp', got {backend!r}")
    ext = None if backend == 'torch' or not acc.is_contiguous() else cpu_ext_for(backend, acc)
    if ext is not None and rows.shape[0]:
        ext.add_weighted_rows(acc, src.contiguous(), rows.contiguous(), weights.to(acc.dtype).contiguous())
        return acc
    for t in range(rows.shape[1]):
        acc.addcmul_(src.index_select(0, rows[:, t]), weights[:, t:t + 1])
    return acc


def residual_source(residual: Optional[Tensor], idx: SparseIndex, res_pad: int,
                    cout: int) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    """Validates a residual and returns ``(flat source, rows)``; rows is None for compact rows ``(M, Cout)``.

    Args:
        residual (Tensor, optional): Compact rows ``(M, Cout)`` or a padded buffer at the index's resolution.
        idx (SparseIndex): The output index.
        res_pad (int): Border of a residual buffer.
        cout (int): Output channels of the conv.

    Returns:
        tuple: ``(source, rows)``, both None without a residual.
    """
    if residual is None:
        return None, None
    if residual.dim() == 4:
        check_buffer(residual, 'residual buffer')
        check_buffer_matches(residual, idx, res_pad, 'residual buffer')
        if residual.shape[-1] != cout:
            raise ValueError(f'residual has {residual.shape[-1]} channels, conv output has {cout}')
        return residual.view(-1, cout), idx.rows(res_pad)
    if tuple(residual.shape) != (idx.num_active, cout) or not residual.is_contiguous():
        raise ValueError(f'residual must be contiguous rows {(idx.num_active, cout)} or a padded '
                         f'buffer, got {tuple(residual.shape)}')
    return residual, None


def rows_epilogue(rows: Tensor, res_src: Optional[Tensor], res_rows: Optional[Tensor], relu: bool) -> Tensor:
    """Adds the residual (as returned by :func:`residual_source`) to active rows and applies ReLU, in place."""
    if res_src is not None:
        rows.add_(res_src if res_rows is None else res_src.index_select(0, res_rows))
    if relu:
        rows.relu_()
    return rows
