# A PLAIN mmseg model (an EncoderDecoder without exits): mmseg's own HRNetV2 FCN config (`fcn_hr18.py` from the
# installed wheel) with tiny widths (8/16/32/64, one block per branch), trained on the built-in toy-city data with
# mmseg's tools/train.py. tools/e2cm.py turns its checkpoint into an early-exit model with class-mean exits. (The
# plugin is imported for the rules of the repository's configs; the model uses nothing from it.)
_base_ = ['mmseg::_base_/models/fcn_hr18.py', '../_base_/datasets/toy_city.py', 'mmseg::_base_/default_runtime.py']
custom_imports = dict(imports=['mmseg_cbt'], allow_failed_imports=False)
norm_cfg = dict(type='BN', requires_grad=True)
num_classes = 19
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
    visualization=dict(type='SegVisualizationHook'))
randomness = dict(seed=0)
val_evaluator = dict(type='IoUMetric', iou_metrics=['mIoU'])
test_evaluator = val_evaluator
