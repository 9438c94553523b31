"""Runs one of the tools that the mmseg wheel ships under ``mmseg/.mim/tools`` as if called directly."""
import os.path as osp
import runpy
import sys


def run_mmseg_tool(rel_path: str) -> None:
    """Executes ``mmseg/.mim/tools/<rel_path>`` with the current ``sys.argv`` (our configs import mmseg_cbt
    through ``custom_imports``, so mmseg's own scripts train and test the early-exit models unchanged)."""
    import mmseg
    script = osp.join(osp.dirname(mmseg.__file__), '.mim', 'tools', rel_path)
    if not osp.isfile(script):
        raise FileNotFoundError(f'mmseg tool not found: {script} (is mmsegmentation==1.2.2 installed from its wheel?)')
    # make `import mmseg_cbt` work from a source checkout that was not pip-installed
    root = osp.dirname(osp.dirname(osp.abspath(__file__)))
    if root not in sys.path:
        sys.path.insert(0, root)
    sys.argv[0] = script
    runpy.run_path(script, run_name='__main__')


def finish_distributed() -> None:
    """Destroys the default process group, if one was created (mmseg's scripts never do).

    Without it, gloo's worker threads are still joinable when the interpreter shuts down, and a process can abort
    with "terminate called without an active exception" after its work is done. The group's threads end only when
    the last object holding it is gone, so the finished runner is collected first.
    """
    import gc

    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        gc.collect()  # the finished runner (its DDP wrapper holds the group) sits in reference cycles
        dist.destroy_process_group()
