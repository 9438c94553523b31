# CBT calibration on top of mmseg's default runtime. (The per-exit evaluator is set in each leaf config: the
# dataset bases define val_evaluator too, and mmengine forbids the same key in two bases.)
_base_ = ['mmseg::_base_/default_runtime.py']
# Calibrates the CBT thresholds from training pixels after training, before the last checkpoint is written.
# A child config that wants another range restates the hook: custom_hooks = [dict(type=..., alpha=..., beta=...)]
custom_hooks = [dict(type='CBTCalibrationHook', alpha=0.99, beta=0.998, share_exits=True)]
# `tools/test.py ... --show-dir DIR` / `--show` draw, per image, the image, the ground truth, the exit map (where
# pixels stopped) and every exit's prediction (mmseg's SegLocalVisualizer draws only the final prediction).
visualizer = dict(type='EarlyExitSegLocalVisualizer', vis_backends=[dict(type='LocalVisBackend')], name='visualizer')
