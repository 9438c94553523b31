"""Calibration core of CBT: exact per-class softmax statistics, class based thresholds, precision-targeted
thresholds, stop rules, plots.

Everything imported here needs only torch; ``ClassProbStats.all_reduce`` / ``PrecisionStats.all_reduce`` import
mmengine and ``plot_thresholds`` imports matplotlib when called. The data pass over a model
(:mod:`~mmseg_cbt.calibration.gather`) and the hook/tool algorithm (:mod:`~mmseg_cbt.calibration.calibrate`) need
mmengine and are imported from their modules.
"""
from .class_means import (FEATURE_FRAC_BITS, MAX_ABS_FEATURE, MAX_FEATURE_PIXELS_PER_CLASS, ClassFeatureStats,
                          backbone_exit_features, gather_class_feature_stats, labels_on_feature_map)
from .precision import (DEFAULT_PRECISION_BINS, PRECISION_METHOD, PrecisionStats, check_precision_options,
                        confidence_bins, precision_thresholds)
from .stats import FRAC_BITS, MAX_PIXELS_PER_CLASS, ClassProbStats
from .thresholds import (MARGIN_EQUAL_TOL, CBTCalibrationWarning, cbt_thresholds, class_margins, entropy_stop_mask,
                         global_stop_mask, stop_mask_from_probs)
from .visualization import CITYSCAPES_PALETTE, plot_thresholds

__all__ = [
    'ClassProbStats', 'FRAC_BITS', 'MAX_PIXELS_PER_CLASS', 'cbt_thresholds', 'class_margins', 'CBTCalibrationWarning',
    'MARGIN_EQUAL_TOL', 'stop_mask_from_probs', 'global_stop_mask', 'entropy_stop_mask', 'plot_thresholds',
    'CITYSCAPES_PALETTE', 'PrecisionStats', 'precision_thresholds', 'check_precision_options', 'confidence_bins',
    'PRECISION_METHOD', 'DEFAULT_PRECISION_BINS', 'ClassFeatureStats', 'FEATURE_FRAC_BITS', 'MAX_ABS_FEATURE',
    'MAX_FEATURE_PIXELS_PER_CLASS', 'backbone_exit_features', 'gather_class_feature_stats', 'labels_on_feature_map'
]
