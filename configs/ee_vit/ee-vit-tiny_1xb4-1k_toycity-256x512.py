# A tiny early-exit ViT (patch 8, width 64, 6 blocks, 4 heads, exits after blocks 2 and 4 of 6) with per-token exits
# on the built-in toy-city data; data, schedule, hooks and evaluator are the tiny HRNet's, so it also trains from
# scratch on 2 CPU cores in minutes with mmseg's tools/train.py (the CBT calibration hook runs after training).
_base_ = ['../ee_hrnet/ee-fcn_hr-tiny_1xb4-1k_toycity-256x512.py']
exit_common = dict(
    type='EarlyExitTokenHead',
    in_channels=64,
    channels=64,
    num_layers=1,
    dropout_ratio=0.0,
    num_classes=19,
    align_corners=False,
    loss_decode=dict(type='CrossEntropyLoss', use_sigmoid=False, loss_weight=1.0))
model = dict(
    _delete_=True,
    type='EarlyExitEncoderDecoder',
    data_preprocessor=dict(
        type='SegDataPreProcessor',
        mean=[123.675, 116.28, 103.53],
        std=[58.395, 57.12, 57.375],
        bgr_to_rgb=True,
        pad_val=0,
        seg_pad_val=255,
        size=(256, 256)),
    backbone=dict(
        type='EarlyExitViT',
        exit_after=(1, 3, 5),
        img_size=(256, 256),
        patch_size=8,
        embed_dims=64,
        num_layers=6,
        num_heads=4,
        final_norm=True),
    exit_heads=[exit_common, exit_common],
    decode_head=exit_common,
    # exit_mode: 'dense' | 'cbt' | 'global' | 'entropy' | 'dtop'; feature_mask: 'none' | 'simulate' | 'sparse'
    test_cfg=dict(
        mode='whole',
        exit_mode='dense',
        dtop_threshold=0.9,
        dtop_topk=5,
        global_threshold=0.9,
        feature_mask='sparse',
        fill='copy'))
optim_wrapper = dict(optimizer=dict(lr=1e-3))
