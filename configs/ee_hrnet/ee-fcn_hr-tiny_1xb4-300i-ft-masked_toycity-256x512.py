# Fine-tuning stage of the toy-city model with the stop masks active (ADP-C trains with its masks on): the model is
# trained for the computation it gets at inference. Masks come from the current predictions with the calibrated
# CBT thresholds of the loaded checkpoint, stages 2-4 and exits 2-4 run through the simulated masked path with the
# same fill rule as the sparse kernel, no gradient through the masks. The CBT hook recalibrates at the end.
#   python tools/train.py configs/ee_hrnet/ee-fcn_hr-tiny_1xb4-300i-ft-masked_toycity-256x512.py \
#       --cfg-options load_from=work_dirs/toycity_demo/iter_1000.pth
# Measured on toy city (README): +0.9 mIoU at equal GFLOPs against the same fine-tuning without masks.
_base_ = ['./ee-fcn_hr-tiny_1xb4-1k_toycity-256x512.py']
max_iters = 300
model = dict(train_cfg=dict(masked_training=dict(exit_mode='cbt', fill='copy')))
load_from = 'work_dirs/toycity_demo/iter_1000.pth'
optim_wrapper = dict(optimizer=dict(lr=5e-4))
param_scheduler = [
    dict(type='LinearLR', start_factor=0.1, by_epoch=False, begin=0, end=50),
    dict(type='PolyLR', eta_min=1e-5, power=0.9, begin=50, end=max_iters, by_epoch=False),
]
train_cfg = dict(max_iters=max_iters, val_interval=max_iters)
default_hooks = dict(checkpoint=dict(interval=max_iters))
