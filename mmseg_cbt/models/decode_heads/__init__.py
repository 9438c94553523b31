from .atm_exit_head import EarlyExitATMHead
from .class_mean_head import EMPTY_CLASS_LOGIT, ClassMeanWarning, EarlyExitClassMeanHead
from .rh_exit_head import EarlyExitRHHead
from .token_exit_head import EarlyExitTokenHead

__all__ = [
    'EarlyExitATMHead', 'EarlyExitRHHead', 'EarlyExitTokenHead', 'EarlyExitClassMeanHead', 'ClassMeanWarning',
    'EMPTY_CLASS_LOGIT'
]
