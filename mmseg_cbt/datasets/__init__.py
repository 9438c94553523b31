"""Datasets shipped with mmseg_cbt.

The toy city generator writes Cityscapes-layout data, so it is read by mmseg's own
``CityscapesDataset`` and pipelines; nothing needs registering here.
"""
from .toy_city import (ANN_DIR, GENERATOR_VERSION, IGNORE_INDEX, IMG_DIR, IMG_SUFFIX, META_FILE, MIN_IMAGE_SIZE,
                       SEG_MAP_SUFFIX, SPLIT_CITIES, TOY_CITY_CLASSES, TOY_CITY_PALETTE, colorize_label,
                       generate_toy_city, read_toy_city_meta, render_toy_city_sample, toy_city_file_stem,
                       toy_city_sample_rng)

__all__ = [
    'ANN_DIR', 'GENERATOR_VERSION', 'IGNORE_INDEX', 'IMG_DIR', 'IMG_SUFFIX', 'META_FILE', 'MIN_IMAGE_SIZE',
    'SEG_MAP_SUFFIX', 'SPLIT_CITIES', 'TOY_CITY_CLASSES', 'TOY_CITY_PALETTE', 'colorize_label', 'generate_toy_city',
    'read_toy_city_meta', 'render_toy_city_sample', 'toy_city_file_stem', 'toy_city_sample_rng'
]
