import math

import pytest
from scipy import stats

from bissl.pipeline.stats import paired_comparison, summarize


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
    assert "improved" in c.verdict("bissl", "conventional", "test_top1")


def test_verdicts_are_honest():
    assert "do not differ significantly" in paired_comparison([0.9, 0.8], [0.85, 0.86]).verdict("b", "c", "m")
    assert "reduced" in paired_comparison([0.80, 0.81, 0.79], [0.90, 0.92, 0.91]).verdict("b", "c", "m")
    single = paired_comparison([0.9], [0.8])
    assert single.ci_low is None and "too few seeds" in single.verdict("b", "c", "m")


def test_unmatched_seeds_rejected():
    with pytest.raises(ValueError, match="matched seeds"):
        paired_comparison([0.1, 0.2], [0.1])
