"""Pictures of early-exit predictions: per-exit predictions and exit maps (where pixels stopped)."""
from .exit_map_visualizer import EarlyExitSegLocalVisualizer, exit_predictions
from .panels import colourise, draw_exit_map_comparison, draw_exit_panels, exit_colours, exit_stop_fractions

__all__ = [
    'EarlyExitSegLocalVisualizer', 'exit_predictions', 'colourise', 'draw_exit_panels', 'draw_exit_map_comparison',
    'exit_colours', 'exit_stop_fractions'
]
