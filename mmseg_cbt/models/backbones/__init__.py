from .ee_hrnet import EarlyExitHRNet

__all__ = ['EarlyExitHRNet']
