_base_ = [
    '../_base_/models/ee_fcn_hr48.py', 'mmseg::_base_/datasets/cityscapes.py', '../_base_/ee_runtime.py',
    'mmseg::_base_/schedules/schedule_80k.py'
]
crop_size = (512, 1024)
data_preprocessor = dict(size=crop_size)
model = dict(data_preprocessor=data_preprocessor)
# mIoU / aAcc / mAcc of every exit (exit{n}.mIoU), the final exit also under the plain keys
val_evaluator = dict(type='EarlyExitIoUMetric', iou_metrics=['mIoU'])
test_evaluator = val_evaluator
