"""mmseg_cbt.utils.io: result files replaced as one set, never half-written, nothing else touched."""
import os
import signal

import pytest

from mmseg_cbt.utils import io as io_module
from mmseg_cbt.utils.io import atomic_file_set, read_json_outputs, write_json


def _write_set(paths, text):
    with atomic_file_set(paths) as tmp:
        for p in paths:
            with open(tmp[p], 'w') as f:
                f.write(text)


def test_failure_or_interrupt_before_commit_keeps_the_old_set(tmp_path):
    paths = [str(tmp_path / n) for n in ('a.json', 'b.csv')]
    _write_set(paths, 'old')
    (tmp_path / 'user.txt').write_text('mine')
    for exc in (RuntimeError('boom'), KeyboardInterrupt()):
        with pytest.raises(type(exc)):
            with atomic_file_set(paths) as tmp:
                open(tmp[paths[0]], 'w').write('new')
                raise exc
        assert [open(p).read() for p in paths] == ['old', 'old']
        assert sorted(os.listdir(tmp_path)) == ['a.json', 'b.csv', 'user.txt']
    with pytest.raises(RuntimeError, match='nothing was written'):
        with atomic_file_set(paths) as tmp:
            open(tmp[paths[0]], 'w').write('new')
    assert [open(p).read() for p in paths] == ['old', 'old']
    # a folder the failed set created is removed again
    new_dir = tmp_path / 'new' / 'sub'
    with pytest.raises(RuntimeError):
        with atomic_file_set([str(new_dir / 'x.json')]):
            raise RuntimeError
    assert not (tmp_path / 'new').exists()


def test_ctrl_c_during_the_moves_is_held_back(tmp_path, monkeypatch):
    """SIGINT arriving while the files are moved into place is raised only after the whole set is in place."""
    paths = [str(tmp_path / n) for n in ('a.json', 'b.csv', 'c.png')]
    _write_set(paths, 'old')
    real_replace, calls = os.replace, []

    def replace_and_interrupt(src, dst):
        calls.append(dst)
        real_replace(src, dst)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(io_module.os, 'replace', replace_and_interrupt)
    with pytest.raises(KeyboardInterrupt):
        _write_set(paths, 'new')
    assert [open(p).read() for p in paths] == ['new', 'new', 'new']
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_stale_files_only_those_listed(tmp_path):
    json_file = str(tmp_path / 'r.json')
    write_json(dict(outputs=['r.json', 'r.png']), json_file)
    (tmp_path / 'r.png').write_text('old chart')
    (tmp_path / 'user.png').write_text('mine')
    stale = [p for p in read_json_outputs(json_file) if p != json_file]
    with atomic_file_set([json_file], remove=stale) as tmp:
        write_json(dict(outputs=['r.json']), tmp[json_file])
    assert sorted(os.listdir(tmp_path)) == ['r.json', 'user.png']
    write_json(dict(outputs=['../escape.txt']), json_file)
    assert read_json_outputs(json_file) is None  # only plain names next to the JSON are ever ours
    assert read_json_outputs(str(tmp_path / 'missing.json')) is None
