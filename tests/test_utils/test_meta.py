"""The padding a data sample's meta records."""
from mmseg_cbt.utils import meta_padding


def test_meta_padding_prefers_img_padding_size_and_defaults_to_zero():
    assert meta_padding({}) == (0, 0, 0, 0)
    assert meta_padding(dict(padding_size=[1, 2, 3, 4])) == (1, 2, 3, 4)
    assert meta_padding(dict(padding_size=[1, 2, 3, 4], img_padding_size=[5, 6, 7, 8])) == (5, 6, 7, 8)
    assert all(type(v) is int for v in meta_padding(dict(padding_size=[1.0, 2, 3, 4])))
