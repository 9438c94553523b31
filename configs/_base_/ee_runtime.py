# Per-exit evaluation and CBT calibration on top of mmseg's default runtime.
_base_ = ['mmseg::_base_/default_runtime.py']
val_evaluator = dict(type='EarlyExitIoUMetric', iou_metrics=['mIoU'])
test_evaluator = val_evaluator
# Calibrates the CBT thresholds from training pixels after training, before the last checkpoint is written.
cbt_alpha = 0.99
cbt_beta = 0.998
custom_hooks = [dict(type='CBTCalibrationHook', alpha=cbt_alpha, beta=cbt_beta, share_exits=True)]
