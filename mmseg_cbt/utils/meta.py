"""What an mmseg data sample's meta says about its geometry."""
from typing import Tuple

__all__ = ['meta_padding']


def meta_padding(meta: dict) -> Tuple[int, int, int, int]:
    """The image's padding (left, right, top, bottom) in pixels: mmseg's ``img_padding_size`` (slide / test-time
    padding) or ``padding_size`` (the data preprocessor's), zero when neither is recorded."""
    left, right, top, bottom = meta.get('img_padding_size', meta.get('padding_size', [0, 0, 0, 0]))
    return int(left), int(right), int(top), int(bottom)
