"""argparse types shared by the tools: a bad value is rejected when it is parsed, with the allowed range."""
import argparse
import math

__all__ = ['positive_int', 'threshold_value']


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'{text!r} is not an integer (expected >= 1)') from None
    if value < 1:
        raise argparse.ArgumentTypeError(f'{text!r} is not >= 1')
    return value


def threshold_value(text: str) -> float:
    """argparse type: a CBT threshold end point, a number in (0, 1] (NaN and infinities rejected)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'{text!r} is not a number (expected a threshold in (0, 1])') from None
    if not math.isfinite(value) or not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f'{text!r} is outside (0, 1]')
    return value
