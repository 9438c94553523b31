from .compat import allow_mmengine_checkpoints
from .inference import optimize_for_inference, tune_malloc
from .io import atomic_path, write_json_atomic

__all__ = ['allow_mmengine_checkpoints', 'atomic_path', 'optimize_for_inference', 'tune_malloc', 'write_json_atomic']
