"""What /proc/cpuinfo says about this CPU (Linux; empty elsewhere): one reader for the kernel build and the policy."""
import functools
from typing import List, Sequence, Tuple

__all__ = ['cpuinfo_lines', 'cpu_vendor', 'cpu_model_name', 'cpu_signature']


def cpuinfo_lines(prefixes: Sequence[str]) -> List[str]:
    """The distinct lines of /proc/cpuinfo starting with one of ``prefixes``, sorted; [] where it cannot be read."""
    return list(_lines(tuple(prefixes)))


@functools.lru_cache(maxsize=None)
def _lines(prefixes: Tuple[str, ...]) -> Tuple[str, ...]:
    try:  # read once per process: what the CPU is does not change while it runs
        with open('/proc/cpuinfo') as f:
            return tuple(sorted({ln for ln in f if ln.startswith(prefixes)}))
    except OSError:
        return ()


def _field(name: str) -> str:
    for line in cpuinfo_lines([name]):
        key, _, value = line.partition(':')
        if key.strip() == name:  # 'model' must not match 'model name'
            return value.strip()
    return ''


def cpu_vendor() -> str:
    """``vendor_id`` (e.g. ``GenuineIntel``, ``AuthenticAMD``), empty where unknown."""
    return _field('vendor_id')


def cpu_model_name() -> str:
    """``model name`` (e.g. ``AMD EPYC``), empty where unknown."""
    return _field('model name')


def cpu_signature() -> str:
    """Vendor, family, model and stepping (e.g. ``AuthenticAMD 26/2/0``): tells CPU generations apart whose
    ``model name`` is the same (cloud VMs report "AMD EPYC" for Zen 4 and Zen 5 alike); empty where unknown."""
    parts = [_field('cpu family'), _field('model'), _field('stepping')]
    vendor = cpu_vendor()
    return f"{vendor} {'/'.join(parts)}" if vendor or any(parts) else ''
