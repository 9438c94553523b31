from .cbt_calibration_hook import CBTCalibrationHook
from .e2cm_hooks import ClassAwareInitHook, E2CMConversionHook, EarlyExitFreezeHook

__all__ = ['CBTCalibrationHook', 'E2CMConversionHook', 'ClassAwareInitHook', 'EarlyExitFreezeHook']
