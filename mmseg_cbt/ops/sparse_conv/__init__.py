"""Masked ("sparse") 2-D convolution for early-exit inference, by layer.

Semantics (the ones that keep a trained network unchanged, cf. ADP-C's dense simulation and mmcv's
``MaskedConv2d``): outputs are computed only at *active* output positions (``mask == True``); every window reads the
**full** input map, so input positions of stopped pixels contribute whatever value the caller has left there (their
last value, a fill, ...). Zero padding at the image border is as in :func:`torch.nn.functional.conv2d`. At active
positions the result equals the dense convolution, also for non-finite inputs (NaN and Inf propagate as there).

Two levels of API:

* :func:`sparse_conv2d` / :class:`SparseConv2d` - one conv, one mask, NCHW tensors. Each call copies the input
  pixels the active windows read into a padded channels-last buffer; the mask's index and the weight's matrix are
  cached on those tensors (:mod:`.cache`). Differentiable (dense and masked) under autograd.
* The *stage* API for a caller that runs many convs at one resolution with one mask (an HRNet stage), inference
  only (it writes into preallocated buffers):

  .. code-block:: python

      idx = SparseIndex.build(mask)                      # once per exit mask and resolution
      buf = to_padded_nhwc(x)                            # once per stage: persistent channels-last buffer
      conv = PackedConv.from_conv(conv_module, bn=bn)    # once per layer (BN folded)
      y_rows = conv.rows(buf, idx, relu=True)            # (M, Cout) active rows
      scatter_rows(out_buf, idx, y_rows)                 # write active positions, keep stopped ones
      conv.apply(buf, idx, out_buf, residual=res_buf, relu=True)   # or fused, with the dense fallback

Layers: :mod:`.layout` (padded channels-last buffers), :mod:`.index` (:class:`SparseIndex`), :mod:`.packing`
(weight matrices, BN folding), :mod:`.cache` (what the one-conv op keeps between calls), :mod:`.rows` (row
gather / scatter), :mod:`.torch_impl` / :mod:`.cpp_impl` / :mod:`.triton_impl` (one file per implementation of the
sparse path), :mod:`.dense` (the dense fallback),
:mod:`.dispatch` (the stage entry points: validation, sparse-or-dense by :mod:`mmseg_cbt.ops.policy`, backend),
:mod:`.functional` and :mod:`.module` (the NCHW op and the modules). Why this design and what it measured:
``docs/benchmarks.md``.
"""
from .dense import dense_conv_buffer
from .dispatch import sparse_conv_buffer, sparse_conv_rows
from .functional import sparse_conv2d
from .index import SparseIndex
from .layout import new_padded_buffer, padded_interior, padded_row_index, to_padded_nhwc
from .module import PackedConv, SparseConv2d
from .packing import conv_weight_matrix, fold_bn
from .rows import add_weighted_rows_, gather_rows, scatter_rows
from .triton_impl import HAS_TRITON

__all__ = [
    'HAS_TRITON', 'PackedConv', 'SparseConv2d', 'SparseIndex', 'add_weighted_rows_', 'conv_weight_matrix',
    'dense_conv_buffer', 'fold_bn', 'gather_rows', 'new_padded_buffer', 'padded_interior', 'padded_row_index',
    'scatter_rows', 'sparse_conv2d', 'sparse_conv_buffer', 'sparse_conv_rows', 'to_padded_nhwc'
]
