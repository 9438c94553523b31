"""What /proc/cpuinfo says about this CPU (Linux; empty elsewhere): one reader for the kernel build and the policy."""
from typing import List, Sequence

__all__ = ['cpuinfo_lines', 'cpu_vendor', 'cpu_model_name']


def cpuinfo_lines(prefixes: Sequence[str]) -> List[str]:
    """The distinct lines of /proc/cpuinfo starting with one of ``prefixes``, sorted; [] where it cannot be read."""
    try:
        with open('/proc/cpuinfo') as f:
            return sorted({ln for ln in f if ln.startswith(tuple(prefixes))})
    except OSError:
        return []


def _field(name: str) -> str:
    lines = cpuinfo_lines([name])
    return lines[0].split(':', 1)[1].strip() if lines else ''


def cpu_vendor() -> str:
    """``vendor_id`` (e.g. ``GenuineIntel``, ``AuthenticAMD``), empty where unknown."""
    return _field('vendor_id')


def cpu_model_name() -> str:
    """``model name`` (e.g. ``AMD EPYC``), empty where unknown."""
    return _field('model name')
