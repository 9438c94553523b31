"""Tests of the toy-city dataset generator (tools/dataset_converters): layout, format, ownership, recovery, CLI."""
import errno
import glob
import hashlib
import importlib.util
import json
import os
import os.path as osp
import re
import subprocess
import sys

import cv2
import numpy as np
import pytest
from utils import ROOT, TOY_CITY_TOOL_DIR, load_toy_city

tc = load_toy_city()

TINY = dict(num_train=4, num_val=2, height=64, width=128)
VALID_LABELS = set(range(len(tc.TOY_CITY_CLASSES))) | {tc.IGNORE_INDEX}


def _files(root):
    """All files under ``root`` as relative paths."""
    out = []
    for dirpath, _, names in os.walk(root):
        out += [osp.relpath(osp.join(dirpath, n), root) for n in names]
    return sorted(out)


def _digests(root):
    """sha256 of every file under ``root`` by relative path."""
    out = {}
    for rel in _files(root):
        with open(osp.join(root, rel), 'rb') as f:
            out[rel] = hashlib.sha256(f.read()).hexdigest()
    return out


def _expected(num_train, num_val):
    """The files a finished toy city with these counts consists of (metadata included)."""
    return sorted(tc.toy_city_files(dict(num_train=num_train, num_val=num_val)) + [tc.META_FILE])


def _load_cli():
    spec = importlib.util.spec_from_file_location('toy_city_cli', osp.join(TOY_CITY_TOOL_DIR, 'toy_city.py'))
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    return cli


def _interrupt_after(monkeypatch, n):
    """Makes the writer's renderer raise KeyboardInterrupt (as Ctrl-C does) on its ``n + 1``-th call."""
    calls = []
    render = tc.writer.render_toy_city_sample

    def interrupted(*args, **kwargs):
        calls.append(args)
        if len(calls) > n:
            raise KeyboardInterrupt
        return render(*args, **kwargs)

    monkeypatch.setattr(tc.writer, 'render_toy_city_sample', interrupted)


@pytest.fixture(scope='module')
def tiny_set(tmp_path_factory):
    root = str(tmp_path_factory.mktemp('toy_city'))
    summary = tc.generate_toy_city(root, seed=0, progress=False, **TINY)
    return root, summary


def test_import_mmseg_cbt_does_not_import_the_generator():
    code = ('import json, sys; {pre}import mmseg_cbt; '
            "print(json.dumps(sorted(m for m in sys.modules if 'toy_city' in m or m == 'mmseg_cbt.datasets')))")
    env = dict(os.environ, PYTHONPATH=ROOT)

    def probe(pre):
        run = subprocess.run([sys.executable, '-c', code.format(pre=pre)],
                             cwd=ROOT,
                             env=env,
                             capture_output=True,
                             text=True,
                             check=True)
        return json.loads(run.stdout.strip().splitlines()[-1])

    assert probe('') == []
    # The same probe sees the generator once something imports it.
    found = probe(f'sys.path.insert(0, {TOY_CITY_TOOL_DIR!r}); import toy_city_gen; ')
    assert {'toy_city_gen', 'toy_city_gen.scene', 'toy_city_gen.painters.people'} <= set(found)


def test_layout(tiny_set):
    root, summary = tiny_set
    expected = [tc.META_FILE]
    for split, n in (('train', TINY['num_train']), ('val', TINY['num_val'])):
        for i in range(n):
            city, stem = tc.toy_city_file_stem(split, i, n)
            assert city in tc.SPLIT_CITIES[split]
            expected.append(osp.join('leftImg8bit', split, city, stem + tc.IMG_SUFFIX))
            expected.append(osp.join('gtFine', split, city, stem + tc.SEG_MAP_SUFFIX))
    assert _files(root) == sorted(expected) == _expected(TINY['num_train'], TINY['num_val'])
    # Cityscapes naming: <city>_<seq:06d>_<frame:06d>
    assert tc.toy_city_file_stem('train', 3, 4) == ('bochum', 'bochum_000003_000019')
    assert tc.toy_city_file_stem('val', 0, 2) == ('frankfurt', 'frankfurt_000000_000019')
    assert summary['num_images'] == {'train': 4, 'val': 2}
    meta = tc.read_toy_city_meta(root)
    assert meta['params'] == dict(seed=0, **TINY)
    assert 'complete' not in meta and 'files' not in meta and meta['generator'] == tc.GENERATOR


def test_image_and_label_format(tiny_set):
    root, summary = tiny_set
    for img_path in glob.glob(osp.join(root, 'leftImg8bit', '*', '*', '*' + tc.IMG_SUFFIX)):
        img = cv2.imread(img_path, cv2.IMREAD_UNCHANGED)
        assert img.dtype == np.uint8 and img.shape == (TINY['height'], TINY['width'], 3)
        assert img.std() > 5  # a real scene, not a blank frame
    seen = set()
    for ann_path in glob.glob(osp.join(root, 'gtFine', '*', '*', '*' + tc.SEG_MAP_SUFFIX)):
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
    tc.generate_toy_city(same, seed=0, progress=False, **TINY)
    tc.generate_toy_city(other, seed=1, progress=False, **TINY)
    files = _files(root)
    assert _files(same) == files and _files(other) == files
    assert _digests(same) == _digests(root)
    differ = [rel for rel in files if rel.endswith('.png') and _digests(other)[rel] != _digests(root)[rel]]
    assert len(differ) == len([f for f in files if f.endswith('.png')])


def test_images_do_not_depend_on_generation_order(tiny_set):
    root, _ = tiny_set
    # Rendering a single image in memory gives exactly the stored one (PNG is lossless).
    for split, i, n in (('train', 3, 4), ('val', 1, 2)):
        img, lbl = tc.render_toy_city_sample(0, split, i, TINY['height'], TINY['width'])
        city, stem = tc.toy_city_file_stem(split, i, n)
        stored = cv2.imread(osp.join(root, 'leftImg8bit', split, city, stem + tc.IMG_SUFFIX), cv2.IMREAD_COLOR)
        stored_lbl = cv2.imread(osp.join(root, 'gtFine', split, city, stem + tc.SEG_MAP_SUFFIX), cv2.IMREAD_UNCHANGED)
        np.testing.assert_array_equal(stored[..., ::-1], img)
        np.testing.assert_array_equal(stored_lbl, lbl)
    a, _ = tc.render_toy_city_sample(0, 'train', 0, 64, 128)
    b, _ = tc.render_toy_city_sample(0, 'val', 0, 64, 128)
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
    assert tuple(dataset.metainfo['classes']) == tc.TOY_CITY_CLASSES
    sample = dataset[0]
    gt = sample['data_samples'].gt_sem_seg.data.numpy()
    lbl = cv2.imread(dataset.get_data_info(0)['seg_map_path'], cv2.IMREAD_UNCHANGED)
    assert gt.shape == (1, TINY['height'], TINY['width'])
    np.testing.assert_array_equal(gt[0], lbl)
    assert tuple(sample['inputs'].shape) == (3, TINY['height'], TINY['width'])


BAD_ARGUMENTS = [
    dict(height=32),
    dict(width=63),
    dict(height=0),
    dict(width=-128),
    dict(height=tc.MAX_IMAGE_SIZE + 1),
    dict(num_train=0),
    dict(num_val=-1),
    dict(num_val=tc.MAX_IMAGES + 1),
    dict(seed=-1),
    dict(height=64.0),
    dict(num_train=True),
    dict(num_train='4')
]


@pytest.mark.parametrize('kwargs', BAD_ARGUMENTS)
def test_argument_validation(tmp_path, kwargs):
    args = dict(TINY, seed=0, progress=False)
    args.update(kwargs)
    with pytest.raises(ValueError, match=list(kwargs)[0]):
        tc.generate_toy_city(str(tmp_path / 'bad'), **args)
    assert not osp.exists(tmp_path / 'bad')


def test_sample_argument_validation():
    with pytest.raises(ValueError, match='split'):
        tc.render_toy_city_sample(0, 'test', 0, 64, 128)
    with pytest.raises(ValueError, match='index'):
        tc.render_toy_city_sample(0, 'train', -1, 64, 128)
    with pytest.raises(ValueError, match='index'):
        tc.toy_city_file_stem('train', 4, 4)


def test_refuses_to_overwrite_foreign_data(tmp_path):
    foreign = tmp_path / 'leftImg8bit' / 'train' / 'aachen'
    foreign.mkdir(parents=True)
    (foreign / 'real_leftImg8bit.png').write_bytes(b'x')
    with pytest.raises(FileExistsError, match='without a toy_city_meta.json'):
        tc.generate_toy_city(str(tmp_path), seed=0, progress=False, **TINY)
    assert _files(tmp_path) == [osp.join('leftImg8bit', 'train', 'aachen', 'real_leftImg8bit.png')]


def test_regeneration_replaces_only_its_own_files(tmp_path):
    root = str(tmp_path)
    tc.generate_toy_city(root, seed=0, progress=False, num_train=3, num_val=1, height=64, width=128)
    user = {
        'README.md': b'my notes',
        osp.join('leftImg8bit', 'train', 'mycity', 'mycity_000000_000019_leftImg8bit.png'): b'img',
        osp.join('gtFine', 'train', 'mycity', 'mycity_000000_000019_gtFine_labelTrainIds.png'): b'lbl',
        osp.join('leftImg8bit', 'train', 'aachen', 'notes.txt'): b'in a city folder of the generator',
    }
    for rel, data in user.items():
        os.makedirs(osp.dirname(osp.join(root, rel)), exist_ok=True)
        with open(osp.join(root, rel), 'wb') as f:
            f.write(data)
    tc.generate_toy_city(root, seed=0, progress=False, num_train=2, num_val=1, height=64, width=128)
    assert _files(root) == sorted(_expected(2, 1) + list(user))
    for rel, data in user.items():
        with open(osp.join(root, rel), 'rb') as f:
            assert f.read() == data, rel
    # Its own folders go when they end up empty: with one training image nothing is left in bochum.
    tc.generate_toy_city(root, seed=0, progress=False, num_train=1, num_val=1, height=64, width=128)
    assert not osp.exists(osp.join(root, 'gtFine', 'train', 'bochum'))
    assert _files(root) == sorted(_expected(1, 1) + list(user))


def test_refuses_to_overwrite_a_file_it_did_not_write(tmp_path):
    root = str(tmp_path)
    tc.generate_toy_city(root, seed=0, progress=False, num_train=2, num_val=1, height=64, width=128)
    before = _digests(root)
    # With 3 training images, image 1 goes to aachen: a file the 2-image run never wrote.
    rel = osp.join('leftImg8bit', 'train', 'aachen', 'aachen_000001_000019_leftImg8bit.png')
    with open(osp.join(root, rel), 'wb') as f:
        f.write(b'mine')
    with pytest.raises(FileExistsError, match='aachen_000001_000019_leftImg8bit.png'):
        tc.generate_toy_city(root, seed=0, progress=False, num_train=3, num_val=1, height=64, width=128)
    assert _digests(root) == dict(before, **{rel: hashlib.sha256(b'mine').hexdigest()})


def test_metadata_listing_foreign_paths_is_refused(tmp_path):
    root = str(tmp_path / 'tc')
    tc.generate_toy_city(root, seed=0, progress=False, num_train=1, num_val=0, height=64, width=128)
    (tmp_path / 'victim.txt').write_text('keep')
    meta = json.loads((tmp_path / 'tc' / tc.META_FILE).read_text())
    meta.update(complete=False, files=[osp.join('..', 'victim.txt')])
    (tmp_path / 'tc' / tc.META_FILE).write_text(json.dumps(meta))
    with pytest.raises(FileExistsError, match='outside the toy-city layout'):
        tc.generate_toy_city(root, seed=0, progress=False, num_train=1, num_val=0, height=64, width=128)
    assert (tmp_path / 'victim.txt').read_text() == 'keep'


@pytest.mark.parametrize('force', [False, True])
def test_rerun_after_interruption(tmp_path, monkeypatch, capsys, force):
    root = str(tmp_path / 'tc')
    tc.generate_toy_city(root, seed=0, progress=False, num_train=3, num_val=1, height=64, width=128)
    with open(osp.join(root, 'README.md'), 'w') as f:
        f.write('user file')
    _interrupt_after(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        tc.generate_toy_city(root, seed=1, progress=False, **TINY)
    # The unfinished run left its marker: not a dataset, but the next run knows which files are its own.
    assert tc.read_toy_city_meta(root) is None
    with open(osp.join(root, tc.META_FILE)) as f:
        pending = json.load(f)
    assert pending['complete'] is False
    assert set(pending['files']) == set(_expected(3, 1) + _expected(4, 2)) - {tc.META_FILE}
    monkeypatch.undo()
    argv = [
        '--out', root, '--num-train', '4', '--num-val', '2', '--height', '64', '--width', '128', '--seed', '1',
        '--no-progress'
    ] + (['--force'] if force else [])
    assert _load_cli().main(argv) == 0
    assert 'wrote' in capsys.readouterr().out
    assert _files(root) == sorted(_expected(4, 2) + ['README.md'])
    fresh = str(tmp_path / 'fresh')
    tc.generate_toy_city(fresh, seed=1, progress=False, **TINY)
    got = _digests(root)
    assert got.pop('README.md') == hashlib.sha256(b'user file').hexdigest()
    assert got == _digests(fresh)


def test_interrupted_first_generation_reruns(tmp_path, monkeypatch):
    root = str(tmp_path / 'tc')
    _interrupt_after(monkeypatch, 0)
    with pytest.raises(KeyboardInterrupt):
        tc.generate_toy_city(root, seed=0, progress=False, **TINY)
    monkeypatch.undo()
    assert not tc.is_toy_city_up_to_date(root, dict(seed=0, **TINY))
    tc.generate_toy_city(root, seed=0, progress=False, **TINY)
    assert tc.is_toy_city_up_to_date(root, dict(seed=0, **TINY))
    assert _files(root) == _expected(TINY['num_train'], TINY['num_val'])


def test_read_only_target_gives_a_clear_error(tmp_path, monkeypatch, capsys):
    root = tmp_path / 'readonly'
    root.mkdir()
    root.chmod(0o555)
    try:
        if os.access(str(root), os.W_OK):
            # Root ignores the mode bits: let the first write fail as it does on a read-only folder.
            def refuse(path, *args, **kwargs):
                raise PermissionError(errno.EACCES, 'Permission denied', path)

            monkeypatch.setattr(tc.writer, 'open', refuse, raising=False)
        with pytest.raises(PermissionError, match=re.escape(f'cannot write the toy city into {root}') + '.*writable'):
            tc.generate_toy_city(str(root), seed=0, progress=False, **TINY)
        argv = ['--out', str(root), '--num-train', '1', '--num-val', '0', '--height', '64', '--width', '64']
        assert _load_cli().main(argv + ['--no-progress']) == 2
        err = capsys.readouterr().err
        assert f'[toy_city] error: cannot write the toy city into {root}' in err and 'Traceback' not in err
    finally:
        root.chmod(0o755)
    assert _files(root) == []


def test_colorize_label():
    lbl = np.array([[0, 10, 255]], np.uint8)
    rgb = tc.colorize_label(lbl)
    assert rgb.shape == (1, 3, 3) and rgb.dtype == np.uint8
    assert rgb[0, 0].tolist() == [128, 64, 128] and rgb[0, 1].tolist() == [70, 130, 180]
    assert rgb[0, 2].tolist() == [0, 0, 0]


def test_cli_skips_matching_data_and_force_regenerates(tmp_path, capsys):
    cli = _load_cli()
    out = str(tmp_path / 'tc')
    argv = ['--out', out, '--num-train', '2', '--num-val', '1', '--height', '64', '--width', '128', '--no-progress']
    assert cli.main(argv) == 0
    meta = osp.join(out, tc.META_FILE)
    stamp = os.stat(meta).st_mtime_ns
    assert cli.main(argv) == 0
    assert 'up to date' in capsys.readouterr().out
    assert os.stat(meta).st_mtime_ns == stamp
    # Different parameters or --force regenerate; a missing file makes the data out of date.
    assert cli.main(argv[:-1] + ['--seed', '1', '--no-progress']) == 0
    assert tc.read_toy_city_meta(out)['params']['seed'] == 1
    assert cli.main(argv + ['--seed', '1', '--force']) == 0
    assert os.stat(meta).st_mtime_ns != stamp
    os.remove(osp.join(out, tc.toy_city_files(dict(num_train=2, num_val=1))[0]))
    capsys.readouterr()
    assert cli.main(argv + ['--seed', '1']) == 0
    assert 'wrote' in capsys.readouterr().out


@pytest.mark.parametrize('option, value, message', [
    ('--height', '16', 'must be in [64, 4096], got 16'),
    ('--width', '5000', 'must be in [64, 4096], got 5000'),
    ('--num-train', '0', 'must be in [1, 1000000], got 0'),
    ('--num-val', '-1', 'must be in [0, 1000000], got -1'),
    ('--seed', '-1', 'must be >= 0, got -1'),
    ('--seed', 'abc', "must be an integer, got 'abc'"),
    ('--num-train', '2.5', "must be an integer, got '2.5'"),
])
def test_cli_range_checks_at_parse_time(tmp_path, capsys, option, value, message):
    out = tmp_path / 'tc'
    with pytest.raises(SystemExit) as exc:
        _load_cli().main(['--out', str(out), option, value])
    assert exc.value.code == 2
    assert f'argument {option}: {message}' in capsys.readouterr().err
    assert not out.exists()


def test_cli_refuses_a_file_as_out(tmp_path, capsys):
    target = tmp_path / 'file'
    target.write_text('x')
    with pytest.raises(SystemExit) as exc:
        _load_cli().main(['--out', str(target)])
    assert exc.value.code == 2 and 'argument --out' in capsys.readouterr().err
    assert target.read_text() == 'x'
