"""Operators for masked (early-exit) inference. Importing needs only torch; triton is optional, and the compiled
CPU kernel is built on first use (a C++ compiler and ninja; the PyTorch path otherwise)."""
from .policy import CPU_ALGORITHMS, cpu_algorithm, default_max_active, get_cpu_algorithm, set_cpu_algorithm
from .sparse_conv import (PackedConv, SegmentTables, SparseIndex, add_weighted_rows_, choose_method, conv_output_size,
                          conv_weight_matrix, cpu_kernel_direct, dense_conv_buffer, dense_crossover, fold_bn,
                          gather_rows, new_padded_buffer, padded_interior, padded_row_index, scatter_rows,
                          sparse_conv2d, sparse_conv_buffer, sparse_conv_rows, to_padded_nhwc)
from .sparse_conv_cpu import cpu_ext_available, cpu_ext_enabled, load_cpu_ext
from .sparse_conv_module import SparseConv2d
from .sparse_conv_triton import HAS_TRITON

__all__ = [
    'CPU_ALGORITHMS',
    'cpu_algorithm',
    'default_max_active',
    'get_cpu_algorithm',
    'set_cpu_algorithm',
    'HAS_TRITON',
    'PackedConv',
    'SegmentTables',
    'SparseConv2d',
    'SparseIndex',
    'add_weighted_rows_',
    'choose_method',
    'conv_output_size',
    'conv_weight_matrix',
    'cpu_ext_available',
    'cpu_ext_enabled',
    'cpu_kernel_direct',
    'dense_conv_buffer',
    'dense_crossover',
    'fold_bn',
    'gather_rows',
    'load_cpu_ext',
    'new_padded_buffer',
    'padded_interior',
    'padded_row_index',
    'scatter_rows',
    'sparse_conv2d',
    'sparse_conv_buffer',
    'sparse_conv_rows',
    'to_padded_nhwc',
]
