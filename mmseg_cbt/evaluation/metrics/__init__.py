from .early_exit_iou_metric import EarlyExitIoUMetric

__all__ = ['EarlyExitIoUMetric']
