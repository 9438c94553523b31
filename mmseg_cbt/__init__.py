"""mmseg_cbt: early-exit semantic segmentation with class based thresholding for MMSegmentation 1.x.

Importing this package registers every module into mmseg's registries, so a config needs only
``custom_imports=dict(imports=['mmseg_cbt'], allow_failed_imports=False)``.
"""
from .version import __version__
from . import calibration, datasets, engine, evaluation, models, ops  # noqa: F401  (registers the modules)
from .engine import CBTCalibrationHook
from .evaluation import EarlyExitIoUMetric
from .models import EarlyExitEncoderDecoder, EarlyExitHRNet, EarlyExitRHHead

__all__ = [
    '__version__', 'calibration', 'datasets', 'engine', 'evaluation', 'models', 'ops', 'CBTCalibrationHook',
    'EarlyExitIoUMetric', 'EarlyExitEncoderDecoder', 'EarlyExitHRNet', 'EarlyExitRHHead'
]
