"""Tests of the built-in toy-city dataset generator (tiny sets, a few seconds in all)."""
import glob
import importlib.util
import os
import os.path as osp

import cv2
import numpy as np
import pytest
from utils import ROOT

from mmseg_cbt.datasets import (IGNORE_INDEX, IMG_SUFFIX, META_FILE, SEG_MAP_SUFFIX, SPLIT_CITIES, TOY_CITY_CLASSES,
                                colorize_label, generate_toy_city, read_toy_city_meta, render_toy_city_sample,
                                toy_city_file_stem)

TINY = dict(num_train=4, num_val=2, height=64, width=128)
VALID_LABELS = set(range(len(TOY_CITY_CLASSES))) | {IGNORE_INDEX}


def _files(root):
    """All files under ``root`` as relative paths."""
    out = []
    for dirpath, _, names in os.walk(root):
        out += [osp.relpath(osp.join(dirpath, n), root) for n in names]
    return sorted(out)


@pytest.fixture(scope='module')
def tiny_set(tmp_path_factory):
    root = str(tmp_path_factory.mktemp('toy_city'))
    summary = generate_toy_city(root, seed=0, progress=False, **TINY)
    return root, summary


def test_layout(tiny_set):
    root, summary = tiny_set
    expected = [META_FILE]
    for split, n in (('train', TINY['num_train']), ('val', TINY['num_val'])):
        for i in range(n):
            city, stem = toy_city_file_stem(split, i, n)
            assert city in SPLIT_CITIES[split]
            expected.append(osp.join('leftImg8bit', split, city, stem + IMG_SUFFIX))
            expected.append(osp.join('gtFine', split, city, stem + SEG_MAP_SUFFIX))
    assert _files(root) == sorted(expected)
    # Cityscapes naming: <city>_<seq:06d>_<frame:06d>
    assert toy_city_file_stem('train', 3, 4) == ('bochum', 'bochum_000003_000019')
    assert toy_city_file_stem('val', 0, 2) == ('frankfurt', 'frankfurt_000000_000019')
    assert summary['num_images'] == {'train': 4, 'val': 2}
    meta = read_toy_city_meta(root)
    assert meta['params'] == dict(seed=0, **TINY)


def test_image_and_label_format(tiny_set):
    root, summary = tiny_set
    for img_path in glob.glob(osp.join(root, 'leftImg8bit', '*', '*', '*' + IMG_SUFFIX)):
        img = cv2.imread(img_path, cv2.IMREAD_UNCHANGED)
        assert img.dtype == np.uint8 and img.shape == (TINY['height'], TINY['width'], 3)
        assert img.std() > 5  # a real scene, not a blank frame
    seen = set()
    for ann_path in glob.glob(osp.join(root, 'gtFine', '*', '*', '*' + SEG_MAP_SUFFIX)):
        lbl = cv2.imread(ann_path, cv2.IMREAD_UNCHANGED)
        assert lbl.dtype == np.uint8 and lbl.shape == (TINY['height'], TINY['width'])
        values = set(np.unique(lbl).tolist())
        assert values <= VALID_LABELS
        seen |= values
    # The big stuff classes of a street scene show up even in a handful of images.
    assert {0, 2, 10} <= seen
    for split in ('train', 'val'):
        assert sum(summary['class_pixel_fraction'][split].values()) == pytest.approx(1.0, abs=1e-4)


def test_determinism(tiny_set, tmp_path):
    root, _ = tiny_set
    same = str(tmp_path / 'same')
    other = str(tmp_path / 'other')
    generate_toy_city(same, seed=0, progress=False, **TINY)
    generate_toy_city(other, seed=1, progress=False, **TINY)
    files = _files(root)
    assert _files(same) == files and _files(other) == files
    differ = 0
    for rel in files:
        with open(osp.join(root, rel), 'rb') as f:
            a = f.read()
        with open(osp.join(same, rel), 'rb') as f:
            assert f.read() == a, rel
        if rel.endswith('.png'):
            with open(osp.join(other, rel), 'rb') as f:
                differ += f.read() != a
    assert differ == len([f for f in files if f.endswith('.png')])


def test_images_do_not_depend_on_generation_order(tiny_set):
    root, _ = tiny_set
    # Rendering a single image in memory gives exactly the stored one (PNG is lossless).
    for split, i, n in (('train', 3, 4), ('val', 1, 2)):
        img, lbl = render_toy_city_sample(0, split, i, TINY['height'], TINY['width'])
        city, stem = toy_city_file_stem(split, i, n)
        stored = cv2.imread(osp.join(root, 'leftImg8bit', split, city, stem + IMG_SUFFIX), cv2.IMREAD_COLOR)
        stored_lbl = cv2.imread(osp.join(root, 'gtFine', split, city, stem + SEG_MAP_SUFFIX), cv2.IMREAD_UNCHANGED)
        np.testing.assert_array_equal(stored[..., ::-1], img)
        np.testing.assert_array_equal(stored_lbl, lbl)
    a, _ = render_toy_city_sample(0, 'train', 0, 64, 128)
    b, _ = render_toy_city_sample(0, 'val', 0, 64, 128)
    assert not np.array_equal(a, b)


def test_cityscapes_dataset_reads_it(tiny_set):
    from mmseg.datasets import CityscapesDataset
    from mmseg.utils import register_all_modules
    register_all_modules()
    root, _ = tiny_set
    dataset = CityscapesDataset(
        data_root=root,
        data_prefix=dict(img_path='leftImg8bit/train', seg_map_path='gtFine/train'),
        pipeline=[dict(type='LoadImageFromFile'),
                  dict(type='LoadAnnotations'),
                  dict(type='PackSegInputs')])
    assert len(dataset) == TINY['num_train']
    assert tuple(dataset.metainfo['classes']) == TOY_CITY_CLASSES
    sample = dataset[0]
    gt = sample['data_samples'].gt_sem_seg.data.numpy()
    lbl = cv2.imread(dataset.get_data_info(0)['seg_map_path'], cv2.IMREAD_UNCHANGED)
    assert gt.shape == (1, TINY['height'], TINY['width'])
    np.testing.assert_array_equal(gt[0], lbl)
    assert tuple(sample['inputs'].shape) == (3, TINY['height'], TINY['width'])


@pytest.mark.parametrize('kwargs', [
    dict(height=32), dict(width=63), dict(height=0), dict(width=-128), dict(num_train=0), dict(num_val=-1),
    dict(seed=-1), dict(height=64.0), dict(num_train=True), dict(num_train='4')
])
def test_argument_validation(tmp_path, kwargs):
    args = dict(TINY, seed=0, progress=False)
    args.update(kwargs)
    with pytest.raises(ValueError):
        generate_toy_city(str(tmp_path / 'bad'), **args)
    assert not osp.exists(tmp_path / 'bad')


def test_sample_argument_validation():
    with pytest.raises(ValueError, match='split'):
        render_toy_city_sample(0, 'test', 0, 64, 128)
    with pytest.raises(ValueError, match='index'):
        render_toy_city_sample(0, 'train', -1, 64, 128)
    with pytest.raises(ValueError, match='index'):
        toy_city_file_stem('train', 4, 4)


def test_refuses_to_overwrite_foreign_data(tmp_path):
    foreign = tmp_path / 'leftImg8bit' / 'train' / 'aachen'
    foreign.mkdir(parents=True)
    (foreign / 'real_leftImg8bit.png').write_bytes(b'x')
    with pytest.raises(FileExistsError):
        generate_toy_city(str(tmp_path), seed=0, progress=False, **TINY)
    assert (foreign / 'real_leftImg8bit.png').exists()


def test_regeneration_replaces_old_output(tmp_path):
    generate_toy_city(str(tmp_path), seed=0, progress=False, num_train=3, num_val=1, height=64, width=128)
    generate_toy_city(str(tmp_path), seed=0, progress=False, num_train=2, num_val=1, height=64, width=128)
    assert len(glob.glob(str(tmp_path / 'leftImg8bit' / 'train' / '*' / '*.png'))) == 2


def test_colorize_label():
    lbl = np.array([[0, 10, 255]], np.uint8)
    rgb = colorize_label(lbl)
    assert rgb.shape == (1, 3, 3) and rgb.dtype == np.uint8
    assert rgb[0, 0].tolist() == [128, 64, 128] and rgb[0, 1].tolist() == [70, 130, 180]
    assert rgb[0, 2].tolist() == [0, 0, 0]


def test_cli_skips_matching_data_and_force_regenerates(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location('toy_city_cli',
                                                  osp.join(ROOT, 'tools', 'dataset_converters', 'toy_city.py'))
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    out = str(tmp_path / 'tc')
    argv = ['--out', out, '--num-train', '2', '--num-val', '1', '--height', '64', '--width', '128', '--no-progress']
    assert cli.main(argv) == 0
    meta = osp.join(out, META_FILE)
    stamp = os.stat(meta).st_mtime_ns
    assert cli.main(argv) == 0
    assert 'up to date' in capsys.readouterr().out
    assert os.stat(meta).st_mtime_ns == stamp
    # Different parameters or --force regenerate.
    assert cli.main(argv[:-1] + ['--seed', '1', '--no-progress']) == 0
    assert read_toy_city_meta(out)['params']['seed'] == 1
    assert cli.main(argv + ['--seed', '1', '--force']) == 0
    assert os.stat(meta).st_mtime_ns != stamp
    assert cli.main(['--out', str(tmp_path / 'x'), '--height', '16']) == 2
