"""Summary statistics of a study: mean +- std per arm and paired comparisons over seeds.

Every arm of a study is run with the same seeds, so arms are compared seed by seed: the paired
difference ``d_s = acc_arm(s) - acc_baseline(s)`` has a t-based 95% confidence interval and a paired
t-test p-value (scipy). With fewer than two seeds the interval and p-value are undefined (``None``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class ArmSummary:
    mean: float
    std: float  # sample standard deviation (ddof=1); 0 for a single seed
    n: int


@dataclass(frozen=True)
class PairedComparison:
    mean_diff: float
    ci_low: float | None
    ci_high: float | None
    p_value: float | None
    n: int

    def verdict(self, arm: str, baseline: str, metric: str) -> str:
        """One honest sentence: did ``arm`` beat ``baseline`` at the 5% level on this data?"""
        points = 100 * self.mean_diff
        if self.ci_low is None or self.ci_high is None:
            return f"{arm} vs {baseline}: {points:+.2f} points {metric} from {self.n} seed(s); too few seeds to test"
        ci = f"95% CI [{100 * self.ci_low:+.2f}, {100 * self.ci_high:+.2f}], paired t-test p = {self.p_value:.3g}"
        if self.ci_low > 0:
            return f"{arm} improved {metric} over {baseline} by {points:.2f} points ({ci})."
        if self.ci_high < 0:
            return f"{arm} reduced {metric} relative to {baseline} by {-points:.2f} points ({ci})."
        return f"{arm} and {baseline} do not differ significantly in {metric}: {points:+.2f} points ({ci})."

    def as_dict(self) -> dict[str, float | int | None]:
        return asdict(self)


def summarize(values: Sequence[float]) -> ArmSummary:
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return ArmSummary(mean, std, n)


def paired_comparison(arm: Sequence[float], baseline: Sequence[float], confidence: float = 0.95) -> PairedComparison:
    """Paired difference ``arm - baseline`` over matched seeds: mean, t confidence interval, t-test p-value."""
    from scipy import stats

    if len(arm) != len(baseline):
        raise ValueError(f"paired comparison needs matched seeds, got {len(arm)} and {len(baseline)} values")
    diffs = [a - b for a, b in zip(arm, baseline, strict=True)]
    summary = summarize(diffs)
    if summary.n < 2:
        return PairedComparison(summary.mean, None, None, None, summary.n)
    if summary.std == 0.0:  # identical differences: the interval collapses, the test is degenerate
        p_value = 1.0 if summary.mean == 0.0 else 0.0
        return PairedComparison(summary.mean, summary.mean, summary.mean, p_value, summary.n)
    half = stats.t.ppf(0.5 + confidence / 2, summary.n - 1) * summary.std / math.sqrt(summary.n)
    p_value = float(stats.ttest_rel(arm, baseline).pvalue)
    return PairedComparison(summary.mean, summary.mean - half, summary.mean + half, p_value, summary.n)
