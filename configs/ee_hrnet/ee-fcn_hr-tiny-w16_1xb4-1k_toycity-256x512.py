# The demo model: the tiny early-exit HRNet with branch widths 16/32/64/128 (twice the test model's) and AdamW at
# lr 4e-3, the best of the schedules measured within the demo's ~15-minute training budget on 2 CPU cores
# (tools/misc/demo_schedule_study.py; table in docs/demo_model.md). The per-iteration time barely grows with the
# width at this size (the narrow model is bound by per-op overhead), so the wider model is nearly free.
_base_ = ['./ee-fcn_hr-tiny_1xb4-1k_toycity-256x512.py']
widths = [16, 32, 64, 128]
norm_cfg = dict(type='BN', requires_grad=True)
# a child config replaces lists whole, so the exits are given in full (as in the base, wider inputs)
exit_common = dict(
    type='EarlyExitRHHead',
    channels=32,
    dropout_ratio=-1,
    num_classes=19,
    norm_cfg=norm_cfg,
    align_corners=False,
    loss_decode=dict(type='CrossEntropyLoss', use_sigmoid=False, loss_weight=1.0))
model = dict(
    backbone=dict(
        extra=dict(
            stage1=dict(num_channels=(2 * widths[0], )),
            stage2=dict(num_channels=tuple(widths[:2])),
            stage3=dict(num_channels=tuple(widths[:3])),
            stage4=dict(num_channels=tuple(widths)))),
    exit_heads=[
        dict(exit_common, in_channels=[8 * widths[0]], in_index=[0], num_down=3, num_up=2),
        dict(exit_common, in_channels=widths[:2], in_index=[0, 1], num_down=2, num_up=1),
        dict(exit_common, in_channels=widths[:3], in_index=[0, 1, 2], num_down=1, num_up=0),
    ],
    decode_head=dict(in_channels=widths, channels=sum(widths)))
optim_wrapper = dict(optimizer=dict(lr=4e-3))
