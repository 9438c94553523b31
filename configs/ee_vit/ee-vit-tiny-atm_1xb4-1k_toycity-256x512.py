# The tiny early-exit ViT on toy-city with DToP's head at every exit and as the decode head: SegViT's
# attention-to-mask head (one query per class, 2 decoder layers of width 64 here; DToP: 3 layers of 384), whose
# scores p(present) x sigmoid(mask) are probabilities (the stop rules and the CBT calibration read them as they are).
_base_ = ['./ee-vit-tiny_1xb4-1k_toycity-256x512.py']
atm_head = dict(
    type='EarlyExitATMHead',
    in_channels=64,
    channels=64,
    num_layers=2,
    num_heads=4,
    dropout=0.0,
    num_classes=19,
    align_corners=False,
    mask_loss='focal',
    cls_weight=1.0,
    mask_weight=20.0,
    dice_weight=1.0)
# exit_heads is a list (replaced as a whole); decode_head a dict (merged unless _delete_)
model = dict(exit_heads=[atm_head, atm_head], decode_head=dict(_delete_=True, **atm_head))
