"""Wall time of real token removal in the early-exit ViT versus the dense blocks, side by side in one process.

    python tools/analysis_tools/benchmark_vit_pruning.py [--model tiny|vit-b] [--removed 0 25 50 75] [--repeats 5]

For every fraction of grid tokens removed after exit 1 (random per image), times the backbone blocks after exit 1
(stages 2..N) densely as the model's dense stages run them (:func:`~mmseg_cbt.models.masked.vit_tokens.
block_forward`, fused attention), as mmseg's own block forward runs them (mmcv attention materialising the
attention weights; for reference), and with the stopped tokens removed
(:func:`mmseg_cbt.models.masked.vit_tokens.sparse_blocks`, called directly so that 0 % removed measures the pruned
path itself, not the segmentor's all-active shortcut), at batch 1 and at batch 2 with different masks (the fractions
``r - 10`` and ``r + 10`` percent, so the mean stays ``r``). Next to the wall ratio: the MAC ratio of the same
blocks (q/k/v/out projections, both attention matmuls, MLP at the tokens each image keeps). Dense and pruned runs
alternate and the median of ``--repeats`` is reported. Batch-2 rows also time the same two images and masks pruned
at batch 1 one after the other, interleaved with the rest (``batch 1 ms/img``; ``b2 / b1`` <= 1: the batch is no
slower per image), so that comparison does not span rows measured minutes apart. ``tiny`` is the toy-city
config's ViT at 256x512, ``vit-b`` a randomly initialised ViT-B/16 at 512x512.
"""
import argparse
import os.path as osp
import statistics
import sys
import time
from typing import List

import torch

sys.path.insert(0, osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__)))))


def build_vit(name: str):
    """The backbone (eval mode) and its input size."""
    from mmseg_cbt.models.backbones import EarlyExitViT
    torch.manual_seed(0)
    if name == 'tiny':
        vit = EarlyExitViT(
            exit_after=(1, 3, 5),
            img_size=(256, 256),
            patch_size=8,
            embed_dims=64,
            num_layers=6,
            num_heads=4,
            final_norm=True)
        size = (256, 512)
    else:
        vit = EarlyExitViT(
            exit_after=(5, 7, 11),
            img_size=(512, 512),
            patch_size=16,
            embed_dims=768,
            num_layers=12,
            num_heads=12,
            final_norm=True,
            norm_cfg=dict(type='LN', eps=1e-6))
        size = (512, 512)
    vit.eval()
    return vit, size


def block_macs(vit, n: int) -> int:
    """MACs of one block on n tokens."""
    c = vit.layers[0].attn.attn.embed_dim
    hidden = vit.layers[0].ffn.layers[0][0].out_features
    return 4 * n * c * c + 2 * n * n * c + 2 * n * c * hidden


def _time(fn, repeats: int) -> List[float]:
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def main(argv=None) -> List[dict]:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--model', choices=('tiny', 'vit-b'), default='tiny')
    p.add_argument('--removed', type=float, nargs='+', default=[0, 25, 50, 75])
    p.add_argument('--repeats', type=int, default=5)
    args = p.parse_args(argv)
    if any(not 0 <= r < 100 for r in args.removed):
        p.error(f'argument --removed: must lie in [0, 100), got {args.removed}')
    if args.repeats < 1:
        p.error(f'argument --repeats: must be >= 1, got {args.repeats}')
    from mmseg_cbt.models.masked.vit_tokens import block_forward, sparse_blocks, token_keep
    vit, size = build_vit(args.model)
    layers = [vit.layers[i] for s in range(2, vit.num_stages + 1) for i in vit.stage_blocks(s)]
    g = torch.Generator().manual_seed(0)
    rows = []
    print(f'{args.model}: {len(layers)} blocks after exit 1, input {size[0]}x{size[1]}, '
          f'{torch.get_num_threads()} threads')
    print('removed % | batch | mmseg ms/img | dense ms/img | pruned ms/img | wall ratio | MAC ratio | wall/MAC | '
          'batch 1 ms/img | b2 / b1')
    with torch.no_grad():
        for batch in (1, 2):
            state = vit.forward_stage(1, [torch.randn(batch, 3, *size, generator=g)])
            n_all = state.tokens.shape[1]
            for r in args.removed:
                fracs = [r] if batch == 1 else [max(r - 10, 0), min(r + 10, 99)]
                active = torch.stack([torch.rand(state.hw, generator=g) >= f / 100 for f in fracs])
                keep = token_keep(state, active)

                def mmseg():
                    x = state.tokens
                    for layer in layers:
                        x = layer(x)

                def dense():
                    x = state.tokens
                    for layer in layers:
                        x = block_forward(layer, x)

                def pruned():
                    sparse_blocks(layers, state.tokens, keep)

                def pruned_one_by_one():  # the same images and masks at batch 1, one after the other
                    for i in range(batch):
                        sparse_blocks(layers, state.tokens[i:i + 1], keep[i:i + 1])

                mmseg(), dense(), pruned(), pruned_one_by_one()  # warm-up
                tm, td, tp, t1 = [], [], [], []
                for _ in range(args.repeats):
                    tm += _time(mmseg, 1)
                    td += _time(dense, 1)
                    tp += _time(pruned, 1)
                    if batch > 1:
                        t1 += _time(pruned_one_by_one, 1)
                m_ms, d_ms, p_ms = (1e3 * statistics.median(t) / batch for t in (tm, td, tp))
                b1_ms = 1e3 * statistics.median(t1) / batch if t1 else p_ms
                macs_d = batch * block_macs(vit, n_all)
                macs_p = sum(block_macs(vit, int(n)) for n in keep.sum(1))
                row = dict(
                    model=args.model,
                    removed=r,
                    batch=batch,
                    mmseg_ms=m_ms,
                    dense_ms=d_ms,
                    pruned_ms=p_ms,
                    wall_ratio=p_ms / d_ms,
                    mac_ratio=macs_p / macs_d,
                    one_by_one_ms=b1_ms,
                    batch_over_one_by_one=p_ms / b1_ms)
                row['wall_per_mac'] = row['wall_ratio'] / row['mac_ratio']
                rows.append(row)
                side = f' | {b1_ms:13.2f} | {p_ms / b1_ms:7.3f}' if batch > 1 else ' |             - |       -'
                print(f'{r:9.0f} | {batch:5d} | {m_ms:12.2f} | {d_ms:12.2f} | {p_ms:13.2f} | '
                      f'{row["wall_ratio"]:10.3f} | {row["mac_ratio"]:9.3f} | {row["wall_per_mac"]:8.3f}' + side)
    return rows


if __name__ == '__main__':
    main()
