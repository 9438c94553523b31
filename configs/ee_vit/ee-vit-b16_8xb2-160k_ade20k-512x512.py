# DToP's ADE20K ViT-B/16 setting: 512x512 crops, slide inference crop 512 stride 341, the schedule of
# dtop_ade20k_schedule.py (160k iterations, AdamW).
_base_ = [
    '../_base_/models/ee_vit-b16.py', 'mmseg::_base_/datasets/ade20k.py', '../_base_/ee_runtime.py',
    './dtop_ade20k_schedule.py'
]
crop_size = (512, 512)
model = dict(data_preprocessor=dict(size=crop_size), num_classes=150)
# CBT thresholds for ADE20K in [0.9, 0.99] (DToP's global threshold for ViT-B is 0.9)
train_dataloader = dict(batch_size=2)  # x 8 GPUs = DToP's batch 16
custom_hooks = [dict(type='CBTCalibrationHook', alpha=0.9, beta=0.99, share_exits=True)]
# mIoU / aAcc / mAcc of every exit (exit{n}.mIoU), the final exit also under the plain keys
val_evaluator = dict(type='EarlyExitIoUMetric', iou_metrics=['mIoU'])
test_evaluator = val_evaluator
