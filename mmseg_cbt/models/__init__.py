from .backbones import *  # noqa: F401,F403
from .backbones import __all__ as _b
from .decode_heads import *  # noqa: F401,F403
from .decode_heads import __all__ as _d
from .segmentors import *  # noqa: F401,F403
from .segmentors import __all__ as _s

__all__ = _b + _d + _s
