from .rh_exit_head import EarlyExitRHHead

__all__ = ['EarlyExitRHHead']
