"""Stop-rule families of a threshold sweep and their command-line syntax.

A family sweeps one value of one stop rule with the other parameters fixed, e.g. ``cbt-alpha:0.5:0.99:10@beta=0.998``
(CBT with alpha from 0.5 to 0.99 in 10 steps, beta fixed at 0.998). Syntax: ``FAMILY:VALUES[@KEY=V,KEY=V...]``;
``VALUES`` is ``START:STOP:NUM[:SPACING]`` (``NUM`` values from ``START`` to ``STOP``, both included; ``SPACING``
``lin`` (default), ``log`` (geometric) or ``log1m`` (geometric in ``1 - v``: dense near 1, where confidence thresholds
matter)), a list ``V1,V2,...`` or one value. Every value is range-checked when parsed, before any work.
"""
import argparse
import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional

from torch import Tensor

__all__ = ['FamilySpec', 'FAMILIES', 'ALIASES', 'SPACINGS', 'Setting', 'Family', 'parse_family']

SPACINGS = ('lin', 'log', 'log1m')


# ---------------------------------------------------------------------------------------------------------------
# families and their syntax
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FamilySpec:
    """A rule family: which stop rule it sweeps, which value and which fixed parameters.

    Attributes:
        name (str): Canonical name (``--sweep NAME:...``).
        rule (str): ``'global'``, ``'entropy'``, ``'dtop'``, ``'cbt'`` (CBT, CBT-ns) or ``'precision'``.
        swept (str): Name of the swept value (``t``, ``alpha``, ``beta``, ``target``).
        defaults (dict): Fixed parameters (``@KEY=V``) and their defaults.
        title (str): Legend text.
        share (bool): CBT: one threshold vector for all exits.
    """
    name: str
    rule: str
    swept: str
    defaults: Dict[str, float]
    title: str
    share: bool = True


FAMILIES: Dict[str, FamilySpec] = {
    'adpc':
    FamilySpec('adpc', 'global', 't', {}, 'ADP-C (global t)'),
    'entropy':
    FamilySpec('entropy', 'entropy', 't', {}, 'entropy (t)'),
    'dtop':
    FamilySpec('dtop', 'dtop', 't', dict(topk=5), 'DToP (t)'),
    'cbt-alpha':
    FamilySpec('cbt-alpha', 'cbt', 'alpha', dict(beta=0.998), 'CBT (alpha)'),
    'cbt-beta':
    FamilySpec('cbt-beta', 'cbt', 'beta', dict(alpha=0.9), 'CBT (beta)'),
    'cbtns-alpha':
    FamilySpec('cbtns-alpha', 'cbt', 'alpha', dict(beta=0.998), 'CBT-ns (alpha)', share=False),
    'cbtns-beta':
    FamilySpec('cbtns-beta', 'cbt', 'beta', dict(alpha=0.9), 'CBT-ns (beta)', share=False),
    'precision':
    FamilySpec('precision', 'precision', 'target', dict(alpha=0.5, beta=0.999), 'cbt-precision (target)', share=False),
}
ALIASES = {'global': 'adpc', 'cbt-precision': 'precision'}


@dataclass
class Setting:
    """One point of a sweep.

    Attributes:
        family (str): Canonical family name (``'dense'`` for the dense reference).
        value (float): The swept value.
        params (dict): All parameters of the rule (swept value included).
        label (str): Human-readable name.
        thresholds (Tensor, optional): ``(N, K)`` class thresholds of CBT-like rules (set before the pass).
        warnings (list[str]): Calibration warnings raised while computing them.
    """
    family: str
    value: float
    params: Dict[str, float]
    label: str
    thresholds: Optional[Tensor] = None
    warnings: List[str] = field(default_factory=list)

    @property
    def rule(self) -> str:
        """str: The stop rule (``'dense'``, ``'global'``, ``'entropy'``, ``'dtop'``, ``'cbt'``, ``'precision'``)."""
        return 'dense' if self.family == 'dense' else FAMILIES[self.family].rule

    def stop_cfg(self) -> Optional[dict]:
        """The cfg ``EarlyExitEncoderDecoder._stop_mask_with`` reads (None: nothing stops)."""
        rule = self.rule
        if rule == 'dense':
            return None
        if rule in ('cbt', 'precision'):
            return dict(exit_mode='cbt')  # thresholds go into the model's cbt_thresholds buffer
        cfg = {'exit_mode': rule, f'{rule}_threshold': self.value}
        if rule == 'dtop':
            cfg['dtop_topk'] = int(self.params['topk'])
        return cfg


@dataclass
class Family:
    """A parsed ``--sweep`` item: its spec text and settings."""
    name: str
    text: str
    settings: List[Setting]

    @property
    def title(self) -> str:
        """str: Legend text, with the fixed parameters."""
        spec = FAMILIES[self.name]
        fixed = ', '.join(f'{k}={self.settings[0].params[k]:g}' for k in spec.defaults)
        return spec.title + (f' @ {fixed}' if fixed else '')


def _number(text: str, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'{what}: {text!r} is not a number') from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f'{what}: {text!r} is not finite')
    return value


def _values(text: str, where: str) -> List[float]:
    """``START:STOP:NUM[:SPACING]``, ``V1,V2,...`` or ``V`` -> values (no range check yet)."""
    parts = text.split(':')
    if len(parts) == 1:
        return [_number(v, where) for v in text.split(',')]
    if len(parts) not in (3, 4):
        raise argparse.ArgumentTypeError(f'{where}: expected START:STOP:NUM[:SPACING], V1,V2,... or one value')
    start, stop = _number(parts[0], f'{where} START'), _number(parts[1], f'{where} STOP')
    try:
        num = int(parts[2])
    except ValueError:
        num = 0
    if num < 1:
        raise argparse.ArgumentTypeError(f'{where}: NUM must be an integer >= 1, got {parts[2]!r}')
    spacing = parts[3] if len(parts) == 4 else 'lin'
    if spacing not in SPACINGS:
        raise argparse.ArgumentTypeError(f'{where}: SPACING must be one of {SPACINGS}, got {spacing!r}')
    if num == 1:
        if start != stop:
            raise argparse.ArgumentTypeError(f'{where}: NUM=1 needs START == STOP')
        return [start]
    if spacing == 'log' and not (start > 0 and stop > 0):
        raise argparse.ArgumentTypeError(f'{where}: log spacing needs START > 0 and STOP > 0')
    if spacing == 'log1m' and not (start < 1 and stop < 1):
        raise argparse.ArgumentTypeError(f'{where}: log1m spacing (geometric in 1 - v) needs START < 1 and STOP < 1')
    out = []
    for i in range(num):
        f = i / (num - 1)
        if spacing == 'lin':
            v = start + f * (stop - start)
        elif spacing == 'log':
            v = start * (stop / start)**f
        else:
            v = 1.0 - (1.0 - start) * ((1.0 - stop) / (1.0 - start))**f
        out.append(float(f'{v:.6g}'))
    out[0], out[-1] = start, stop
    return out


def _check_value(spec: FamilySpec, params: Dict[str, float], where: str) -> None:
    """Range check of one setting's parameters; the message names the option and the allowed range."""
    if spec.rule in ('global', 'entropy', 'dtop'):
        t = params['t']
        if not 0.0 <= t <= 1.0:
            raise argparse.ArgumentTypeError(f'{where}: the threshold t must be in [0, 1], got {t:g}')
        if spec.rule == 'dtop':
            k = params['topk']
            if k != int(k) or k < 0:
                raise argparse.ArgumentTypeError(f'{where}: topk must be an integer >= 0, got {k:g}')
    elif spec.rule == 'cbt':
        a, b = params['alpha'], params['beta']
        if not (0.0 < a <= 1.0 and 0.0 < b <= 1.0 and a <= b):
            raise argparse.ArgumentTypeError(f'{where}: CBT needs 0 < alpha <= beta <= 1, got alpha={a:g}, beta={b:g}')
    else:
        from mmseg_cbt.calibration.precision import check_precision_options
        try:
            check_precision_options(params['target'], params['alpha'], params['beta'])
        except ValueError as e:
            raise argparse.ArgumentTypeError(f'{where}: {e}') from None


def _setting_label(spec: FamilySpec, p: Dict[str, float]) -> str:
    if spec.rule == 'global':
        return f'ADP-C t={p["t"]:g}'
    if spec.rule == 'entropy':
        return f'entropy t={p["t"]:g}'
    if spec.rule == 'dtop':
        return f'DToP t={p["t"]:g} k={int(p["topk"])}'
    if spec.rule == 'cbt':
        return ('CBT' if spec.share else 'CBT-ns') + f' [{p["alpha"]:g}, {p["beta"]:g}]'
    return f'cbt-precision p={p["target"]:g} [{p["alpha"]:g}, {p["beta"]:g}]'


def parse_family(text: str) -> Family:
    """Parses and range-checks one ``--sweep`` item (an argparse ``type``).

    Args:
        text (str): e.g. ``'cbt-alpha:0.5:0.99:10@beta=0.998'``.

    Returns:
        Family: The family and its settings (duplicate values dropped, order kept).

    Raises:
        argparse.ArgumentTypeError: Unknown family or parameter, bad syntax, a value out of range.
    """
    where = f'--sweep {text!r}'
    head, _, tail = text.partition('@')
    name, sep, values_text = head.partition(':')
    name = ALIASES.get(name.lower(), name.lower())
    if name not in FAMILIES:
        raise argparse.ArgumentTypeError(f'{where}: unknown family {name!r} (one of {", ".join(FAMILIES)}, '
                                         f'aliases {", ".join(ALIASES)})')
    if not sep or not values_text:
        raise argparse.ArgumentTypeError(f'{where}: expected {name}:VALUES[@KEY=V,...]')
    spec = FAMILIES[name]
    if spec.rule == 'dtop':
        from mmseg_cbt.models.segmentors.options import EXIT_MODES
        if 'dtop' not in EXIT_MODES:
            raise argparse.ArgumentTypeError(f'{where}: this version of the model has no dtop rule')
    fixed = dict(spec.defaults)
    for item in filter(None, tail.split(',')):
        key, eq, val = item.partition('=')
        if key not in spec.defaults or not eq:
            allowed = ', '.join(spec.defaults) or 'none'
            raise argparse.ArgumentTypeError(f'{where}: unknown parameter {item!r} for {name} (allowed: {allowed})')
        fixed[key] = _number(val, f'{where} {key}')
    settings, seen = [], set()
    for v in _values(values_text, where):
        if v in seen:
            continue
        seen.add(v)
        params = dict(fixed, **{spec.swept: v})
        _check_value(spec, params, where)
        settings.append(Setting(name, v, params, _setting_label(spec, params)))
    return Family(name, text, settings)
