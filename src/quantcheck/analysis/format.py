"""Number formatting shared by every report output (HTML, Markdown, figure labels).

One function per kind of number, so a value reads the same wherever it appears. Every function
accepts ``None`` (a quantity that was not measured) and returns :data:`NA` for it.
Accuracy differences in the results are fractions; they are shown in percentage points.
"""

from __future__ import annotations

import math

from quantcheck.schema.results import Interval

NA = "n/a"

_GIB = 1024**3
_MIB = 1024**2
_KIB = 1024


def _missing(x: float | None) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x))


def percent(x: float | None, digits: int = 1) -> str:
    """A fraction in [0, 1] as a percentage: ``0.725 -> "72.5%"``."""
    if _missing(x):
        return NA
    return f"{x * 100:.{digits}f}%"


def points(diff: float | None, digits: int = 1) -> str:
    """An accuracy difference (a fraction) in signed percentage points: ``-0.017 -> "-1.7 pts"``."""
    if _missing(diff):
        return NA
    value = diff * 100
    if round(value, digits) == 0:
        value = 0.0  # no "-0.0"
    return f"{value:+.{digits}f} pts"


def interval(ci: Interval | None, kind: str = "points", digits: int = 1) -> str:
    """An interval in brackets. ``kind``: "points" (signed pts), "percent" or "plain" (3 decimals)."""
    if ci is None:
        return NA
    if kind == "points":
        lo, hi = ci.low * 100, ci.high * 100
        lo = 0.0 if round(lo, digits) == 0 else lo
        hi = 0.0 if round(hi, digits) == 0 else hi
        return f"[{lo:+.{digits}f}, {hi:+.{digits}f}]"
    if kind == "percent":
        return f"[{ci.low * 100:.{digits}f}, {ci.high * 100:.{digits}f}]"
    if kind == "nats":
        return f"[{nats(ci.low)}, {nats(ci.high)}]"
    return f"[{ci.low:.3f}, {ci.high:.3f}]"


def level(x: float | None) -> str:
    """A confidence level with the digits it needs: ``0.95 -> "95%"``, ``0.9875 -> "98.75%"``."""
    if _missing(x):
        return NA
    return f"{x * 100:.4g}%"


def points_ci(diff: float | None, ci: Interval | None) -> str:
    """A difference with its interval: ``"-1.7 pts [-4.2, +0.8]"``."""
    if _missing(diff):
        return NA
    text = points(diff)
    return f"{text} {interval(ci, 'points')}" if ci is not None else text


def percent_ci(x: float | None, ci: Interval | None, digits: int = 1) -> str:
    """An accuracy with its interval: ``"72.5% [61.0, 81.3]"``; a probability change with
    ``digits=3``, as llama-perplexity prints delta-p: ``"-0.596% [-0.624, -0.568]"``."""
    if _missing(x):
        return NA
    text = percent(x, digits)
    return f"{text} {interval(ci, 'percent', digits)}" if ci is not None else text


def pvalue(p: float | None) -> str:
    """A p-value with three decimals, ``"<0.001"`` below that."""
    if _missing(p):
        return NA
    if p < 0.001:
        return "<0.001"
    return f"{p:.3f}"


def nats(x: float | None) -> str:
    """A KL divergence in nats, readable from 1e-6 to 10."""
    if _missing(x):
        return NA
    if x == 0:
        return "0"
    if abs(x) < 1e-3:
        return f"{x:.1e}"
    if abs(x) < 1:
        return f"{x:.4f}"
    return f"{x:.3f}"


def nats_ci(x: float | None, ci: Interval | None) -> str:
    if _missing(x):
        return NA
    return f"{nats(x)} {interval(ci, 'nats')}" if ci is not None else nats(x)


def number_ci(x: float | None, ci: Interval | None) -> str:
    """A plain number (a perplexity or its ratio) with three decimals and its interval: ``"1.028 [1.021, 1.036]"``."""
    if _missing(x):
        return NA
    return f"{number(x, 3)} {interval(ci, 'plain')}" if ci is not None else number(x, 3)


def in_unit(x: float | None, ci: Interval | None, unit: str) -> str:
    """A value with its interval in a declared unit (`metrics.item_metrics`): points, nats or a plain number."""
    return {"points": points_ci, "nats": nats_ci}.get(unit, number_ci)(x, ci)


def fraction(x: float | None, digits: int = 3) -> str:
    """A plain number in [0, 1] (a Jaccard index): ``"0.975"``."""
    if _missing(x):
        return NA
    return f"{x:.{digits}f}"


def ratio(x: float | None) -> str:
    """A variant/reference ratio: ``"0.52x"``."""
    if _missing(x):
        return NA
    return f"{x:.2f}\u00d7"


def memory_vs_ref(weight_ratio: float | None, saving: float | None) -> str:
    """Weight memory relative to the reference: ``"0.52x (saves 48.0%)"``."""
    if _missing(weight_ratio):
        return NA
    if _missing(saving):
        return ratio(weight_ratio)
    verb = "saves" if saving >= 0 else "adds"
    return f"{ratio(weight_ratio)} ({verb} {percent(abs(saving))})"


def nbytes(n: int | float | None) -> str:
    """Bytes in binary units: ``"1.23 GiB"``."""
    if _missing(n):
        return NA
    n = float(n)
    if abs(n) >= _GIB:
        return f"{n / _GIB:.2f} GiB"
    if abs(n) >= _MIB:
        return f"{n / _MIB:.1f} MiB"
    if abs(n) >= _KIB:
        return f"{n / _KIB:.1f} KiB"
    return f"{n:.0f} B"


def seconds(s: float | None) -> str:
    """A duration: ``"12.3 ms"`` below one second, ``"1.23 s"`` above."""
    if _missing(s):
        return NA
    if abs(s) < 1:
        return f"{s * 1000:.1f} ms"
    if abs(s) < 100:
        return f"{s:.2f} s"
    return f"{s:.0f} s"


def rate(x: float | None, unit: str) -> str:
    """A throughput: ``rate(123.4, "tok/s") -> "123.4 tok/s"``."""
    if _missing(x):
        return NA
    return f"{x:.1f} {unit}"


def number(x: float | None, digits: int = 1) -> str:
    if _missing(x):
        return NA
    return f"{x:.{digits}f}"


def integer(n: int | None) -> str:
    if n is None:
        return NA
    return f"{n:,}"


def bits(x: float | None) -> str:
    """Bits per parameter: ``"4.50 bits"``."""
    if _missing(x):
        return NA
    return f"{x:.2f} bits"
