"""Compatibility of mmengine 0.10 checkpoints with torch >= 2.6.

torch 2.6 made ``torch.load(weights_only=True)`` the default, and mmengine 0.10's ``load_from_local`` calls
``torch.load`` without the argument. mmengine's checkpoints carry the message hub (``HistoryBuffer`` of numpy
arrays) in ``message_hub``, so ``tools/test.py``, ``load_from`` and ``resume`` fail with an ``UnpicklingError`` on
any checkpoint mmengine itself wrote. Instead of switching the weights-only loader off globally, we allow exactly
the types those checkpoints contain.
"""
import builtins

__all__ = ['allow_mmengine_checkpoints']


def allow_mmengine_checkpoints() -> None:
    """Registers the types found in mmengine checkpoints as safe globals for torch's weights-only unpickler."""
    import numpy as np
    import torch
    from mmengine.logging import HistoryBuffer

    add = getattr(torch.serialization, 'add_safe_globals', None)
    if add is None:  # torch < 2.4 has no weights-only default to worry about
        return
    try:
        multiarray = np._core.multiarray  # numpy >= 2
    except AttributeError:
        multiarray = np.core.multiarray
    dtype_classes = [type(np.dtype(t)) for t in ('float64', 'float32', 'int64', 'int32', 'bool')]
    # builtins.getattr is how numpy pickles scalar dtypes inside HistoryBuffer; it is listed by torch's own
    # get_unsafe_globals_in_checkpoint for these files.
    add([multiarray._reconstruct, multiarray.scalar, np.ndarray, np.dtype, HistoryBuffer, builtins.getattr] +
        dtype_classes)
