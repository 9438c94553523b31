# DToP's ADE20K ViT-L/16 setting: exits after blocks 8 and 16 of 24 (0-based (7, 15, 23)), head width 512, 640x640
# crops (mmseg's ade20k_640x640 pipeline), slide inference crop 640 stride 320, global threshold 0.95.
_base_ = [
    '../_base_/models/ee_vit-b16.py', 'mmseg::_base_/datasets/ade20k_640x640.py', '../_base_/ee_runtime.py',
    './dtop_ade20k_schedule.py'
]
crop_size = (640, 640)
exit_common = dict(
    type='EarlyExitTokenHead',
    in_channels=1024,
    channels=512,
    num_layers=1,
    dropout_ratio=0.0,
    num_classes=150,
    align_corners=False,
    loss_decode=dict(type='CrossEntropyLoss', use_sigmoid=False, loss_weight=1.0))
model = dict(
    data_preprocessor=dict(size=crop_size),
    num_classes=150,
    # ImageNet-21k ViT-L/16 converted for mmseg (mmseg's vit2mmseg.py), from a local path: nothing is downloaded
    pretrained='pretrain/vit_large_patch16_384_mmseg.pth',
    backbone=dict(exit_after=(7, 15, 23), img_size=crop_size, embed_dims=1024, num_layers=24, num_heads=16),
    exit_heads=[exit_common, exit_common],
    decode_head=exit_common,
    test_cfg=dict(crop_size=crop_size, stride=(320, 320), dtop_threshold=0.95, global_threshold=0.95))
train_dataloader = dict(batch_size=2)  # x 8 GPUs = DToP's batch 16
custom_hooks = [dict(type='CBTCalibrationHook', alpha=0.95, beta=0.995, share_exits=True)]
val_evaluator = dict(type='EarlyExitIoUMetric', iou_metrics=['mIoU'])
test_evaluator = val_evaluator
