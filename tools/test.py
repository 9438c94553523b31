"""mmseg's own `tools/test.py` (from the installed mmseg wheel), e.g.
`python tools/test.py configs/ee_hrnet/ee-fcn_hr-tiny_1xb4-1k_toycity-256x512.py work_dirs/.../iter_1000.pth`.

mmseg's script loads the checkpoint with ``strict=False`` (mismatches are only logged); this wrapper first checks
it strictly against the model built from the config, so a checkpoint of another model is an error, not a test of
randomly initialised layers.
"""
import argparse
import os.path as osp
import sys

sys.path.insert(0, osp.dirname(osp.abspath(__file__)))
from _mmseg_tool import finish_distributed, run_mmseg_tool  # noqa: E402


def check_checkpoint(argv) -> None:
    """Builds the model of ``config`` (with ``--cfg-options``) and loads ``checkpoint`` into it strictly."""
    from mmengine.config import Config, DictAction
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument('config')
    p.add_argument('checkpoint')
    p.add_argument('--cfg-options', nargs='+', action=DictAction)
    args, _ = p.parse_known_args(argv)
    from mmengine.registry import init_default_scope

    from mmseg.registry import MODELS
    from mmseg.utils import register_all_modules

    register_all_modules(init_default_scope=False)
    import mmseg_cbt  # noqa: F401
    from mmseg_cbt.utils.checkpoint import load_checkpoint_strict
    cfg = Config.fromfile(args.config)
    if args.cfg_options:
        cfg.merge_from_dict(args.cfg_options)
    init_default_scope(cfg.get('default_scope', 'mmseg'))
    cfg.model.pretrained = None
    load_checkpoint_strict(MODELS.build(cfg.model), args.checkpoint, config=args.config, logger=None)


if __name__ == '__main__':
    if len(sys.argv) > 2 and not sys.argv[1].startswith('-'):
        check_checkpoint(sys.argv[1:])
    try:
        run_mmseg_tool('test.py')
    finally:
        finish_distributed()
