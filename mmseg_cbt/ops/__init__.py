"""Operators for masked (early-exit) inference: the masked convolution and the policy that decides when to use it.

Importing needs only torch; triton is optional (the CUDA kernel), and the compiled CPU kernel is built on first use
(a C++ compiler and ninja; the PyTorch path otherwise).
"""
from .ext_loader import cpu_ext_available, cpu_ext_enabled
from .policy import (CPU_ALGORITHMS, DIRECT_MAX_COUT, cpu_algorithm, cpu_kernel_direct, default_max_active,
                     dense_crossover, get_cpu_algorithm, set_cpu_algorithm)
from .sparse_conv import (HAS_TRITON, PackedConv, SparseConv2d, SparseIndex, add_weighted_rows_, conv_weight_matrix,
                          dense_conv_buffer, fold_bn, gather_rows, new_padded_buffer, padded_interior, padded_row_index,
                          scatter_rows, sparse_conv2d, sparse_conv_buffer, sparse_conv_rows, to_padded_nhwc)

__all__ = [
    # the op and its module
    'sparse_conv2d',
    'SparseConv2d',
    # the stage API
    'SparseIndex',
    'PackedConv',
    'sparse_conv_rows',
    'sparse_conv_buffer',
    'dense_conv_buffer',
    'to_padded_nhwc',
    'padded_interior',
    'new_padded_buffer',
    'padded_row_index',
    'gather_rows',
    'scatter_rows',
    'add_weighted_rows_',
    'conv_weight_matrix',
    'fold_bn',
    # policy and backends
    'CPU_ALGORITHMS',
    'DIRECT_MAX_COUT',
    'cpu_algorithm',
    'cpu_kernel_direct',
    'default_max_active',
    'dense_crossover',
    'get_cpu_algorithm',
    'set_cpu_algorithm',
    'cpu_ext_available',
    'cpu_ext_enabled',
    'HAS_TRITON',
]
