# DToP's ADE20K ViT-B/16 host as published (Liu et al., ICCV 2023): SegViT's attention-to-mask head at both exits
# and as the decode head, width 384, 3 decoder layers, 6 heads, one query per ADE20K class; the stage split,
# crops, slide inference and schedule of ee-vit-b16_8xb2-160k_ade20k-512x512.py. Its scores are probabilities
# (p(present) x sigmoid(mask)): DToP's rule reads them directly, with threshold 0.9 and top-5 retention.
_base_ = ['./ee-vit-b16_8xb2-160k_ade20k-512x512.py']
atm_head = dict(
    type='EarlyExitATMHead',
    in_channels=768,
    channels=384,
    num_layers=3,
    num_heads=6,
    dropout=0.1,
    num_classes=150,
    align_corners=False,
    mask_loss='focal',
    cls_weight=1.0,
    mask_weight=20.0,
    dice_weight=1.0)
# exit_heads is a list (replaced as a whole); decode_head a dict (merged unless _delete_)
model = dict(exit_heads=[atm_head, atm_head], decode_head=dict(_delete_=True, **atm_head))
