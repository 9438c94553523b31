"""mmseg_cbt: early-exit semantic segmentation with class based thresholding for MMSegmentation 1.x.

Importing this package registers every module into mmseg's registries, so a config needs only
``custom_imports=dict(imports=['mmseg_cbt'], allow_failed_imports=False)``.
"""
from .version import __version__
from .utils import allow_mmengine_checkpoints

allow_mmengine_checkpoints()  # mmengine 0.10 + torch >= 2.6: let tools/test.py and resume read mmengine checkpoints
from . import analysis, calibration, datasets, engine, evaluation, models, ops, utils  # noqa: F401  (registers the modules)
from .engine import CBTCalibrationHook
from .evaluation import EarlyExitIoUMetric
from .models import EarlyExitEncoderDecoder, EarlyExitHRNet, EarlyExitRHHead

__all__ = [
    '__version__', 'analysis', 'utils', 'calibration', 'datasets', 'engine', 'evaluation', 'models', 'ops', 'CBTCalibrationHook',
    'EarlyExitIoUMetric', 'EarlyExitEncoderDecoder', 'EarlyExitHRNet', 'EarlyExitRHHead'
]
