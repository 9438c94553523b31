"""Analysis tools: GFLOPs of early-exit models counted the papers' way (and checked against mmengine)."""
from .flops import (MMENGINE_ATTENTION_OPS, MMENGINE_CONV_LINEAR_OPS, RBF_KERNEL_AREA, UNIT_1E9, UNIT_2_30,
                    EarlyExitFlopCounter, ExitFlops, FlopsResult, LayerCall, attribute_module, average_flops,
                    count_flops, count_params_per_exit, exit_units, is_early_exit_model, mmengine_exit_macs,
                    trace_layers)

__all__ = [
    'UNIT_1E9', 'UNIT_2_30', 'RBF_KERNEL_AREA', 'MMENGINE_CONV_LINEAR_OPS', 'MMENGINE_ATTENTION_OPS', 'LayerCall',
    'ExitFlops', 'FlopsResult', 'EarlyExitFlopCounter', 'is_early_exit_model', 'exit_units', 'attribute_module',
    'trace_layers', 'count_params_per_exit', 'count_flops', 'average_flops', 'mmengine_exit_macs'
]
