"""mmseg_cbt.utils.checkpoint: strict loading with errors naming the file, the keys and the config."""
import pytest
import torch
from utils import build_tiny_model


def test_unreadable_files_name_the_file(toy_cfg, tmp_path):
    from mmseg_cbt.utils.checkpoint import load_checkpoint_strict, read_checkpoint
    model = build_tiny_model(toy_cfg)
    good = tmp_path / 'good.pth'
    torch.save(dict(state_dict=model.state_dict()), good)
    data = good.read_bytes()
    (tmp_path / 'empty.pth').write_bytes(b'')
    (tmp_path / 'text.pth').write_text('not a checkpoint\n')
    (tmp_path / 'cut.pth').write_bytes(data[:len(data) // 2])
    torch.save([1, 2], tmp_path / 'list.pth')
    cases = [('empty.pth', r'empty.pth is empty \(0 bytes\)'), ('text.pth', r'text.pth is not a PyTorch checkpoint'),
             ('cut.pth', r'cannot read checkpoint .*cut.pth .*truncated or damaged'),
             ('list.pth', r'list.pth holds a list, not a dict')]
    for name, match in cases:
        with pytest.raises(ValueError, match=match):
            load_checkpoint_strict(model, str(tmp_path / name))
    with pytest.raises(FileNotFoundError, match='checkpoint not found: .*missing.pth'):
        read_checkpoint(str(tmp_path / 'missing.pth'))
    with pytest.raises(ValueError, match='is not a file'):
        read_checkpoint(str(tmp_path))


def test_strict_keys_and_calibration_buffers(toy_cfg, tmp_path, capsys):
    from mmseg_cbt.utils.checkpoint import CheckpointMismatchError, load_checkpoint_strict
    src = build_tiny_model(toy_cfg, seed=1)
    src.set_cbt_calibration(torch.full((19, ), 0.95), 0.9, 0.998)
    state = src.state_dict()
    # a DDP-wrapped save (module. prefix) loads, everything equal, calibrated
    torch.save(dict(state_dict={'module.' + k: v for k, v in state.items()}), tmp_path / 'ddp.pth')
    dst = build_tiny_model(toy_cfg, seed=2)
    ckpt = load_checkpoint_strict(dst, str(tmp_path / 'ddp.pth'))
    assert 'state_dict' in ckpt and dst.is_calibrated
    assert all(torch.equal(v, state[k]) for k, v in dst.state_dict().items())
    # no calibration buffers at all: loads, says so, uncalibrated
    torch.save(dict(state_dict={k: v for k, v in state.items() if not k.startswith('cbt_')}), tmp_path / 'old.pth')
    dst = build_tiny_model(toy_cfg, seed=2)
    load_checkpoint_strict(dst, str(tmp_path / 'old.pth'), logger=None)
    assert 'the model is UNCALIBRATED' in capsys.readouterr().out and not dst.is_calibrated
    assert torch.equal(dst.backbone.conv1.weight, src.backbone.conv1.weight)
    # one missing non-calibration key is an error naming it and the config
    broken = dict(state)
    del broken['backbone.conv1.weight']
    torch.save(dict(state_dict=broken), tmp_path / 'broken.pth')
    with pytest.raises(
            CheckpointMismatchError,
            match=r'broken.pth does not fit the model built from my_cfg.py: 1 '
            r'missing keys \(first: backbone.conv1.weight\)'):
        load_checkpoint_strict(build_tiny_model(toy_cfg), str(tmp_path / 'broken.pth'), config='my_cfg.py')
