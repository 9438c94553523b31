_base_ = [
    '../_base_/models/ee_fcn_hr48.py', 'mmseg::_base_/datasets/ade20k.py', '../_base_/ee_runtime.py',
    'mmseg::_base_/schedules/schedule_160k.py'
]
crop_size = (512, 512)
data_preprocessor = dict(size=crop_size)
# ADE20K has 150 classes: one switch sets every exit and the final head
model = dict(data_preprocessor=data_preprocessor, num_classes=150)
# mIoU / aAcc / mAcc of every exit (exit{n}.mIoU), the final exit also under the plain keys
val_evaluator = dict(type='EarlyExitIoUMetric', iou_metrics=['mIoU'])
test_evaluator = val_evaluator
