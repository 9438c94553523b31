"""Units and operator names of the GFLOPs counter (one MAC = one FLOP, as mmengine / fvcore and the papers)."""
from mmseg_cbt.models.masked.semantics import RBF_SIZE

__all__ = ['UNIT_1E9', 'UNIT_2_30', 'RBF_KERNEL_AREA', 'MMENGINE_CONV_LINEAR_OPS', 'MMENGINE_ATTENTION_OPS']

#: Divisor of ``gflops_1e9`` (mmengine / fvcore "G").
UNIT_1E9 = 1e9
#: Divisor of ``gflops_2_30`` (ADP-C / HRNet papers: 1024^3).
UNIT_2_30 = float(2**30)
#: Taps of ADP-C's RBF fill kernel (7x7): the 49 in ``(1 - p) p C_out 49 H W``.
RBF_KERNEL_AREA = RBF_SIZE**2
#: Operator names (as mmengine's FlopAnalyzer reports them) that correspond to nn.Conv*d and nn.Linear.
MMENGINE_CONV_LINEAR_OPS = ('conv', 'linear', 'addmm')
#: Operator names of the attention matmuls (q k^T, attention x v) in mmengine's FlopAnalyzer.
MMENGINE_ATTENTION_OPS = ('bmm', 'matmul')
