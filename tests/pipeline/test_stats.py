import math

import numpy as np
import pytest
from scipy import stats

from bissl.pipeline.stats import (
    d_z_interval,
    holm,
    minimum_detectable_effect,
    paired_comparison,
    summarize,
    wilcoxon_p,
)


def test_summarize_by_hand():
    s = summarize([0.9, 0.8, 1.0])
    assert s.mean == pytest.approx(0.9) and s.std == pytest.approx(0.1) and s.n == 3
    assert summarize([0.5]).std == 0.0


def test_paired_comparison_by_hand():
    arm, base = [0.92, 0.95, 0.90, 0.93], [0.90, 0.91, 0.89, 0.90]
    c = paired_comparison(arm, base)
    diffs = [0.02, 0.04, 0.01, 0.03]
    mean = sum(diffs) / 4
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / 3)
    half = stats.t.ppf(0.975, 3) * sd / 2
    assert c.mean_diff == pytest.approx(mean)
    assert (c.ci_low, c.ci_high) == (pytest.approx(mean - half), pytest.approx(mean + half))
    # The paired t statistic by hand: mean / (sd / sqrt(n)), two-sided.
    t = mean / (sd / 2)
    assert c.p_value == pytest.approx(2 * stats.t.sf(abs(t), 3))


def test_single_seed_has_no_interval():
    single = paired_comparison([0.9], [0.8])
    assert single.ci_low is None and single.p_value is None and single.mean_diff == pytest.approx(0.1)


def test_unmatched_seeds_rejected():
    with pytest.raises(ValueError, match="matched seeds"):
        paired_comparison([0.1, 0.2], [0.1])


def test_holm_by_hand():
    # sorted: 0.005 (x4 = 0.02), 0.01 (x3 = 0.03), 0.03 (x2 = 0.06), 0.04 (x1 = 0.04 -> running max 0.06)
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    # undefined p-values are no tests: m = 2 here
    assert holm([None, 0.2, 0.01]) == [None, pytest.approx(0.2), pytest.approx(0.02)]
    assert holm([0.6, 0.7]) == [1.0, 1.0]  # capped at 1, monotone
    assert holm([0.03]) == [pytest.approx(0.03)] and holm([]) == []


def test_wilcoxon_by_hand():
    # All four differences positive: W- = 0, the exact null puts 1/16 there; two-sided p = 2/16.
    assert wilcoxon_p([0.02, 0.04, 0.01, 0.03]) == pytest.approx(0.125)
    # Ranks 1..5, the negative one has rank 2: W- = 2; subsets of {1..5} summing to <= 2: {}, {1}, {2} -> 3/32.
    assert wilcoxon_p([1.0, -2.0, 3.0, 4.0, 5.0]) == pytest.approx(6 / 32)
    assert wilcoxon_p([0.0, 0.0, 0.3]) is None and wilcoxon_p([0.1]) is None  # fewer than two non-zero


def test_effect_size_and_its_interval():
    c = paired_comparison([0.92, 0.95, 0.90, 0.93], [0.90, 0.91, 0.89, 0.90])
    diffs = [0.02, 0.04, 0.01, 0.03]
    assert c.d_z == pytest.approx(0.025 / math.sqrt(sum((d - 0.025) ** 2 for d in diffs) / 3))
    low, high = c.d_z_ci
    assert low < c.d_z < high
    # Large n: the normal approximation d_z +- 1.96 sqrt(1/n + d_z^2 / (2n)) (0.5, n = 200: +-0.1470).
    low, high = d_z_interval(0.5, 200)
    assert (low, high) == (pytest.approx(0.5 - 0.1470, abs=3e-3), pytest.approx(0.5 + 0.1470, abs=3e-3))
    assert d_z_interval(0.0, 7) == (pytest.approx(-d_z_interval(0.0, 7)[1]), pytest.approx(d_z_interval(0.0, 7)[1]))


def test_minimum_detectable_effect_has_80_percent_power():
    # Simulated without scipy: n = 10 paired differences ~ N(mde, 1), paired t against t_0.975(9) = 2.262157.
    mde = minimum_detectable_effect(1.0, 10)
    assert mde == pytest.approx(0.996, abs=1e-3)  # G*Power, one-sample t, n = 10, power 0.8: d_z = 0.996
    gen = np.random.default_rng(0)
    diffs = gen.normal(mde, 1.0, size=(200_000, 10))
    t = diffs.mean(1) / (diffs.std(1, ddof=1) / math.sqrt(10))
    assert np.mean(np.abs(t) > 2.262157) == pytest.approx(0.80, abs=4e-3)
    # Large n: (z_0.975 + z_0.8) sd / sqrt(n) = 2.8016 sd / sqrt(n); scales with sd.
    assert minimum_detectable_effect(2.0, 1000) == pytest.approx(2 * 2.8016 / math.sqrt(1000), rel=2e-3)
    assert minimum_detectable_effect(1.0, 1) is None and minimum_detectable_effect(0.0, 5) is None
    assert paired_comparison([0.9, 0.8, 0.85], [0.88, 0.81, 0.8]).mde == pytest.approx(
        minimum_detectable_effect(math.sqrt(sum((d - 0.02) ** 2 for d in (0.02, -0.01, 0.05)) / 2), 3)
    )


def test_differences_equal_up_to_float_rounding_are_degenerate_not_a_crash():
    """Scores equal but for float rounding (1e-17) are identical differences: no noncentral-t root search."""
    base = [0.5, 0.6, 0.7]
    c = paired_comparison([b + 0.1 + e for b, e in zip(base, (0.0, 1e-17, -1e-17), strict=True)], base)
    assert c.mean_diff == pytest.approx(0.1) and c.p_value == 0.0 and c.ci_low == c.ci_high


@pytest.mark.parametrize("t", [-35306.0, -50.0, 50.0, 1000.0])
def test_d_z_interval_of_a_huge_t_falls_back_to_the_normal_interval(t):
    """Where scipy's noncentral t is NaN (|t| large at few pairs), the interval is the large-sample one, not a crash."""
    n = 2
    d_z = t / math.sqrt(n)
    low, high = d_z_interval(d_z, n)
    half = stats.norm.ppf(0.975) * math.sqrt(1 / n + d_z**2 / (2 * n))
    assert (low, high) == (pytest.approx(d_z - half), pytest.approx(d_z + half)) and low < d_z < high
