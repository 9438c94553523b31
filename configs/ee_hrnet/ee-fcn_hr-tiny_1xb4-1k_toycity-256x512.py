# A tiny early-exit HRNet (widths 8/16/32/64, one block per branch) on the built-in toy-city data: trains from
# scratch on 2 CPU cores in a few minutes with mmseg's tools/train.py. The CBT calibration hook runs after training.
_base_ = ['../_base_/models/ee_fcn_hr18s.py', '../_base_/datasets/toy_city.py', '../_base_/ee_runtime.py']
norm_cfg = dict(type='BN', requires_grad=True)
num_classes = 19
exit_common = dict(
    type='EarlyExitRHHead',
    channels=32,
    dropout_ratio=-1,
    num_classes=num_classes,
    norm_cfg=norm_cfg,
    align_corners=False,
    loss_decode=dict(type='CrossEntropyLoss', use_sigmoid=False, loss_weight=1.0))
model = dict(
    pretrained=None,  # no hub weights on these machines: trained from scratch
    data_preprocessor=dict(size=(256, 256)),
    backbone=dict(
        norm_cfg=norm_cfg,
        extra=dict(
            stage1=dict(num_modules=1, num_branches=1, block='BOTTLENECK', num_blocks=(1, ), num_channels=(16, )),
            stage2=dict(num_modules=1, num_branches=2, block='BASIC', num_blocks=(1, 1), num_channels=(8, 16)),
            stage3=dict(num_modules=1, num_branches=3, block='BASIC', num_blocks=(1, 1, 1), num_channels=(8, 16, 32)),
            stage4=dict(
                num_modules=1, num_branches=4, block='BASIC', num_blocks=(1, 1, 1, 1), num_channels=(8, 16, 32, 64)))),
    exit_heads=[
        dict(exit_common, in_channels=[64], in_index=[0], num_down=3, num_up=2),
        dict(exit_common, in_channels=[8, 16], in_index=[0, 1], num_down=2, num_up=1),
        dict(exit_common, in_channels=[8, 16, 32], in_index=[0, 1, 2], num_down=1, num_up=0),
    ],
    decode_head=dict(
        in_channels=[8, 16, 32, 64], channels=sum([8, 16, 32, 64]), num_classes=num_classes, norm_cfg=norm_cfg))

max_iters = 1000
optim_wrapper = dict(
    type='OptimWrapper', optimizer=dict(type='AdamW', lr=2e-3, betas=(0.9, 0.999), weight_decay=0.01), clip_grad=None)
param_scheduler = [
    dict(type='LinearLR', start_factor=0.1, by_epoch=False, begin=0, end=50),
    dict(type='PolyLR', eta_min=1e-5, power=0.9, begin=50, end=max_iters, by_epoch=False),
]
train_cfg = dict(type='IterBasedTrainLoop', max_iters=max_iters, val_interval=max_iters)
val_cfg = dict(type='ValLoop')
test_cfg = dict(type='TestLoop')
default_hooks = dict(
    timer=dict(type='IterTimerHook'),
    logger=dict(type='LoggerHook', interval=50, log_metric_by_epoch=False),
    param_scheduler=dict(type='ParamSchedulerHook'),
    checkpoint=dict(type='CheckpointHook', by_epoch=False, interval=max_iters, max_keep_ckpts=2),
    sampler_seed=dict(type='DistSamplerSeedHook'),
    # draws nothing unless tools/test.py gets --show-dir / --show; then every test image (mmseg's default: every 50th)
    visualization=dict(type='SegVisualizationHook', interval=1))
# CBT calibration on the training split (test pipeline), thresholds mapped into [0.9, 0.998] for this small model
custom_hooks = [dict(type='CBTCalibrationHook', alpha=0.9, beta=0.998, share_exits=True)]
randomness = dict(seed=0)
# mIoU / aAcc / mAcc of every exit (exit{n}.mIoU), the final exit also under the plain keys
val_evaluator = dict(type='EarlyExitIoUMetric', iou_metrics=['mIoU'])
test_evaluator = val_evaluator
