"""Result files that are never left half-written."""
import json
import os
import os.path as osp
import tempfile
from contextlib import contextmanager
from typing import Any, Iterator

__all__ = ['atomic_path', 'write_json_atomic']


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


def write_json_atomic(obj: Any, path: str) -> None:
    """Writes ``obj`` as indented JSON through :func:`atomic_path`."""
    with atomic_path(path) as tmp, open(tmp, 'w') as f:
        json.dump(obj, f, indent=2)
        f.write('\n')
