"""pkm_ref.stats: means, 95 % intervals and the three-way comparison every verdict uses."""

import math
import statistics

import pytest

from pkm_ref import stats
from pkm_ref.stats import Estimate


def test_t_critical_values_match_the_tables():
    assert stats.t_critical(1) == pytest.approx(12.706)
    assert stats.t_critical(2) == pytest.approx(4.303)
    assert stats.t_critical(30) == pytest.approx(2.042)
    # Beyond the table: the expansion, within 1e-3 of the exact values (t(0.975, 60) = 2.0003,
    # t(0.975, 120) = 1.9799), and towards the normal quantile.
    assert stats.t_critical(60) == pytest.approx(2.0003, abs=1e-3)
    assert stats.t_critical(120) == pytest.approx(1.9799, abs=1e-3)
    assert stats.t_critical(10**6) == pytest.approx(1.95996, abs=1e-4)
    with pytest.raises(ValueError, match="df >= 1"):
        stats.t_critical(0)


def test_an_estimate_is_the_mean_with_a_student_t_interval():
    estimate = Estimate.of([1.0, 2.0, 3.0])
    half = 4.303 * statistics.stdev([1.0, 2.0, 3.0]) / math.sqrt(3)
    assert (estimate.mean, estimate.n) == (2.0, 3)
    assert estimate.half_width == pytest.approx(half)
    assert (estimate.low, estimate.high) == pytest.approx((2.0 - half, 2.0 + half))
    assert estimate.describe() == "2.0 ± 2.5"  # the half-width to two significant digits
    assert Estimate.of([1.954, 1.96, 1.948]).describe() == "1.954 ± 0.015"
    assert Estimate.of([12_000.0, 12_500.0, 13_000.0]).describe() == "12,500 ± 1,242"


def test_one_value_has_no_interval():
    one = Estimate.of([1.954])
    assert one.low is None and one.high is None and one.describe() == "1.954"
    assert stats.compare(one, Estimate.of([5.0])) == "within noise"
    assert stats.goal(one, 3.0, at_most=True) == "within noise"


def test_estimates_round_trip_through_result_files():
    estimate = Estimate.of([12_557.0, 12_900.5])
    data = estimate.to_json()
    assert data["n"] == 2 and data["values"] == [12_557.0, 12_900.5]
    assert Estimate.from_json(data) == estimate
    assert Estimate.from_json(2.128) == Estimate.of([2.128])  # a result file of one run
    assert stats.read(None) is None and stats.describe(None) == ""
    assert stats.describe(1_678_336) == "1678336" and stats.describe(data).startswith("12,729 ± ")
    with pytest.raises(ValueError, match="finite"):
        Estimate.of([1.0, float("nan")])


def test_overlapping_intervals_are_within_noise_and_separated_ones_decide():
    low = Estimate.of([1.90, 1.91, 1.89])
    high = Estimate.of([2.10, 2.11, 2.09])
    near = Estimate.of([1.92, 1.86, 1.95])  # its interval overlaps low's
    assert stats.compare(low, high) == "lower" and stats.compare(high, low) == "higher"
    assert stats.compare(low, near) == "within noise"
    assert stats.claim(low, high, "lower") == "agrees"
    assert stats.claim(high, low, "lower") == "does not agree"
    assert stats.claim(low, near, "lower") == "within noise"


def test_a_difference_smaller_than_the_spread_never_decides():
    """The issue's case: a 0.002 difference of means with seeds spread by 0.05."""
    a = Estimate.of([1.935, 1.985, 1.890])
    b = Estimate.of([1.937, 1.987, 1.892])
    assert a.mean < b.mean and stats.claim(a, b, "lower") == "within noise"


def test_a_goal_is_met_only_when_the_whole_interval_clears_it():
    assert stats.goal(Estimate.of([2.0, 2.1, 1.9]), 3.0, at_most=True) == "met"
    assert stats.goal(Estimate.of([3.9, 4.3, 4.6]), 4.0, at_most=True) == "within noise"
    assert stats.goal(Estimate.of([4.3, 4.4, 4.5]), 4.0, at_most=True) == "not met"
    assert stats.goal(Estimate.of([400.0, 420.0, 410.0]), 150.0, at_most=False) == "met"


def test_claims_made_of_parts():
    assert stats.all_of(["agrees", "agrees"]) == "agrees"
    assert stats.all_of(["agrees", "within noise"]) == "within noise"
    assert stats.all_of(["within noise", "does not agree"]) == "does not agree"


def test_ratios_pair_values_measured_together():
    ratio = stats.ratio(Estimate.of([10.0, 20.0]), Estimate.of([2.0, 5.0]))
    assert ratio.values == (5.0, 4.0)
    with pytest.raises(ValueError, match="pairs values"):
        stats.ratio(Estimate.of([1.0, 2.0]), Estimate.of([1.0]))


def test_spread_is_the_mean_and_the_extremes_the_figures_draw():
    assert stats.spread(iter([1.0, 2.0, 6.0])) == (3.0, 1.0, 6.0)  # any iterable, read once
