# Early-exit plain ViT-B/16 (DToP's host, Liu et al., ICCV 2023): mmseg's VisionTransformer split after blocks 6 and
# 8 of 12 (exit_after 0-based (5, 7, 11)), a per-token exit after each of the first two stages and the same head as
# the final exit. Exit logits lie on the 1/16 token grid; stopped tokens are removed from every later block.
custom_imports = dict(imports=['mmseg_cbt'], allow_failed_imports=False)
num_classes = 19  # Cityscapes by default, as the HRNet bases; the ADE20K configs set 150
data_preprocessor = dict(
    type='SegDataPreProcessor',
    mean=[127.5, 127.5, 127.5],
    std=[127.5, 127.5, 127.5],
    bgr_to_rgb=True,
    pad_val=0,
    seg_pad_val=255)
# what every exit shares (per-token MLP of width 384, DToP's head width for ViT-B)
exit_common = dict(
    type='EarlyExitTokenHead',
    in_channels=768,
    channels=384,
    num_layers=1,
    dropout_ratio=0.0,
    num_classes=num_classes,
    align_corners=False,
    loss_decode=dict(type='CrossEntropyLoss', use_sigmoid=False, loss_weight=1.0))
model = dict(
    type='EarlyExitEncoderDecoder',
    data_preprocessor=data_preprocessor,
    # ImageNet ViT-B/16 converted for mmseg (tools/model_converters/vit2mmseg.py of mmseg); nothing is downloaded
    # here: put the file at this local path (or override model.pretrained / backbone.init_cfg)
    pretrained='pretrain/vit_base_patch16_224_mmseg.pth',
    backbone=dict(
        type='EarlyExitViT',
        exit_after=(5, 7, 11),
        img_size=(512, 512),
        patch_size=16,
        embed_dims=768,
        num_layers=12,
        num_heads=12,
        mlp_ratio=4,
        qkv_bias=True,
        drop_path_rate=0.1,
        with_cls_token=True,
        final_norm=True,
        norm_cfg=dict(type='LN', eps=1e-6),
        interpolate_mode='bicubic'),
    exit_heads=[exit_common, exit_common],
    decode_head=exit_common,
    exit_loss_weights=[1.0, 1.0, 1.0],
    # exit_mode: 'dense' | 'cbt' | 'global' | 'entropy' | 'dtop'; feature_mask: 'none' | 'simulate' | 'sparse'
    test_cfg=dict(
        mode='slide',
        crop_size=(512, 512),
        stride=(341, 341),
        exit_mode='dense',
        dtop_threshold=0.9,
        dtop_topk=5,
        global_threshold=0.9,
        feature_mask='sparse',
        fill='copy'))
