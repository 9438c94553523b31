"""mmseg's own `tools/train.py` (from the installed mmseg wheel), e.g.
`python tools/train.py configs/ee_hrnet/ee-fcn_hr-tiny_1xb4-1k_toycity-256x512.py`."""
import os.path as osp
import sys

sys.path.insert(0, osp.dirname(osp.abspath(__file__)))
from _mmseg_tool import finish_distributed, run_mmseg_tool  # noqa: E402

if __name__ == '__main__':
    try:
        run_mmseg_tool('train.py')
    finally:
        finish_distributed()
