"""Writes a toy city to disk in Cityscapes layout, owning exactly the files it lists in its metadata.

``toy_city_meta.json`` is written *first*, marked ``"complete": false`` and listing every file the run may write
(its own new files and those of the toy city it replaces); it is replaced by the final metadata once every image
is written. So an interrupted run leaves a marker that the next run reads to clean up after it, and a run only
ever deletes files listed there: anything else in the folder (a README, another city's images) stays.
"""
import json
import os
import os.path as osp
import time
from typing import Any, Callable, Dict, Iterable, List, Optional, Set

import cv2
import numpy as np

from .scene import render_toy_city_sample
from .spec import (ANN_DIR, GENERATOR_VERSION, IGNORE_INDEX, IMG_DIR, IMG_SUFFIX, MAX_IMAGES, META_FILE, SEG_MAP_SUFFIX,
                   SPLITS, TOY_CITY_CLASSES, toy_city_file_stem, validate_image_size, validate_int)

__all__ = ['GENERATOR', 'toy_city_files', 'read_toy_city_meta', 'is_toy_city_up_to_date', 'generate_toy_city']

GENERATOR = 'tools/dataset_converters/toy_city.py'
"""The ``generator`` entry of the metadata."""


def toy_city_files(params: Dict[str, Any]) -> List[str]:
    """Lists the image and label files a toy city with ``params`` consists of.

    Args:
        params: ``num_train``, ``num_val``, ``height``, ``width``, ``seed`` (only the counts matter).

    Returns:
        Paths relative to the dataset root, images and labels of every split.
    """
    files = []
    for split, n in (('train', params['num_train']), ('val', params['num_val'])):
        for i in range(n):
            city, stem = toy_city_file_stem(split, i, n)
            files.append(osp.join(IMG_DIR, split, city, stem + IMG_SUFFIX))
            files.append(osp.join(ANN_DIR, split, city, stem + SEG_MAP_SUFFIX))
    return files


def _read_meta_file(out_dir: str) -> Any:
    """The parsed metadata file; None when missing; ``ValueError`` when unreadable."""
    path = osp.join(out_dir, META_FILE)
    if not osp.isfile(path):
        return None
    try:
        with open(path) as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f'{path} is unreadable ({e})') from e
    if not isinstance(meta, dict) or not isinstance(meta.get('params'), dict):
        raise ValueError(f'{path} is not toy-city metadata')
    return meta


def read_toy_city_meta(out_dir: str) -> Optional[Dict[str, Any]]:
    """Reads the metadata of a complete toy city.

    Args:
        out_dir: Dataset root.

    Returns:
        The parsed metadata, or None when the file is missing, unreadable or marks an unfinished generation.
    """
    try:
        meta = _read_meta_file(out_dir)
    except ValueError:
        return None
    if meta is None or meta.get('complete', True) is not True:
        return None
    return meta


def is_toy_city_up_to_date(out_dir: str, params: Dict[str, Any]) -> bool:
    """Tells whether ``out_dir`` already holds a complete toy city made with ``params``.

    Args:
        out_dir: Dataset root.
        params: ``num_train``, ``num_val``, ``height``, ``width``, ``seed``.

    Returns:
        True when the metadata of a finished generation matches the parameters and generator version and every
        image and label file is present.
    """
    meta = read_toy_city_meta(out_dir)
    if meta is None or meta.get('version') != GENERATOR_VERSION or meta.get('params') != params:
        return False
    return all(osp.isfile(osp.join(out_dir, f)) for f in toy_city_files(params))


def _is_layout_file(rel: str) -> bool:
    """Whether a relative path names an image or label inside the toy-city layout (no ``..``, not absolute)."""
    parts = rel.split(os.sep)
    return (not osp.isabs(rel) and parts[0] in (IMG_DIR, ANN_DIR) and '..' not in parts and rel.endswith(
        (IMG_SUFFIX, SEG_MAP_SUFFIX)))


def _owned_files(out_dir: str, new_files: List[str]) -> Set[str]:
    """The files of ``out_dir`` a previous run wrote; refuses, before any write, to touch anyone else's.

    Raises:
        FileExistsError: If ``out_dir`` holds Cityscapes-style data without toy-city metadata, unreadable metadata,
            or a file this run would write that no toy-city run wrote.
    """
    try:
        meta = _read_meta_file(out_dir)
    except ValueError as e:
        raise FileExistsError(f'{e}: cannot tell which files under {out_dir} the toy-city generator wrote; '
                              f'remove {META_FILE} and those files, or choose another out_dir') from None
    if meta is None:
        split_dirs = [osp.join(out_dir, sub, split) for sub in (IMG_DIR, ANN_DIR) for split in SPLITS]
        if any(osp.isdir(d) and os.listdir(d) for d in split_dirs):
            raise FileExistsError(f'{out_dir} already holds {IMG_DIR}/ or {ANN_DIR}/ data without a {META_FILE}; '
                                  'refusing to overwrite what may be a real dataset. Choose another out_dir.')
        owned: Set[str] = set()
    elif 'files' in meta:
        owned = {osp.normpath(str(f)) for f in meta['files']}
        # Only ever delete toy-city images and labels inside out_dir, whatever the file says.
        bad = [f for f in owned if not _is_layout_file(f)]
        if bad:
            raise FileExistsError(f'{osp.join(out_dir, META_FILE)} lists files outside the toy-city layout '
                                  f'(e.g. {bad[0]!r}); remove it or choose another out_dir')
    else:
        try:
            owned = set(toy_city_files({k: meta['params'][k] for k in ('num_train', 'num_val')}))
        except (KeyError, TypeError, ValueError):
            raise FileExistsError(f'{osp.join(out_dir, META_FILE)} has no valid params; remove it or choose '
                                  'another out_dir') from None
    for f in new_files:
        if f not in owned and osp.lexists(osp.join(out_dir, f)):
            raise FileExistsError(f'{osp.join(out_dir, f)} exists but was not written by the toy-city generator; '
                                  'refusing to overwrite it. Choose another out_dir.')
    return owned


def _write_meta(out_dir: str, meta: Dict[str, Any]) -> None:
    """Replaces the metadata file atomically (a reader sees the old or the new file, never a part)."""
    path = osp.join(out_dir, META_FILE)
    tmp = path + '.tmp'
    with open(tmp, 'w') as f:
        json.dump(meta, f, indent=2, sort_keys=True)
        f.write('\n')
    os.replace(tmp, path)


def _remove_files(out_dir: str, files: Iterable[str]) -> None:
    """Deletes the listed files where present, then the folders that this leaves empty."""
    dirs = set()
    for f in files:
        path = osp.join(out_dir, f)
        if osp.lexists(path):
            os.remove(path)
        d = osp.dirname(f)
        while d:
            dirs.add(d)
            d = osp.dirname(d)
    for d in sorted(dirs, key=lambda p: -len(p)):
        path = osp.join(out_dir, d)
        if osp.isdir(path) and not os.listdir(path):
            os.rmdir(path)


def _make_progress(total: int, enabled: bool) -> Callable[[], None]:
    """Returns an ``update()`` callable for a progress bar (mmengine's, else tqdm's, else none)."""
    if not enabled or total <= 0:
        return lambda: None
    try:
        from mmengine.utils import ProgressBar
        bar = ProgressBar(total)
        return bar.update
    except ImportError:
        pass
    try:
        from tqdm import tqdm
        tbar = tqdm(total=total, desc='toy_city')

        def update() -> None:
            tbar.update(1)
            if tbar.n >= total:
                tbar.close()

        return update
    except ImportError:
        return lambda: None


def _write_splits(out_dir: str, counts: Dict[str, int], seed: int, height: int, width: int,
                  pixel_hist: Dict[str, np.ndarray], image_hist: Dict[str, np.ndarray], update: Callable[[],
                                                                                                         None]) -> None:
    """Renders and writes every image of every split, accumulating label histograms per split."""
    for split, n in counts.items():
        pixel_hist[split] = np.zeros(256, np.int64)
        image_hist[split] = np.zeros(256, np.int64)
        for i in range(n):
            img, lbl = render_toy_city_sample(seed, split, i, height, width)
            city, stem = toy_city_file_stem(split, i, n)
            img_dir = osp.join(out_dir, IMG_DIR, split, city)
            ann_dir = osp.join(out_dir, ANN_DIR, split, city)
            os.makedirs(img_dir, exist_ok=True)
            os.makedirs(ann_dir, exist_ok=True)
            # OpenCV writes BGR; the stored PNG is a normal RGB image.
            ok = cv2.imwrite(osp.join(img_dir, stem + IMG_SUFFIX), img[..., ::-1])
            ok = ok and cv2.imwrite(osp.join(ann_dir, stem + SEG_MAP_SUFFIX), lbl)
            if not ok:
                raise OSError(f'failed to write {stem} under {out_dir}')
            hist = np.bincount(lbl.ravel(), minlength=256)
            pixel_hist[split] += hist
            image_hist[split] += hist > 0
            update()


def _by_class(hist: np.ndarray, total: Optional[float]) -> Dict[str, Any]:
    """Histogram entries by class name (plus ``'ignore'``): fractions of ``total``, or counts when None."""
    keys = list(TOY_CITY_CLASSES) + ['ignore']
    vals = list(hist[:len(TOY_CITY_CLASSES)]) + [hist[IGNORE_INDEX]]
    if total is None:
        return {k: int(v) for k, v in zip(keys, vals)}
    return {k: round(float(v) / max(total, 1.0), 6) for k, v in zip(keys, vals)}


def generate_toy_city(out_dir: str,
                      num_train: int = 200,
                      num_val: int = 50,
                      height: int = 256,
                      width: int = 512,
                      seed: int = 0,
                      progress: bool = True) -> Dict[str, Any]:
    """Generates the toy-city dataset in Cityscapes layout.

    A toy city already in ``out_dir`` (recognised by its ``toy_city_meta.json``, finished or interrupted) is
    replaced; only the files its metadata lists are deleted. A folder holding Cityscapes-style data without that
    file, or a file this run would write that no toy-city run wrote, is left alone and an error raised before
    anything is written.

    Args:
        out_dir: Dataset root to write (created if missing).
        num_train: Number of training images (1 .. ``MAX_IMAGES``).
        num_val: Number of validation images (0 .. ``MAX_IMAGES``).
        height: Image height in pixels (``MIN_IMAGE_SIZE`` .. ``MAX_IMAGE_SIZE``).
        width: Image width in pixels (``MIN_IMAGE_SIZE`` .. ``MAX_IMAGE_SIZE``).
        seed: Dataset seed (non-negative); the same seed gives byte-identical files.
        progress: Show a progress bar.

    Returns:
        A summary dict: ``out_dir``, ``params`` (the arguments above), ``num_images`` per split,
        ``class_pixel_fraction`` per split (class name -> fraction of all pixels, plus ``'ignore'``),
        ``class_image_count`` per split (class name -> number of images containing it) and
        ``elapsed_s``.

    Raises:
        ValueError: On invalid arguments.
        FileExistsError: If ``out_dir`` holds data the generator did not write where it would write.
        PermissionError: If ``out_dir`` cannot be written (the message names it).
        OSError: If an image cannot be written.
    """
    if not isinstance(out_dir, (str, os.PathLike)) or not str(out_dir):
        raise ValueError(f'out_dir must be a non-empty path, got {out_dir!r}')
    validate_int('num_train', num_train, 1, MAX_IMAGES)
    validate_int('num_val', num_val, 0, MAX_IMAGES)
    validate_image_size(height, width)
    validate_int('seed', seed, 0)
    out_dir = str(out_dir)
    if osp.exists(out_dir) and not osp.isdir(out_dir):
        raise ValueError(f'out_dir {out_dir} exists and is not a folder')
    t0 = time.perf_counter()
    params = dict(num_train=int(num_train), num_val=int(num_val), height=int(height), width=int(width), seed=int(seed))
    new_files = toy_city_files(params)
    owned = _owned_files(out_dir, new_files)
    pending = {
        'generator': GENERATOR,
        'version': GENERATOR_VERSION,
        'params': params,
        'complete': False,
        'files': sorted(owned | set(new_files))
    }
    try:
        os.makedirs(out_dir, exist_ok=True)
        _write_meta(out_dir, pending)
    except OSError as e:
        raise type(e)(f'cannot write the toy city into {out_dir} ({e.strerror or e}); '
                      'choose a writable out_dir') from None
    _remove_files(out_dir, owned - set(new_files))
    counts = {'train': int(num_train), 'val': int(num_val)}
    update = _make_progress(sum(counts.values()), progress)
    pixel_hist: Dict[str, np.ndarray] = {}
    image_hist: Dict[str, np.ndarray] = {}
    # The frames are small: OpenCV's thread pool costs more than it saves, especially on a shared
    # 2-core machine. The caller's setting is restored afterwards.
    cv_threads = cv2.getNumThreads()
    cv2.setNumThreads(1)
    try:
        _write_splits(out_dir, counts, seed, height, width, pixel_hist, image_hist, update)
    finally:
        cv2.setNumThreads(cv_threads)
    summary: Dict[str, Any] = {
        'out_dir': out_dir,
        'params': params,
        'num_images': counts,
        'class_pixel_fraction': {
            s: _by_class(h, float(h.sum()))
            for s, h in pixel_hist.items()
        },
        'class_image_count': {
            s: _by_class(h, None)
            for s, h in image_hist.items()
        },
    }
    # The file list is implied by the params; out_dir is dropped so the data may be moved.
    meta = {'generator': GENERATOR, 'version': GENERATOR_VERSION, **summary, 'out_dir': None}
    _write_meta(out_dir, meta)
    summary['elapsed_s'] = round(time.perf_counter() - t0, 3)
    return summary
