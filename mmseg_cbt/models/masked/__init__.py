"""Masked (early-exit) execution: the semantics (masks, fills), the simulated oracle and the sparse path.

* :mod:`.semantics`: mask pyramid, fill modes, ADP-C's RBF fill (defined once);
* :mod:`.heads`: exit heads under masks, one forward per head family parameterised by a runner;
* :mod:`.hrnet_simulated` / :mod:`.hrnet_sparse`: the HRNet stages, densely-then-masked and on active pixels only;
* :mod:`.sparse_context`: the per-exit state of the sparse path (indices, rbf tables, BN-folded convs);
* :mod:`.vit_tokens` / :mod:`.vit_stop_rules`: the plain ViT's token state, its blocks with stopped tokens masked
  (simulated) or removed (sparse), and DToP's stop rule.
"""
from .heads import DenseRunner, SimulatedRunner, SparseRunner, fcn_forward_with, forward_head_masked
from .semantics import FILL_MODES, RBF_LENGTH, RBF_SIZE, MaskContext, check_fill, rbf_fill, rbf_kernel
from .vit_stop_rules import dtop_stop_mask, exit_scores
from .vit_tokens import VIT_FILL_MODES, ViTTokens, simulated_blocks, sparse_blocks, token_keep

__all__ = [
    'FILL_MODES', 'RBF_LENGTH', 'RBF_SIZE', 'MaskContext', 'check_fill', 'rbf_fill', 'rbf_kernel', 'DenseRunner',
    'SimulatedRunner', 'SparseRunner', 'fcn_forward_with', 'forward_head_masked', 'dtop_stop_mask', 'exit_scores',
    'VIT_FILL_MODES', 'ViTTokens', 'simulated_blocks', 'sparse_blocks', 'token_keep'
]
