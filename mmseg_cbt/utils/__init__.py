from .compat import allow_mmengine_checkpoints
from .io import atomic_path, write_json_atomic

__all__ = ['allow_mmengine_checkpoints', 'atomic_path', 'write_json_atomic']
