# Fine-tunes the RH exits of the tiny early-exit HRNet on top of a TRAINED PLAIN model (the backbone and the final
# FCN exit stay fixed), with the exits' classifiers first initialised from the class means of their inputs
# (class-aware initialisation, mixed with the default initialisation by alpha). The plain checkpoint, e.g. of
# configs/e2cm/fcn_hr-tiny_1xb4-1k_toycity-256x512.py, is given as load_from:
#   python tools/train.py configs/e2cm/ee-fcn_hr-tiny_1xb4-200i-classaware-ft_toycity-256x512.py \
#       --cfg-options load_from=work_dirs/fcn_hr-tiny_1xb4-1k_toycity-256x512/iter_1000.pth
# (mmengine's load_from is not strict: the exits are new, everything else comes from the plain checkpoint).
_base_ = ['../ee_hrnet/ee-fcn_hr-tiny_1xb4-1k_toycity-256x512.py']
max_iters = 200
train_cfg = dict(type='IterBasedTrainLoop', max_iters=max_iters, val_interval=max_iters)
param_scheduler = [dict(type='PolyLR', eta_min=1e-5, power=0.9, begin=0, end=max_iters, by_epoch=False)]
default_hooks = dict(checkpoint=dict(type='CheckpointHook', by_epoch=False, interval=max_iters, max_keep_ckpts=1))
custom_hooks = [
    dict(type='EarlyExitFreezeHook', modules=['backbone', 'decode_head']),
    dict(type='ClassAwareInitHook', alpha=0.6),
    dict(type='CBTCalibrationHook', alpha=0.9, beta=0.998, share_exits=True),
]
