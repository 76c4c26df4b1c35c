"""Means, 95 % intervals and the three-way comparison behind every verdict of the study.

Used by ``pkm-ref compare`` (seeds, notebook 05) and ``pkm-ref bench`` (rounds, notebook 06), and by
the report that judges the paper's claims and the speed goals (``pkm_ref.report``).

A measured quantity is repeated: a model trained with n seeds, a benchmark run in n independent
rounds. ``Estimate.of(values)`` keeps the n values and gives their mean and a **95 % Student-t
interval** for that mean,

    mean ± t(0.975, n - 1) · s / √n,    s = the sample standard deviation of the values,

which assumes the values are independent draws from one normal distribution (seeds are; rounds
of a benchmark are close to it on an idle machine). One value gives no interval.

``compare(a, b)`` says which is lower only when the intervals do not overlap; otherwise the
difference is **within noise** and decides nothing. That is deliberately conservative: two means
whose 95 % intervals just touch differ at about the 0.5 % level, so "agrees" and "does not agree"
are strong statements, and a difference smaller than the spread of the seeds never makes one.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

Order = Literal["lower", "higher", "within noise"]
Claim = Literal["agrees", "does not agree", "within noise"]
GoalStatus = Literal["met", "not met", "within noise"]
WITHIN_NOISE = "within noise"

# t(0.975, df): the two-sided 95 % critical values of Student's t for df = 1 ... 30.
_T_975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
          2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
          2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)  # fmt: skip
_Z_975 = 1.959964


def t_critical(df: int) -> float:
    """t(0.975, df), the factor of a 95 % interval from ``df + 1`` values.

    Tabulated up to df = 30; beyond, the Cornish-Fisher expansion of t around the normal
    quantile z, z + (z³ + z) / (4 df) + (5z⁵ + 16z³ + 3z) / (96 df²), exact to 3 decimals there.
    """
    if df < 1:
        raise ValueError(f"a t interval needs df >= 1 (two values or more), got df={df}")
    if df <= len(_T_975):
        return _T_975[df - 1]
    z = _Z_975
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


@dataclass(frozen=True)
class Estimate:
    """The mean of repeated measurements and its 95 % interval (``low``, ``high``).

    ``low`` and ``high`` are None for a single value: one measurement says nothing about its noise.
    """

    values: tuple[float, ...]

    @classmethod
    def of(cls, values: Iterable[float]) -> Estimate:
        values = tuple(float(v) for v in values)
        if not values:
            raise ValueError("an estimate needs at least one value")
        if not all(math.isfinite(v) for v in values):
            raise ValueError(f"an estimate needs finite values, got {values}")
        return cls(values)

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values)

    @property
    def half_width(self) -> float | None:
        """t(0.975, n - 1) · s / √n, or None for one value."""
        if self.n < 2:
            return None
        return t_critical(self.n - 1) * statistics.stdev(self.values) / math.sqrt(self.n)

    @property
    def low(self) -> float | None:
        return None if self.half_width is None else self.mean - self.half_width

    @property
    def high(self) -> float | None:
        return None if self.half_width is None else self.mean + self.half_width

    def describe(self) -> str:
        """``1.954 ± 0.012``: mean ± half-width of the 95 % interval, the half-width to two
        significant digits (whole numbers from 100 up) and the mean to the same decimal place;
        one value: the value alone."""
        half = self.half_width
        if half is None:
            return _number(self.mean)
        if half == 0:
            return f"{_number(self.mean)} ± 0"
        decimals = max(0, 1 - math.floor(math.log10(half)))
        return f"{self.mean:,.{decimals}f} ± {half:,.{decimals}f}"

    def to_json(self) -> dict:
        """What a result file records: mean, interval, n and the values themselves."""
        return {"mean": self.mean, "low": self.low, "high": self.high, "n": self.n,
                "values": list(self.values)}  # fmt: skip

    @classmethod
    def from_json(cls, data: dict | float | int) -> Estimate:
        """Read back ``to_json``; a plain number (a result file of one run) is one value."""
        if isinstance(data, dict):
            return cls.of(data["values"])
        return cls.of([data])


def to_json(values: Iterable[float]) -> dict:
    """``Estimate.of(values).to_json()``: a number measured n times (seeds, rounds) as a result
    table stores it."""
    return Estimate.of(values).to_json()


def spread(values: Iterable[float]) -> tuple[float, float, float]:
    """(mean, min, max) of ``values``: what the figures draw for seeds or rounds, a band from the
    lowest to the highest (the tables give the 95 % interval)."""
    values = list(values)
    return statistics.fmean(values), min(values), max(values)


def read(value: dict | float | int | None) -> Estimate | None:
    """A result-file cell as an Estimate (None stays None: not measured)."""
    return None if value is None else Estimate.from_json(value)


def describe(value: dict | float | int | None) -> str:
    """A result-file cell as text: ``mean ± half-width`` for an estimate, blank for None."""
    if value is None:
        return ""
    if isinstance(value, int | str):
        return str(value)
    return Estimate.from_json(value).describe()


def ratio(numerator: Estimate, denominator: Estimate) -> Estimate:
    """numerator / denominator, value by value: values at the same index were measured together
    (the same round of a benchmark), so each pair's ratio is one measurement of the ratio."""
    if numerator.n != denominator.n:
        raise ValueError(
            f"a ratio pairs values measured together: got {numerator.n} and {denominator.n} values"
        )
    return Estimate.of(a / b for a, b in zip(numerator.values, denominator.values, strict=True))


def compare(a: Estimate, b: Estimate | float) -> Order:
    """``"lower"`` when a's interval lies wholly below b's (b may be an exact number, such as a
    goal), ``"higher"`` when wholly above, else ``"within noise"`` (also when either side has
    no interval: one value)."""
    b_low, b_high = (b, b) if isinstance(b, int | float) else (b.low, b.high)
    if a.low is None or b_low is None:
        return WITHIN_NOISE
    if a.high < b_low:
        return "lower"
    if a.low > b_high:
        return "higher"
    return WITHIN_NOISE


def claim(a: Estimate, b: Estimate | float, expected: Literal["lower", "higher"]) -> Claim:
    """Whether "a is ``expected`` than b" holds: ``agrees``, ``does not agree`` (the intervals
    are separated the other way) or ``within noise``."""
    order = compare(a, b)
    if order == WITHIN_NOISE:
        return WITHIN_NOISE
    return "agrees" if order == expected else "does not agree"


def all_of(claims: Sequence[Claim]) -> Claim:
    """A claim made of parts: it does not agree if any part does not, agrees if every part does,
    else it is within noise."""
    if "does not agree" in claims:
        return "does not agree"
    return "agrees" if all(c == "agrees" for c in claims) else WITHIN_NOISE


def goal(value: Estimate, target: float, at_most: bool) -> GoalStatus:
    """A goal ``value <= target`` (``at_most``) or ``value >= target``: ``met`` only when the whole
    interval clears the target, ``not met`` when the whole interval misses it."""
    outcome = claim(value, target, "lower" if at_most else "higher")
    return {"agrees": "met", "does not agree": "not met"}.get(outcome, WITHIN_NOISE)


def _number(x: float) -> str:
    """4 significant digits; thousands with separators (tokens/s), small numbers in e-notation."""
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    return f"{x:.4g}"
