# DToP's ADE20K optimisation (Liu et al., ICCV 2023): 160k iterations, AdamW lr 2e-5, weight decay 0.01, exit and
# decode heads at 10x lr, 1500 linear warm-up iterations then poly 0.9; batch 16 (8 GPUs x 2).
_base_ = ['mmseg::_base_/schedules/schedule_160k.py']
optim_wrapper = dict(
    _delete_=True,
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=2e-5, betas=(0.9, 0.999), weight_decay=0.01),
    paramwise_cfg=dict(custom_keys=dict(exit_heads=dict(lr_mult=10.0), decode_head=dict(lr_mult=10.0))))
param_scheduler = [
    dict(type='LinearLR', start_factor=1e-6, by_epoch=False, begin=0, end=1500),
    dict(type='PolyLR', eta_min=0.0, power=0.9, begin=1500, end=160000, by_epoch=False),
]
