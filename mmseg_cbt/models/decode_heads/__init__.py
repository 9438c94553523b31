from .atm_exit_head import EarlyExitATMHead
from .rh_exit_head import EarlyExitRHHead
from .token_exit_head import EarlyExitTokenHead

__all__ = ['EarlyExitATMHead', 'EarlyExitRHHead', 'EarlyExitTokenHead']
