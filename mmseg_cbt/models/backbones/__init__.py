from .ee_hrnet import EarlyExitHRNet
from .ee_vit import EarlyExitViT

__all__ = ['EarlyExitHRNet', 'EarlyExitViT']
