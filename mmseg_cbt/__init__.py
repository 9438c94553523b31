"""mmseg_cbt: early-exit semantic segmentation with class based thresholding for MMSegmentation 1.x.

Importing this package registers every module into mmseg's registries, so a config needs only
``custom_imports=dict(imports=['mmseg_cbt'], allow_failed_imports=False)``.

Without mmsegmentation installed (e.g. a GPU machine used only to test and time the sparse-convolution kernel)
only :mod:`mmseg_cbt.ops`, which needs nothing but torch, is available.
"""
import warnings

from .version import __version__

try:
    import mmseg  # noqa: F401
except ImportError:
    warnings.warn('mmsegmentation is not installed: only mmseg_cbt.ops (the sparse convolution) is available')
    from . import ops  # noqa: F401
    __all__ = ['__version__', 'ops']
else:
    from .utils import allow_mmengine_checkpoints

    # mmengine 0.10 + torch >= 2.6: let tools/test.py, load_from and resume read mmengine's own checkpoints
    allow_mmengine_checkpoints()
    from . import analysis, calibration, engine, evaluation, models, ops, utils, visualization  # noqa: F401,E402
    from .engine import CBTCalibrationHook
    from .evaluation import EarlyExitIoUMetric
    from .models import EarlyExitEncoderDecoder, EarlyExitHRNet, EarlyExitRHHead
    from .visualization import EarlyExitSegLocalVisualizer

    __all__ = [
        '__version__', 'analysis', 'calibration', 'engine', 'evaluation', 'models', 'ops', 'utils', 'visualization',
        'CBTCalibrationHook', 'EarlyExitIoUMetric', 'EarlyExitEncoderDecoder', 'EarlyExitHRNet', 'EarlyExitRHHead',
        'EarlyExitSegLocalVisualizer'
    ]
