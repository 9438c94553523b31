from .cbt_calibration_hook import CBTCalibrationHook

__all__ = ['CBTCalibrationHook']
