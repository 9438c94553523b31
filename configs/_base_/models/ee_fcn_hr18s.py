# Early-exit HRNetV2-W18-Small (ADP-C / CBT "W18"): mmseg's fcn_hr18 model with the hr18s stage settings, an RH
# exit (width 64) after stages 1-3 and mmseg's HRNetV2 FCNHead as the final exit.
_base_ = ['mmseg::_base_/models/fcn_hr18.py']
custom_imports = dict(imports=['mmseg_cbt'], allow_failed_imports=False)
norm_cfg = dict(type='SyncBN', requires_grad=True)
num_classes = 19
# what every RH exit shares (ADP-C's width I = 64); each exit sets its inputs and depth
exit_common = dict(
    type='EarlyExitRHHead',
    channels=64,
    dropout_ratio=-1,
    num_classes=num_classes,
    norm_cfg=norm_cfg,
    align_corners=False,
    loss_decode=dict(type='CrossEntropyLoss', use_sigmoid=False, loss_weight=1.0))
model = dict(
    type='EarlyExitEncoderDecoder',
    pretrained='open-mmlab://msra/hrnetv2_w18_small',
    backbone=dict(
        type='EarlyExitHRNet',
        extra=dict(
            stage1=dict(num_blocks=(2, )),
            stage2=dict(num_blocks=(2, 2)),
            stage3=dict(num_modules=3, num_blocks=(2, 2, 2)),
            stage4=dict(num_modules=2, num_blocks=(2, 2, 2, 2)))),
    exit_heads=[
        dict(exit_common, in_channels=[256], in_index=[0], num_down=3, num_up=2),
        dict(exit_common, in_channels=[18, 36], in_index=[0, 1], num_down=2, num_up=1),
        dict(exit_common, in_channels=[18, 36, 72], in_index=[0, 1, 2], num_down=1, num_up=0),
    ],
    decode_head=dict(num_classes=num_classes),
    exit_loss_weights=[1.0, 1.0, 1.0, 1.0],
    # exit_mode: 'dense' | 'cbt' | 'global' | 'entropy'; feature_mask: 'none' | 'simulate' | 'sparse'
    test_cfg=dict(mode='whole', exit_mode='dense', global_threshold=0.998, feature_mask='sparse', fill='copy'))
