"""What a toy city is: its classes and colours, file layout, per-image seeds and argument ranges.

Classes and palette are mmseg's ``CityscapesDataset.METAINFO``, so the data is read by mmseg's own dataset
and shown in mmseg's colours.
"""
from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np

from mmseg.datasets import CityscapesDataset

__all__ = [
    'TOY_CITY_CLASSES', 'TOY_CITY_PALETTE', 'IGNORE_INDEX', 'IMG_SUFFIX', 'SEG_MAP_SUFFIX', 'IMG_DIR', 'ANN_DIR',
    'SPLIT_CITIES', 'SPLITS', 'META_FILE', 'GENERATOR_VERSION', 'MIN_IMAGE_SIZE', 'MAX_IMAGE_SIZE', 'MAX_IMAGES',
    'validate_int', 'validate_image_size', 'validate_split', 'toy_city_sample_rng', 'toy_city_file_stem',
    'colorize_label'
]

TOY_CITY_CLASSES: Tuple[str, ...] = tuple(CityscapesDataset.METAINFO['classes'])
"""The 19 Cityscapes evaluation classes, indexed by train id."""

TOY_CITY_PALETTE: Tuple[Tuple[int, int, int],
                        ...] = tuple(tuple(int(v) for v in c) for c in CityscapesDataset.METAINFO['palette'])
"""The Cityscapes colour (RGB) of every train id."""

IGNORE_INDEX = 255
IMG_SUFFIX = '_leftImg8bit.png'
SEG_MAP_SUFFIX = '_gtFine_labelTrainIds.png'
IMG_DIR = 'leftImg8bit'
ANN_DIR = 'gtFine'
META_FILE = 'toy_city_meta.json'
SPLIT_CITIES: Dict[str, Tuple[str, ...]] = {'train': ('aachen', 'bochum'), 'val': ('frankfurt', )}
"""City folder names per split; consecutive images of a split are spread evenly over its cities."""
SPLITS: Tuple[str, ...] = tuple(SPLIT_CITIES)

GENERATOR_VERSION = 1
"""Bump when the rendering changes, so that tools regenerate data written by an older generator."""

MIN_IMAGE_SIZE = 64
"""Smallest accepted height and width: below this the thin classes vanish entirely."""
MAX_IMAGE_SIZE = 4096
"""Largest accepted height and width: a frame holds several full-size float textures."""
MAX_IMAGES = 1_000_000
"""Most images per split: Cityscapes file names carry a six-digit sequence number."""

(ROAD, SIDEWALK, BUILDING, WALL, FENCE, POLE, LIGHT, SIGN, VEGETATION, TERRAIN, SKY, PERSON, RIDER, CAR, TRUCK, BUS,
 TRAIN, MOTORCYCLE, BICYCLE) = range(19)

# Cityscapes stores the annotated frame of every sequence as frame 19.
_FRAME_ID = 19
# Distinct seed-sequence words for the splits, so train image i and val image i differ.
_SPLIT_CODES = {'train': 0, 'val': 1}
# A fixed salt keeps these streams apart from other generators seeded with the same small integers.
_SEED_SALT = 0x70C17


def validate_int(name: str, value: Any, minimum: int, maximum: Optional[int] = None) -> None:
    """Raises ValueError unless ``value`` is an int (not a bool) in ``[minimum, maximum]``.

    Args:
        name: Argument name used in the message.
        value: The value to check.
        minimum: Smallest allowed value.
        maximum: Largest allowed value; None for no upper bound.
    """
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f'{name} must be an integer, got {value!r} ({type(value).__name__})')
    if value < minimum or (maximum is not None and value > maximum):
        allowed = f'>= {minimum}' if maximum is None else f'in [{minimum}, {maximum}]'
        raise ValueError(f'{name} must be {allowed}, got {value}')


def validate_image_size(height: Any, width: Any) -> None:
    """Raises ValueError for image sizes the renderer cannot draw a meaningful scene at.

    Args:
        height: Image height in pixels.
        width: Image width in pixels.
    """
    validate_int('height', height, 1)
    validate_int('width', width, 1)
    if height < MIN_IMAGE_SIZE or width < MIN_IMAGE_SIZE:
        raise ValueError(f'height and width must both be >= {MIN_IMAGE_SIZE} (thin classes such as '
                         f'poles vanish below that), got height={height}, width={width}')
    validate_int('height', height, MIN_IMAGE_SIZE, MAX_IMAGE_SIZE)
    validate_int('width', width, MIN_IMAGE_SIZE, MAX_IMAGE_SIZE)


def validate_split(split: Any) -> None:
    """Raises ValueError unless ``split`` names a known split.

    Args:
        split: The split name to check.
    """
    if split not in _SPLIT_CODES:
        raise ValueError(f'split must be one of {sorted(_SPLIT_CODES)}, got {split!r}')


def toy_city_sample_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """Returns the random generator that renders one image.

    The stream depends only on ``(seed, split, index)``, never on which other images are rendered or in
    which order, so a subset or a parallel generation reproduces the same images.

    Args:
        seed: Dataset seed (non-negative).
        split: ``'train'`` or ``'val'``.
        index: Image index within the split (non-negative).

    Returns:
        A fresh ``numpy.random.Generator``.
    """
    validate_int('seed', seed, 0)
    validate_split(split)
    validate_int('index', index, 0)
    return np.random.default_rng(np.random.SeedSequence([_SEED_SALT, int(seed), _SPLIT_CODES[split], int(index)]))


def toy_city_file_stem(split: str, index: int, num_images: int) -> Tuple[str, str]:
    """Returns the city folder and Cityscapes-style file stem of one image.

    Args:
        split: ``'train'`` or ``'val'``.
        index: Image index within the split.
        num_images: Number of images in the split; images are spread evenly over the split's cities.

    Returns:
        ``(city, stem)``, e.g. ``('aachen', 'aachen_000003_000019')``; the image file is
        ``stem + IMG_SUFFIX`` and the label file ``stem + SEG_MAP_SUFFIX``.
    """
    validate_split(split)
    validate_int('num_images', num_images, 1)
    validate_int('index', index, 0)
    if index >= num_images:
        raise ValueError(f'index must be < num_images ({num_images}), got {index}')
    cities = SPLIT_CITIES[split]
    city = cities[index * len(cities) // num_images]
    return city, f'{city}_{index:06d}_{_FRAME_ID:06d}'


def colorize_label(label: np.ndarray, ignore_colour: Sequence[int] = (0, 0, 0)) -> np.ndarray:
    """Colour-codes a train-id label map with the Cityscapes palette.

    Args:
        label: ``(H, W)`` integer array of train ids (0..18) and ``IGNORE_INDEX``.
        ignore_colour: RGB colour for ignore and any other out-of-range value.

    Returns:
        ``(H, W, 3)`` uint8 RGB image.
    """
    lut = np.tile(np.asarray(ignore_colour, np.uint8), (256, 1))
    lut[:len(TOY_CITY_PALETTE)] = np.asarray(TOY_CITY_PALETTE, np.uint8)
    return lut[np.asarray(label).astype(np.uint8)]
