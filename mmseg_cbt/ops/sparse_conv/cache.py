"""Per-tensor caches of what :func:`~mmseg_cbt.ops.sparse_conv2d` derives from its mask and its weight.

A caller of the one-conv op passes the same mask to several convs and the same weight on every call; the index of a
mask (``nonzero`` and the window tables), the GEMM matrix of a weight (a permuted copy: 5 MB for a 384-channel 3x3
conv, the time of a quarter of the conv) and the compiled kernel's packed weights of that matrix (the wide direct
variant's vector-major layout, as large and as dear to build; the stage API's packed convs use this cache too) are
therefore built once and reused while the tensor is alive and unchanged. An entry is valid for the very tensor
object it was built from, at the same version counter (any in-place change bumps it) and storage address; it is
dropped when that tensor is freed, and the oldest entries go first beyond :data:`MAX_ENTRIES`. Inference tensors
(``torch.inference_mode``) have no version counter and are not cached, unless registered as snapshots that nothing
changes in place (:func:`mark_snapshot`: a :class:`~mmseg_cbt.ops.PackedConv`'s matrix).
"""
from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from types import ModuleType
from typing import Callable, Hashable, Optional, Tuple, TypeVar

import torch
from torch import Tensor

from .index import SparseIndex
from .packing import conv_weight_matrix

__all__ = [
    'MAX_ENTRIES', 'MAX_INDEX_ENTRIES', 'MAX_PACK_ENTRIES', 'TensorCache', 'cached_all', 'cached_index',
    'cached_weight_matrix', 'cached_wide_pack', 'clear_caches', 'mark_snapshot'
]

#: Entries kept per cache (the weights of a network's masked convs). An index holds its mask, so a mask stays alive
#: while its entry does: fewer of those are kept (:data:`MAX_INDEX_ENTRIES`).
MAX_ENTRIES = 256
#: Masks (and their indexes) kept: those of a few exits and resolutions.
MAX_INDEX_ENTRIES = 16
#: Packed weights kept: every masked conv of a large network (HRNet-W48 runs 290 through the wide variant; a
#: sequential pass over more convs than entries would miss on every one). They hold about as much memory as those
#: convs' weights.
MAX_PACK_ENTRIES = 1024

V = TypeVar('V')

# id -> tensor of the registered snapshots (weak: a snapshot leaves with its tensor)
_SNAPSHOTS: 'weakref.WeakValueDictionary[int, Tensor]' = weakref.WeakValueDictionary()


def mark_snapshot(t: Tensor) -> Tensor:
    """Registers ``t`` as a snapshot that is never changed in place, so that what the caches derive from it is kept
    also when it is an inference tensor (which has no version counter to detect a change).

    Args:
        t (Tensor): A tensor its owner never writes after creating it.

    Returns:
        Tensor: ``t``.
    """
    _SNAPSHOTS[id(t)] = t
    return t


def _is_snapshot(t: Tensor) -> bool:
    return _SNAPSHOTS.get(id(t)) is t


class TensorCache:
    """A bounded map from a live, unmodified tensor (plus a key) to a value derived from it.

    Args:
        max_entries (int): Entries kept; the least recently used goes first.
    """

    def __init__(self, max_entries: int = MAX_ENTRIES) -> None:
        self.max_entries = max_entries
        self._entries: OrderedDict = OrderedDict()
        self._lock = threading.RLock()  # re-entered by a weakref callback when an eviction frees a key

    def __len__(self) -> int:
        return len(self._entries)

    @staticmethod
    def _stamp(t: Tensor) -> Tuple[int, int]:
        return (-1 if t.is_inference() else t._version), t.data_ptr()

    def get(self, t: Tensor, key: Hashable, make: Callable[[], V]) -> V:
        """The value of ``(t, key)``, built by ``make()`` when there is none for ``t`` as it is now.

        Args:
            t (Tensor): The tensor the value is derived from.
            key (Hashable): What else the value depends on.
            make (Callable): Builds the value.

        Returns:
            The cached or newly built value.
        """
        if t.is_inference() and not _is_snapshot(t):
            return make()
        slot = (id(t), key)
        stamp = self._stamp(t)
        with self._lock:
            entry = self._entries.get(slot)
            if entry is not None and entry[0]() is t and entry[1] == stamp:
                self._entries.move_to_end(slot)
                return entry[2]
        value = make()
        with self._lock:
            # the entry goes when t is freed (its id may then be reused by another tensor)
            ref = weakref.ref(t, lambda _, s=slot: self._drop(s))
            self._entries[slot] = (ref, stamp, value)
            self._entries.move_to_end(slot)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
        return value

    def _drop(self, slot: Hashable) -> None:
        with self._lock:
            entry = self._entries.get(slot)
            if entry is not None and entry[0]() is None:
                del self._entries[slot]

    def clear(self) -> None:
        """Drops every entry."""
        with self._lock:
            self._entries.clear()


_INDEX = TensorCache(MAX_INDEX_ENTRIES)
_ALL = TensorCache(MAX_INDEX_ENTRIES)
_WMAT = TensorCache()
_WIDE = TensorCache(MAX_PACK_ENTRIES)


def cached_index(mask: Tensor) -> SparseIndex:
    """:meth:`SparseIndex.build` of ``mask``, reused while the mask is alive and unchanged (its tables too)."""
    return _INDEX.get(mask, 'index', lambda: SparseIndex.build(mask))


def cached_all(mask: Tensor) -> bool:
    """``bool(mask.all())``, reused while the mask is alive and unchanged (a reduction and a sync of ~0.1 ms at
    128x256 on 2 cores: a tenth of a thin conv)."""
    return _ALL.get(mask, 'all', lambda: bool(mask.all()))


def cached_weight_matrix(weight: Tensor) -> Tensor:
    """:func:`~mmseg_cbt.ops.conv_weight_matrix` of ``weight``, reused while the weight is alive and unchanged."""
    return _WMAT.get(weight, 'wmat', lambda: conv_weight_matrix(weight.detach()))


def cached_wide_pack(ext: ModuleType, wmat: Tensor, direct: int) -> Optional[Tensor]:
    """The compiled kernel's packed weights of ``wmat`` when its ``direct`` mode runs the wide variant (else None),
    reused while ``wmat`` is alive and unchanged: a stage's packed convs and the op's cached matrices keep theirs.

    Args:
        ext (ModuleType): The compiled CPU kernel.
        wmat (Tensor): ``(k*k*Cin, Cout)`` float32 weight matrix.
        direct (int): The kernel's ``direct`` argument for the call (:func:`~mmseg_cbt.ops.policy.direct_flag`).

    Returns:
        Tensor or None: ``ext.pack_wide(wmat)``, or None where the wide variant does not run.
    """
    if direct == 0 or wmat.dtype != torch.float32 or not ext.runs_wide(direct, wmat.shape[1]):
        return None
    return _WIDE.get(wmat, 'wide', lambda: ext.pack_wide(wmat))


def clear_caches() -> None:
    """Empties the index and weight caches of :func:`~mmseg_cbt.ops.sparse_conv2d` and the packed weights of the
    compiled kernel."""
    _INDEX.clear()
    _ALL.clear()
    _WMAT.clear()
    _WIDE.clear()
