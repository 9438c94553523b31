# Early-exit HRNetV2-W48 (ADP-C's main model): RH exits of width 128 after stages 1-3, mmseg's HRNetV2 FCNHead as
# the final exit. Dense multiply-adds at 2048x1024 (2^30 units): 41.9 / 105.6 / 368.0 / 701.3 in ADP-C.
_base_ = ['mmseg::_base_/models/fcn_hr18.py']
custom_imports = dict(imports=['mmseg_cbt'], allow_failed_imports=False)
norm_cfg = dict(type='SyncBN', requires_grad=True)
num_classes = 19
# what every RH exit shares (ADP-C's width I = 128); each exit sets its inputs and depth
exit_common = dict(
    type='EarlyExitRHHead',
    channels=128,
    dropout_ratio=-1,
    num_classes=num_classes,
    norm_cfg=norm_cfg,
    align_corners=False,
    loss_decode=dict(type='CrossEntropyLoss', use_sigmoid=False, loss_weight=1.0))
model = dict(
    type='EarlyExitEncoderDecoder',
    pretrained='open-mmlab://msra/hrnetv2_w48',
    backbone=dict(
        type='EarlyExitHRNet',
        extra=dict(
            stage2=dict(num_channels=(48, 96)),
            stage3=dict(num_channels=(48, 96, 192)),
            stage4=dict(num_channels=(48, 96, 192, 384)))),
    exit_heads=[
        dict(exit_common, in_channels=[256], in_index=[0], num_down=3, num_up=2),
        dict(exit_common, in_channels=[48, 96], in_index=[0, 1], num_down=2, num_up=1),
        dict(exit_common, in_channels=[48, 96, 192], in_index=[0, 1, 2], num_down=1, num_up=0),
    ],
    decode_head=dict(in_channels=[48, 96, 192, 384], channels=sum([48, 96, 192, 384]), num_classes=num_classes),
    exit_loss_weights=[1.0, 1.0, 1.0, 1.0],
    test_cfg=dict(mode='whole', exit_mode='dense', global_threshold=0.998, feature_mask='sparse', fill='copy'))
