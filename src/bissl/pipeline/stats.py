"""Summary statistics of a study: mean +- std per arm and paired comparisons over seeds.

Every arm of a study is run with the same seeds, so arms are compared seed by seed: the paired
difference ``d_s = acc_arm(s) - acc_baseline(s)`` has a t-based 95% confidence interval and a paired
t-test p-value (scipy). With fewer than two seeds the interval and p-value are undefined (``None``).
When a report compares several arms with the baseline, :func:`holm` adjusts the p-values of those comparisons
for multiplicity (Holm's step-down method, which controls the family-wise error rate).

What a null means: each comparison also carries the Wilcoxon signed-rank p (no normality assumed), the effect
size ``d_z = mean(d) / sd(d)`` with its exact confidence interval (noncentral t), and the minimum detectable
effect (MDE): the smallest true mean difference the paired t-test would find with 80 % power at two-sided
alpha 0.05, given ``n`` and the measured ``sd(d)``. A non-significant difference says only "smaller than
about the MDE, or missed".
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
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
    p_value: float | None  # paired t-test
    n: int
    wilcoxon_p: float | None = None  # Wilcoxon signed-rank test
    d_z: float | None = None  # mean / sd of the differences
    d_z_ci: tuple[float, float] | None = None
    mde: float | None = None  # minimum detectable mean difference, 80 % power, two-sided alpha 0.05

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
    if summary.std <= _RESOLUTION * max(1.0, abs(summary.mean)):  # identical differences (up to float rounding):
        # the interval collapses and the tests are degenerate
        p_value = 1.0 if summary.mean == 0.0 else 0.0
        return PairedComparison(summary.mean, summary.mean, summary.mean, p_value, summary.n)
    half = stats.t.ppf(0.5 + confidence / 2, summary.n - 1) * summary.std / math.sqrt(summary.n)
    p_value = float(stats.ttest_rel(arm, baseline).pvalue)
    d_z = summary.mean / summary.std
    return PairedComparison(
        summary.mean, summary.mean - half, summary.mean + half, p_value, summary.n, wilcoxon_p(diffs), d_z,
        d_z_interval(d_z, summary.n, confidence), minimum_detectable_effect(summary.std, summary.n),
    )  # fmt: skip


_RESOLUTION = 1e-12
"""Differences whose spread is below this (relative to their mean, or absolute under 1) are identical: float
rounding of equal scores, not a measured spread (a t of 1e4 and more is beyond the noncentral t's numerics)."""


def wilcoxon_p(diffs: Sequence[float]) -> float | None:
    """Two-sided Wilcoxon signed-rank p of paired differences (zeros dropped; exact for small n without ties);
    ``None`` with fewer than two non-zero differences, where no test exists."""
    from scipy import stats

    if sum(d != 0 for d in diffs) < 2:
        return None
    return float(stats.wilcoxon(diffs, zero_method="wilcox").pvalue)


def _noncentrality(target: Callable[[float], float], low: float, high: float) -> float:
    """The root of the increasing ``target`` in ``[low, high]`` (widened until it brackets one)."""
    from scipy.optimize import brentq

    while target(low) > 0:
        low -= high - low
    while target(high) < 0:
        high += high - low
    return float(brentq(target, low, high, xtol=1e-10))


def d_z_interval(d_z: float, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Exact CI of the paired effect size ``d_z`` from ``n`` pairs: ``t = d_z sqrt(n)`` is noncentral t with
    ``n - 1`` df and noncentrality ``delta sqrt(n)``; the limits are the ``delta`` that put ``t`` at the
    ``(1 ± confidence) / 2`` quantiles (Steiger and Fouladi's inversion); where scipy's noncentral t has no
    finite tail (a very large ``|t|``), the large-sample normal interval."""
    from scipy import stats

    if n < 2:
        raise ValueError(f"an effect-size interval needs at least 2 pairs, got {n}")
    t, df, root_n = d_z * math.sqrt(n), n - 1, math.sqrt(n)
    tail = (1 - confidence) / 2

    def limit(cdf_at_t: float) -> float:  # nct.cdf(t; ncp) falls as ncp grows: solve cdf = cdf_at_t
        return _noncentrality(lambda ncp: cdf_at_t - stats.nct.cdf(t, df, ncp), t - 10, t + 10) / root_n

    try:
        low, high = limit(1 - tail), limit(tail)
    except ValueError:  # scipy's nct.cdf is NaN far in its tails (|t| >~ 50 at 1 df): no exact inversion there
        low = high = math.nan
    if math.isfinite(low) and math.isfinite(high):
        return low, high
    # the large-sample interval d_z +- z sqrt(1/n + d_z^2 / (2n)) (Hedges and Olkin), where the exact one fails
    half = stats.norm.ppf(1 - tail) * math.sqrt(1 / n + d_z**2 / (2 * n))
    return d_z - half, d_z + half


def minimum_detectable_effect(sd: float, n: int, power: float = 0.8, alpha: float = 0.05) -> float | None:
    """Smallest true mean difference a two-sided paired t-test at ``alpha`` detects with ``power``, for ``n``
    pairs whose differences have standard deviation ``sd``: the ``delta`` with
    ``P(|T| > t_crit) = power`` for ``T`` noncentral t (``n - 1`` df, noncentrality ``delta sqrt(n) / sd``).
    ``None`` when undefined (fewer than 2 pairs, or ``sd`` 0)."""
    from scipy import stats

    if n < 2 or sd <= 0:
        return None
    df = n - 1
    t_crit = stats.t.ppf(1 - alpha / 2, df)

    def shortfall(ncp: float) -> float:
        return stats.nct.sf(t_crit, df, ncp) + stats.nct.sf(t_crit, df, -ncp) - power  # the lower tail by symmetry

    return _noncentrality(shortfall, 0.0, 10.0) * sd / math.sqrt(n)


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
