"""Result files that are never left half-written, and sets of files that are replaced together."""
import json
import os
import os.path as osp
import shutil
import signal
import tempfile
import threading
from contextlib import contextmanager
from typing import Any, Dict, Iterator, Optional, Sequence

__all__ = ['OUTPUTS_KEY', 'atomic_path', 'atomic_file_set', 'write_json', 'write_json_atomic', 'read_json_outputs']

#: Key of a result JSON that lists the files written with it (basenames), so a later run may remove exactly those.
OUTPUTS_KEY = 'outputs'


@contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """Yields a temporary path next to ``path``; on success it is moved over ``path`` with ``os.replace``.

    An interrupted or failing write removes the temporary file and leaves an existing ``path`` untouched, so a
    checkpoint, JSON or plot is either the old one or the complete new one. The file gets mode 0644 (mkstemp
    creates 0600).

    Args:
        path (str): The final file.

    Yields:
        str: Where to write.
    """
    folder = osp.dirname(osp.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix='.' + osp.basename(path) + '.', suffix='.tmp', dir=folder)
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if osp.exists(tmp):
            os.remove(tmp)
        raise


@contextmanager
def _sigint_deferred() -> Iterator[None]:
    """Holds back Ctrl-C (SIGINT) until the block is done, then raises it (main thread only; elsewhere a no-op)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.SIG_DFL if previous is None else previous)
    if received:
        raise KeyboardInterrupt


@contextmanager
def atomic_file_set(paths: Sequence[str], remove: Sequence[str] = ()) -> Iterator[Dict[str, str]]:
    """Writes several result files as one set: all are replaced only after every one of them is complete.

    Yields a temporary path (inside a hidden temporary folder next to the first file) for every final path. When the
    block succeeds, the files are moved into place with ``os.replace`` (Ctrl-C is held back during the moves, so
    an interrupt never leaves a new file beside an old one) and then the stale files in ``remove`` (files an earlier
    run of the same tool wrote and this one does not) are deleted. When the block fails or is interrupted, the
    temporaries are removed and no final file is touched. Only the given paths are ever replaced or removed.

    Args:
        paths (Sequence[str]): The final files (on one file system: each folder is created if needed).
        remove (Sequence[str]): Files of an earlier set to delete after the new set is in place.

    Yields:
        dict: Final path -> temporary path to write it at.
    """
    finals = [osp.abspath(p) for p in paths]
    if len(set(finals)) != len(finals):
        raise ValueError(f'atomic_file_set: the same path is given twice in {list(paths)}')
    created = []
    for folder in dict.fromkeys(osp.dirname(p) for p in finals):
        missing = []
        while not osp.isdir(folder):
            missing.append(folder)
            folder = osp.dirname(folder)
        for folder in reversed(missing):  # outermost first, so `created` can be undone innermost first
            os.mkdir(folder)
            created.append(folder)
    # One hidden folder per set, in the first file's folder: os.replace from there is a rename on the same device.
    tmp_dir = tempfile.mkdtemp(prefix='.tmp-', dir=osp.dirname(finals[0]))
    tmps = {final: osp.join(tmp_dir, f'{i}-{osp.basename(final)}') for i, final in enumerate(finals)}
    try:
        yield {orig: tmps[final] for orig, final in zip(paths, finals)}
        missing = [final for final, tmp in tmps.items() if not osp.isfile(tmp)]
        if missing:
            raise RuntimeError(f'atomic_file_set: nothing was written for {missing}')
        with _sigint_deferred():
            for final, tmp in tmps.items():
                os.chmod(tmp, 0o644)
                os.replace(tmp, final)
            for stale in remove:
                stale = osp.abspath(stale)
                if stale not in tmps and osp.isfile(stale):
                    os.remove(stale)
    except BaseException:
        # a failed set leaves no trace: folders this call created are removed again if they stayed empty
        shutil.rmtree(tmp_dir, ignore_errors=True)
        for folder in reversed(created):
            if osp.isdir(folder) and not os.listdir(folder):
                os.rmdir(folder)
        raise
    shutil.rmtree(tmp_dir, ignore_errors=True)


def write_json_atomic(obj: Any, path: str) -> None:
    """Writes ``obj`` as indented JSON through :func:`atomic_path`."""
    with atomic_path(path) as tmp:
        write_json(obj, tmp)


def write_json(obj: Any, path: str) -> None:
    """Writes ``obj`` as indented JSON with a final newline (no atomicity: see :func:`write_json_atomic`)."""
    with open(path, 'w') as f:
        json.dump(obj, f, indent=2)
        f.write('\n')


def read_json_outputs(path: str) -> Optional[Sequence[str]]:
    """The files (full paths) that the result JSON at ``path`` says were written with it, or None.

    A missing or unreadable JSON, or one without the :data:`OUTPUTS_KEY` list, gives None: then nothing of an
    earlier run is known to be ours, and nothing is removed.
    """
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    names = data.get(OUTPUTS_KEY) if isinstance(data, dict) else None
    if not isinstance(names, list) or not all(isinstance(n, str) and osp.basename(n) == n for n in names):
        return None
    return [osp.join(osp.dirname(osp.abspath(path)), n) for n in names]
