"""Per-exit MACs of the early-exit ViT: linear layers and attention matmuls at the tokens each block processes."""
import torch
from utils import TOY_VIT_ATM_CONFIG, build_tiny_vit

# tiny ViT: width 64, MLP 256, patch 8, heads read 64 -> 64 -> 19; input 60 x 90 -> an 8 x 12 grid (+ class token)
C, HID, K, P = 64, 256, 19, 8
H, W = 60, 90
GRID = 8 * 12


def _block(n):
    """One block on n tokens: q/k/v/out projections, q k^T and attention x v, the MLP."""
    return 4 * n * C * C + 2 * n * n * C + 2 * n * C * HID


def _head(n):
    return n * C * C + n * C * K


def test_dense_equals_hand_count_and_mmengine():
    """Dense per-exit counts equal a hand count and mmengine's FlopAnalyzer (linear + bmm) per exit."""
    from mmseg_cbt.analysis import count_flops, mmengine_exit_macs
    model = build_tiny_vit()
    x = torch.randn(1, 3, H, W)
    ours = [e.macs for e in count_flops(model, x, exit_mode='dense').exits]
    n = GRID + 1
    patch = 3 * P * P * C * GRID
    exit1 = patch + 2 * _block(n) + _head(GRID)
    hand = [exit1, exit1 + 2 * _block(n) + _head(GRID), exit1 + 4 * _block(n) + 2 * _head(GRID)]
    assert ours == hand
    assert mmengine_exit_macs(model, x) == hand


def test_masked_count_uses_the_tokens_really_processed():
    """With stopped tokens every later block and exit counts its linear layers at n active tokens and its
    attention at n^2, per image (batch 2 with different masks)."""
    from mmseg_cbt.analysis import count_flops
    model = build_tiny_vit()
    x = torch.randn(2, 3, H, W)
    with torch.no_grad():
        dense = model.forward_exits(x, exit_mode='dense')
        thr = float(torch.softmax(dense[0], dim=1).amax(1).flatten().median())
    model.test_cfg.update(dtop_threshold=thr, dtop_topk=2)
    with torch.no_grad():
        _, actives = model.forward_exits(x, exit_mode='dtop', return_active=True)
    res = count_flops(model, x, exit_mode='dtop', feature_mask='sparse')
    exit1 = 3 * P * P * C * GRID + 2 * _block(GRID + 1) + _head(GRID)
    for b in range(2):
        n2, n3 = (int(actives[i][b].sum()) for i in (1, 2))
        assert n2 != GRID
        want = [exit1, exit1 + 2 * _block(n2 + 1) + _head(n2)]
        want.append(want[1] + 2 * _block(n3 + 1) + _head(n3))
        got = [e.macs_per_image[b] for e in res.exits]
        assert [round(float(g)) for g in got] == want
    assert res.exits[2].macs_per_image[0] != res.exits[2].macs_per_image[1]


# tiny ATM head: decoder width 64, 2 layers, 19 class queries
D, LAYERS = 64, 2


def _atm_head(t):
    """DToP's head on t grid tokens: memory projection; per layer self-attention of the K queries (projections
    4 K D^2, matmuls 2 K^2 D), cross-attention (q / out projections 2 K D^2, k / v projections 2 t D^2, matmuls
    2 K t D), MLP 8 K D^2; the presence classifier 2 K D."""
    layer = 4 * K * D * D + 2 * K * K * D + 2 * K * D * D + 2 * t * D * D + 2 * K * t * D + 8 * K * D * D
    return t * C * D + LAYERS * layer + 2 * K * D


def test_atm_head_equals_hand_count_and_mmengine_dense_and_masked():
    """With DToP's attention-to-mask head: dense per-exit counts equal the hand count and mmengine's FlopAnalyzer;
    under pruning the head's memory projection, k / v projections and q k^T / attention x v count the active
    tokens only (the class queries stay dense)."""
    from mmseg_cbt.analysis import count_flops, mmengine_exit_macs
    model = build_tiny_vit(config=TOY_VIT_ATM_CONFIG)
    x = torch.randn(2, 3, H, W)
    exit1 = 3 * P * P * C * GRID + 2 * _block(GRID + 1) + _atm_head(GRID)
    hand = [exit1, exit1 + 2 * _block(GRID + 1) + _atm_head(GRID)]
    hand.append(hand[1] + 2 * _block(GRID + 1) + _atm_head(GRID))
    assert [e.macs for e in count_flops(model, x[:1], exit_mode='dense').exits] == hand
    assert mmengine_exit_macs(model, x[:1]) == hand
    with torch.no_grad():
        dense = model.forward_exits(x, exit_mode='dense')
    model.test_cfg.update(dtop_threshold=float(dense[0].amax(1).flatten().median()), dtop_topk=2)
    with torch.no_grad():
        _, actives = model.forward_exits(x, exit_mode='dtop', return_active=True)
    res = count_flops(model, x, exit_mode='dtop', feature_mask='sparse')
    for b in range(2):
        n2, n3 = (int(actives[i][b].sum()) for i in (1, 2))
        assert n2 != GRID and n3 < n2
        want = [exit1, exit1 + 2 * _block(n2 + 1) + _atm_head(n2)]
        want.append(want[1] + 2 * _block(n3 + 1) + _atm_head(n3))
        assert [round(float(e.macs_per_image[b])) for e in res.exits] == want
