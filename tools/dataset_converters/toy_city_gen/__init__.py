"""Toy city: a small, procedurally generated street-scene dataset in Cityscapes layout.

The generator draws simple 3D street scenes (a straight street seen from a car's roof camera) with a pinhole
projection and the painter's algorithm, using only numpy and OpenCV drawing calls. Image and label are rasterised
by the same polygon calls, so the labels are pixel exact.

It is built to make the 19 Cityscapes classes differ in difficulty the way real street scenes do:

* large flat regions (road, sky, building facades, vegetation, sidewalk) are easy;
* thin or small objects (poles, traffic lights and signs, persons, riders, bicycles, motorcycles) are
  hard, because they cover few pixels and their borders are blurred by the camera model;
* several classes share colours and textures so that only context separates them: wall vs building
  (same palette, a wall is low, in front and has no windows), terrain vs vegetation (similar greens,
  terrain lies flat on the ground), rider vs person (a rider sits on a bicycle or motorcycle),
  truck vs bus vs train (coloured boxes that differ in size, windows and position: trains run on
  rails or far away), sidewalk vs road (similar greys, separated by the curb and position);
* every image gets its own lighting (brightness, contrast, colour cast, gamma), cast shadows,
  sensor noise and sometimes defocus or motion blur.

Ignore pixels (255) come from an ego-vehicle bonnet at the bottom of most images, rail beds,
guard rails and street furniture that Cityscapes labels as void (bins, advertising columns, benches).

The files follow the Cityscapes layout, so mmseg's ``CityscapesDataset`` reads them unchanged::

    <root>/leftImg8bit/{train,val}/<city>/<city>_<seq:06d>_000019_leftImg8bit.png
    <root>/gtFine/{train,val}/<city>/<city>_<seq:06d>_000019_gtFine_labelTrainIds.png
    <root>/toy_city_meta.json

Every image is rendered from its own random generator seeded by ``(seed, split, index)``, so an image
does not depend on the generation order or on how many other images are generated, and the same seed
gives byte-identical files.

The package is a data tool, not part of the installed plugin: ``tools/dataset_converters/toy_city.py`` is its
command line. Modules by role: :mod:`.spec` (classes, layout, seeds), :mod:`.camera` (projection and sensor),
:mod:`.materials` (weather, textures, noise), :mod:`.raster` (polygons into image and label), :mod:`.scene`
(planning and draw order), :mod:`.painters` (one painter per kind of object), :mod:`.writer` (files and metadata).
"""
from .scene import render_toy_city_sample
from .spec import (ANN_DIR, GENERATOR_VERSION, IGNORE_INDEX, IMG_DIR, IMG_SUFFIX, MAX_IMAGE_SIZE, MAX_IMAGES, META_FILE,
                   MIN_IMAGE_SIZE, SEG_MAP_SUFFIX, SPLIT_CITIES, TOY_CITY_CLASSES, TOY_CITY_PALETTE, colorize_label,
                   toy_city_file_stem, toy_city_sample_rng)
from .writer import GENERATOR, generate_toy_city, is_toy_city_up_to_date, read_toy_city_meta, toy_city_files

__all__ = [
    'ANN_DIR', 'GENERATOR', 'GENERATOR_VERSION', 'IGNORE_INDEX', 'IMG_DIR', 'IMG_SUFFIX', 'MAX_IMAGE_SIZE',
    'MAX_IMAGES', 'META_FILE', 'MIN_IMAGE_SIZE', 'SEG_MAP_SUFFIX', 'SPLIT_CITIES', 'TOY_CITY_CLASSES',
    'TOY_CITY_PALETTE', 'colorize_label', 'generate_toy_city', 'is_toy_city_up_to_date', 'read_toy_city_meta',
    'render_toy_city_sample', 'toy_city_file_stem', 'toy_city_files', 'toy_city_sample_rng'
]
