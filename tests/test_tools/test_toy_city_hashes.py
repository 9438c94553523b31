"""The toy city's output is pinned: the files of fixed settings hash to what the generator wrote before it moved.

The hashes were recorded with the generator as it stood in ``mmseg_cbt/datasets/toy_city.py`` (OpenCV 4.11.0's PNG
encoder); any change to a random draw, its order or the rasterising changes them. A different OpenCV may encode the
same pixels into other PNG bytes, so there the decoded pixels are compared instead.
"""
import hashlib
import json
import os
import os.path as osp

import cv2
import numpy as np
import pytest
from utils import load_toy_city

tc = load_toy_city()

#: OpenCV whose PNG encoder wrote the recorded files.
RECORDED_CV2 = '4.11.0'
#: The metadata's ``generator`` entry before the move (the only byte that changed in the metadata).
OLD_GENERATOR = 'mmseg_cbt.datasets.toy_city'

SETTINGS = {
    'a': dict(num_train=4, num_val=2, height=64, width=128, seed=0),
    'b': dict(num_train=3, num_val=2, height=96, width=160, seed=3),
}

#: sha256 of every file written, by setting and relative path.
FILE_SHA256 = {
    'a': {
        'gtFine/train/aachen/aachen_000000_000019_gtFine_labelTrainIds.png':
        '32395fd60513703219192e23a29ab68639f049ab038a59dd1954746b64753539',
        'gtFine/train/aachen/aachen_000001_000019_gtFine_labelTrainIds.png':
        '2e07cbbe1f0907131000f88e3f21b7b6498b072cc08782e34f64a7821421f044',
        'gtFine/train/bochum/bochum_000002_000019_gtFine_labelTrainIds.png':
        '4c6e535537abba66ca18b396b689e2a187610d704652bd311d2c5839bfec7f41',
        'gtFine/train/bochum/bochum_000003_000019_gtFine_labelTrainIds.png':
        'cedccc4ada07c7f85df2b4ae8c817b7f6007f47c124ff06dbf28623a3930d510',
        'gtFine/val/frankfurt/frankfurt_000000_000019_gtFine_labelTrainIds.png':
        '69aca3c5996a695d643c80ef27211951a5e0ea7cdf0496c8c97722d8b27a6603',
        'gtFine/val/frankfurt/frankfurt_000001_000019_gtFine_labelTrainIds.png':
        'e763a43f68dd55388232dbb73fdda1c62191093e5b0684267342d3168cf2a744',
        'leftImg8bit/train/aachen/aachen_000000_000019_leftImg8bit.png':
        '011aaf01f1cbb8fe072d24f360213266914f69ca22c0009a7ec14d1c93eb2e9e',
        'leftImg8bit/train/aachen/aachen_000001_000019_leftImg8bit.png':
        'b081346d759db79ecb863b417f5ef9dd1b4c25df9fff065c51949fd920e0f6b7',
        'leftImg8bit/train/bochum/bochum_000002_000019_leftImg8bit.png':
        '395428de4c0e4802ed35e0d236b2b0f7a9031c59fb85e5f1be9253a191a66559',
        'leftImg8bit/train/bochum/bochum_000003_000019_leftImg8bit.png':
        '34b92bd6250fffe9ddfe93622fdf32454df37fc9931f2a4b5fd6b5a41496bad4',
        'leftImg8bit/val/frankfurt/frankfurt_000000_000019_leftImg8bit.png':
        'ec0433d592c9386bc4887efac7e4766efa1afe2221146f7cab5bfe4592419c22',
        'leftImg8bit/val/frankfurt/frankfurt_000001_000019_leftImg8bit.png':
        '29a5cd1c6989008b9087a3a5272624f9917e310f11c57f63cd634d01b040e93e',
        'toy_city_meta.json': '177d196cc224674223efae89841896374fb39874dffd370535ac4100ab1407de',
    },
    'b': {
        'gtFine/train/aachen/aachen_000000_000019_gtFine_labelTrainIds.png':
        '8781d2ec15640ac4624a62cdb222fe7798d5ecb2550e57b888269c54e0e16ec0',
        'gtFine/train/aachen/aachen_000001_000019_gtFine_labelTrainIds.png':
        'b7add034257d85f7fe30fac021183f1f0df2600b26c4a7b2fb352e2916b1f598',
        'gtFine/train/bochum/bochum_000002_000019_gtFine_labelTrainIds.png':
        '2d3df2b3fd1187bc1812086d362702dbd191468ab93c1bb13f39fab72e9bec6c',
        'gtFine/val/frankfurt/frankfurt_000000_000019_gtFine_labelTrainIds.png':
        '7773159ae5fdf1945bc90f290fcb3bb3e7b4ba3f96b60d8a300ebcc97c0d59f3',
        'gtFine/val/frankfurt/frankfurt_000001_000019_gtFine_labelTrainIds.png':
        'e11bb09dcff47e7840965f55ee8efbfe49be0472ee9ae88457b367dbef8d061c',
        'leftImg8bit/train/aachen/aachen_000000_000019_leftImg8bit.png':
        '9e620e4284d675787e0a6d71baf92b9cc5498cb847bd62a0fcc53d2a1b87ece1',
        'leftImg8bit/train/aachen/aachen_000001_000019_leftImg8bit.png':
        'a0c8f083d01394de420d83cb069b64616e11e53d631566ef325e200d5d7928fd',
        'leftImg8bit/train/bochum/bochum_000002_000019_leftImg8bit.png':
        'd7b9c89179d84053c80b3e17d94602875d511716ca107f57aad6388d2e9d6a0a',
        'leftImg8bit/val/frankfurt/frankfurt_000000_000019_leftImg8bit.png':
        '6c5a4aeec6ed2ff77770da2ec9a90acc0fc2b7efa0ba1fc9447e53c561522b16',
        'leftImg8bit/val/frankfurt/frankfurt_000001_000019_leftImg8bit.png':
        '9506d3b95ac06a8a5b5a93c79b93eab2659524fc361535f27e23e703091e5c2a',
        'toy_city_meta.json': '8de9e21b32da02297c575c194038760a47da1af29eb262a3b6b63d1ed9cfefad',
    },
}

#: sha256 over (relative path, decoded pixels) of every PNG, in sorted path order, by setting.
PIXEL_SHA256 = {
    'a': '195a7d18d89218e00c0f5920edeabbc5342f6422582f7400c3c12e0cfe839beb',
    'b': '0bae18e89424c679da1514b0b3ac83903a2277a06eeae300a76cd8a387acadf7',
}

#: sha256 of ``image.tobytes() + label.tobytes()`` of single default-size (256x512) samples.
SAMPLE_SHA256 = {
    (0, 'train', 0): '1ff21939eeac1fd970b9c864940cf524d787bb82f7c717d81ad16e92f8330804',
    (1, 'val', 5): 'f7064161bb21e041fb9713dfcad80c416c837c70b25b24fb07123dc9c1877d2c',
    (7, 'train', 11): 'e315f775ec583b7fb3928ed3445f41bf1bd64c6cbd91d7c770baa565bff0efed',
}


def _sha256(path):
    with open(path, 'rb') as f:
        return hashlib.sha256(f.read()).hexdigest()


def _pixel_sha256(root):
    h = hashlib.sha256()
    for dirpath, _, names in sorted(os.walk(root)):
        for name in sorted(names):
            if name.endswith('.png'):
                path = osp.join(dirpath, name)
                h.update(osp.relpath(path, root).encode())
                h.update(cv2.imread(path, cv2.IMREAD_UNCHANGED).tobytes())
    return h.hexdigest()


def _meta_as_recorded(root):
    """The metadata file's bytes with the ``generator`` entry set back to its value before the move."""
    with open(osp.join(root, tc.META_FILE), 'rb') as f:
        raw = f.read()
    meta = json.loads(raw)
    assert raw == (json.dumps(meta, indent=2, sort_keys=True) + '\n').encode()
    assert meta['generator'] == tc.GENERATOR
    meta['generator'] = OLD_GENERATOR
    return (json.dumps(meta, indent=2, sort_keys=True) + '\n').encode()


@pytest.mark.parametrize('setting', sorted(SETTINGS))
def test_generated_files_are_byte_identical(tmp_path, setting):
    root = str(tmp_path / setting)
    tc.generate_toy_city(root, progress=False, **SETTINGS[setting])
    expected = FILE_SHA256[setting]
    written = sorted(osp.relpath(osp.join(d, n), root).replace(os.sep, '/') for d, _, ns in os.walk(root) for n in ns)
    assert written == sorted(expected)
    assert hashlib.sha256(_meta_as_recorded(root)).hexdigest() == expected[tc.META_FILE]
    assert _pixel_sha256(root) == PIXEL_SHA256[setting]
    if cv2.__version__ != RECORDED_CV2:
        pytest.skip(f'PNG bytes recorded with OpenCV {RECORDED_CV2}, found {cv2.__version__} (pixels checked)')
    for rel, digest in expected.items():
        if rel != tc.META_FILE:
            assert _sha256(osp.join(root, rel)) == digest, rel


@pytest.mark.parametrize('args', sorted(SAMPLE_SHA256))
def test_default_size_samples_are_identical(args):
    img, lbl = tc.render_toy_city_sample(*args)
    assert img.shape == (256, 512, 3) and lbl.shape == (256, 512)
    assert img.dtype == np.uint8 and lbl.dtype == np.uint8
    assert hashlib.sha256(img.tobytes() + lbl.tobytes()).hexdigest() == SAMPLE_SHA256[args]
