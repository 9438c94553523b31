from .checkpoint import CheckpointMismatchError, load_checkpoint_strict, read_checkpoint
from .compat import allow_mmengine_checkpoints
from .inference import optimize_for_inference, tune_malloc
from .io import atomic_file_set, atomic_path, write_json_atomic
from .meta import meta_padding

__all__ = [
    'CheckpointMismatchError', 'allow_mmengine_checkpoints', 'atomic_file_set', 'atomic_path', 'load_checkpoint_strict',
    'meta_padding', 'optimize_for_inference', 'read_checkpoint', 'tune_malloc', 'write_json_atomic'
]
