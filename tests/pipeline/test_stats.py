import math

import pytest
from scipy import stats

from bissl.pipeline.stats import holm, paired_comparison, summarize


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
