"""Options of the early-exit segmentor (stop rules, feature treatment), checked before any work."""
from typing import Optional

from ..masked import check_fill

__all__ = [
    'EXIT_MODES', 'FEATURE_MASKS', 'OPTION_RANGES', 'DTOP_TOPK', 'check_stop_options', 'range_checked', 'topk_checked'
]

#: Stop rules at test time. ``dense``: nothing stops (every exit is computed on every pixel, the anytime model);
#: ``cbt``: per-class thresholds from calibration (OR of ``softmax_k > T_k`` over classes); ``global``: ADP-C,
#: ``max softmax > test_cfg.global_threshold``; ``entropy``: normalised entropy < ``test_cfg.entropy_threshold``;
#: ``dtop``: DToP's ``max score > test_cfg.dtop_threshold`` with the ``test_cfg.dtop_topk`` most confident positions
#: of every predicted class kept active (:func:`mmseg_cbt.models.masked.vit_stop_rules.dtop_stop_mask`).
EXIT_MODES = ('dense', 'cbt', 'global', 'entropy', 'dtop')
#: How features at stopped pixels are treated. ``none``: features stay dense, only the logits of stopped pixels are
#: frozen ("post-hoc" early exit, what CBT evaluates); ``simulate``: every conv after the exit is computed densely and
#: then masked with the fill rule (ADP-C's simulation, the oracle of the sparse path); ``sparse``: convs really run
#: only at active pixels (:mod:`mmseg_cbt.ops`).
FEATURE_MASKS = ('none', 'simulate', 'sparse')
#: Numeric options of ``test_cfg`` / ``train_cfg.masked_training``: (default, low, high), both ends allowed
#: (a threshold of 0 stops every pixel, 1 none).
OPTION_RANGES = {
    'global_threshold': (0.998, 0.0, 1.0),
    'entropy_threshold': (0.05, 0.0, 1.0),
    'sparse_max_active': (None, 0.0, 1.0),
    'dtop_threshold': (0.9, 0.0, 1.0),
}
#: Default of ``dtop_topk`` (DToP keeps the 5 most confident positions of every predicted class).
DTOP_TOPK = 5


def check_stop_options(cfg: Optional[dict], where: str) -> None:
    """Checks the early-exit options of a test cfg (or of ``train_cfg.masked_training``) before any work.

    Args:
        cfg (dict, optional): The options.
        where (str): The name shown in errors, e.g. ``'test_cfg'``.

    Raises:
        ValueError: Naming the option, the value and the allowed values or range.
    """
    cfg = cfg or {}
    if 'exit_mode' in cfg and cfg['exit_mode'] not in EXIT_MODES:
        raise ValueError(f'{where}.exit_mode must be one of {EXIT_MODES}, got {cfg["exit_mode"]!r}')
    if 'feature_mask' in cfg and cfg['feature_mask'] not in FEATURE_MASKS:
        raise ValueError(f'{where}.feature_mask must be one of {FEATURE_MASKS}, got {cfg["feature_mask"]!r}')
    if 'fill' in cfg:
        check_fill(cfg['fill'], f'{where}.fill')
    for key in OPTION_RANGES:
        if cfg.get(key) is not None:
            range_checked(cfg[key], key, where)
    if cfg.get('dtop_topk') is not None:
        topk_checked(cfg['dtop_topk'], where)
    if 'exit_cost' in cfg and not isinstance(cfg['exit_cost'], bool):
        # True (default): predict counts every image's MACs per exit (exit_macs), for the test log's GFLOPs
        raise ValueError(f'{where}.exit_cost must be True or False, got {cfg["exit_cost"]!r}')


def range_checked(value, key: str, where: str) -> float:
    """``value`` as a float within the range of option ``key``, else a ValueError naming it."""
    _, lo, hi = OPTION_RANGES[key]
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f'{where}.{key} must be a number in [{lo:g}, {hi:g}], got {value!r}') from None
    if not lo <= v <= hi:  # NaN fails too
        raise ValueError(f'{where}.{key} must be in [{lo:g}, {hi:g}], got {value!r}')
    return v


def topk_checked(value, where: str) -> int:
    """``value`` as a non-negative int (option ``dtop_topk``), else a ValueError naming it."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f'{where}.dtop_topk must be an integer >= 0, got {value!r}')
    return int(value)
