"""Summary statistics of a study: mean +- std per arm and paired comparisons over seeds.

Every arm of a study is run with the same seeds, so arms are compared seed by seed: the paired
difference ``d_s = acc_arm(s) - acc_baseline(s)`` has a t-based 95% confidence interval and a paired
t-test p-value (scipy). With fewer than two seeds the interval and p-value are undefined (``None``).
When a report compares several arms with the baseline, :func:`holm` adjusts the p-values of those comparisons
for multiplicity (Holm's step-down method, which controls the family-wise error rate).
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


def holm(p_values: Sequence[float | None]) -> list[float | None]:
    """Holm-adjusted p-values, in the input order (``None`` stays ``None`` and is not counted as a test).

    With the ``m`` defined p-values sorted ascending, ``p_(i)`` becomes ``max_{j <= i} min(1, (m - j + 1) p_(j))``.
    """
    defined = sorted((p, i) for i, p in enumerate(p_values) if p is not None)
    adjusted: list[float | None] = [None] * len(p_values)
    running = 0.0
    for rank, (p, i) in enumerate(defined):
        running = max(running, min(1.0, (len(defined) - rank) * p))
        adjusted[i] = running
    return adjusted
