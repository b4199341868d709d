"""The statistics behind a verdict: paired differences over seeds, Holm's correction, the
smallest difference the seeds could have detected, and ranks across protocols.

Seeds pair across methods (same split, warm start and data order per seed), so a method is
compared with the reference by the differences of its runs, not by two independent means:
the seed-to-seed spread that both share cancels. A table compares several methods with one
reference, so its p-values are adjusted together (Holm 1979): a "better" or "worse" in a
table of nine comparisons means what it says at the stated level. Where a difference is not
detected, the minimum detectable difference (80% power) says how large one would have had
to be: "no detectable difference" with an MDE of 0.5 mIoU is news, with an MDE of 8 it is not,
and the verdict says "inconclusive" instead when the MDE exceeds the effect of interest. An
interval is shown at the level Holm's test of it used, so it excludes 0 exactly when the
adjusted verdict is better or worse.
Across several protocols or splits, methods are ranked per block and compared by the
Friedman test with Nemenyi's critical difference (Demšar 2006, JMLR 7).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
from scipy import optimize, stats

ALPHA = 0.05
POWER = 0.8


@dataclass(frozen=True)
class PairedComparison:
    """method - reference over n paired seeds."""

    n: int
    difference: float  # mean of the paired differences
    low: float  # confidence interval of the mean difference (t distribution, n - 1 dof)
    high: float
    p: float  # two-sided paired t-test
    sd: float  # standard deviation of the differences (n - 1 denominator)
    mde: float  # smallest true difference the test detects with probability POWER at ALPHA


def compare_paired(method: Sequence[float], reference: Sequence[float], level: float = 0.95, power: float = POWER) -> PairedComparison:
    """The paired t comparison of two equally long, seed-aligned sequences. NaN where fewer
    than two pairs exist; identical differences (sd 0) give an interval of zero width."""
    a, b = np.asarray(method, dtype=np.float64), np.asarray(reference, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired values need two sequences of one length, got {a.shape} and {b.shape}")
    n = len(a)
    if n < 2:
        d = float(a[0] - b[0]) if n else math.nan
        return PairedComparison(n, d, math.nan, math.nan, math.nan, math.nan, math.nan)
    d = a - b
    mean, sd = float(d.mean()), float(d.std(ddof=1))
    half = float(stats.t.ppf(0.5 + level / 2, n - 1)) * sd / math.sqrt(n)
    if sd == 0:
        p = 1.0 if mean == 0 else 0.0
    else:
        p = float(2 * stats.t.sf(abs(mean) / (sd / math.sqrt(n)), n - 1))
    alpha = 1 - level
    return PairedComparison(n, mean, mean - half, mean + half, p, sd, minimum_detectable_difference(sd, n, alpha, power))


def paired_power(difference: float, sd: float, n: int, alpha: float = ALPHA) -> float:
    """Probability that the two-sided paired t-test at `alpha` rejects when the true mean
    difference is `difference` and the differences spread with `sd` (noncentral t)."""
    df = n - 1
    crit = stats.t.ppf(1 - alpha / 2, df)
    shift = difference * math.sqrt(n) / sd
    tails = np.array([stats.nct.sf(crit, df, shift), stats.nct.cdf(-crit, df, shift)])
    return float(np.nan_to_num(tails, nan=0.0).sum())  # scipy gives NaN for a tail too small to compute


def minimum_detectable_difference(sd: float, n: int, alpha: float = ALPHA, power: float = POWER) -> float:
    """The true mean difference at which the paired t-test has the given power."""
    if n < 2 or math.isnan(sd):
        return math.nan
    if sd == 0:
        return 0.0
    upper = sd
    while paired_power(upper, sd, n, alpha) < power:
        upper *= 2
    return float(optimize.brentq(lambda x: paired_power(x, sd, n, alpha) - power, 0.0, upper, xtol=1e-12 * sd))


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values, in the input order. NaN stays NaN and does not
    count as a test."""
    indexed = [(p, i) for i, p in enumerate(pvalues) if not math.isnan(p)]
    indexed.sort()
    m = len(indexed)
    adjusted = [math.nan] * len(pvalues)
    running = 0.0
    for rank, (p, i) in enumerate(indexed):
        running = max(running, min(1.0, (m - rank) * p))
        adjusted[i] = running
    return adjusted


def holm_levels(pvalues: Sequence[float], alpha: float = ALPHA) -> list[float]:
    """Per p-value, the confidence level 1 - alpha / k of the interval that agrees with Holm's
    verdict, so that an interval excluding 0 never stands beside "no detectable difference".
    k is the number of hypotheses open at the step that judged the p-value: m for the
    smallest, m - 1 for the next while Holm rejects, and the k of the first step Holm keeps for
    every p-value from there on (a later p-value below alpha / (its own k) is still kept by
    Holm, so its interval must not exclude 0). A rejected p passed p < alpha / k and a kept one
    has p >= alpha / k: the t interval at that level excludes 0 exactly when the Holm-adjusted
    p < alpha. These are not simultaneous intervals (Bonferroni's 1 - alpha / m are, but they
    can disagree with Holm's verdict). NaN stays NaN and does not count as a test."""
    indexed = sorted((p, i) for i, p in enumerate(pvalues) if not math.isnan(p))
    levels = [math.nan] * len(pvalues)
    rejected = 0
    for rank, (p, i) in enumerate(indexed):
        k = len(indexed) - rejected
        levels[i] = 1 - alpha / k
        if rejected == rank and k * p < alpha:  # holm() rejects at this step: (m - rank) p < alpha
            rejected += 1
    return levels


def verdict(
    comparison: PairedComparison, adjusted_p: float, alpha: float = ALPHA, mde: float = math.nan, effect_of_interest: float = math.inf,
    scale: float = 1.0,
) -> str:
    """better / worse where the adjusted p < alpha. Otherwise "no detectable difference" only
    where the seeds could have detected the effect of interest (MDE at most that): with an MDE
    above it nothing was ruled out, and the verdict says "inconclusive" with the MDE in the
    units shown (`scale`: shown units per unit of the values, 100 for mIoU as points)."""
    if comparison.n < 2 or math.isnan(adjusted_p):
        return "too few seeds"
    if adjusted_p < alpha:
        return "better" if comparison.difference > 0 else "worse"
    if mde > effect_of_interest:
        return f"inconclusive (MDE {scale * mde:.1f})"
    return "no detectable difference"


@dataclass(frozen=True)
class Ranking:
    """Methods ranked within each block (protocol x split); rank 1 is the best."""

    methods: list[str]
    mean_ranks: list[float]
    blocks: int
    chi2: float  # Friedman statistic
    p: float
    iman_davenport_f: float  # Demšar's preferred, less conservative form
    iman_davenport_p: float
    critical_difference: float  # Nemenyi, at ALPHA


def critical_difference(k: int, blocks: int, alpha: float = ALPHA) -> float:
    """Nemenyi's CD: two mean ranks differing by more differ at `alpha`."""
    q = stats.studentized_range.ppf(1 - alpha, k, np.inf) / math.sqrt(2)
    return float(q * math.sqrt(k * (k + 1) / (6 * blocks)))


def rank_methods(scores: Mapping[str, Mapping[str, float]], alpha: float = ALPHA) -> Ranking:
    """`scores[block][method]`, higher is better. Only methods present in every block are
    ranked (a rank among fewer methods would not be comparable)."""
    blocks = [b for b in scores if scores[b]]
    if len(blocks) < 2:
        raise ValueError(f"ranking needs at least two blocks (protocols or splits), got {len(blocks)}")
    methods = sorted(set.intersection(*(set(scores[b]) for b in blocks)))
    if len(methods) < 2:
        raise ValueError("ranking needs at least two methods present in every block")
    values = np.array([[scores[b][m] for m in methods] for b in blocks], dtype=np.float64)
    ranks = np.vstack([stats.rankdata(-row) for row in values])  # ties share their mean rank
    n, k = values.shape
    mean_ranks = ranks.mean(axis=0)
    chi2 = 12 * n / (k * (k + 1)) * (float(np.sum(mean_ranks**2)) - k * (k + 1) ** 2 / 4)
    p = float(stats.chi2.sf(chi2, k - 1))
    denominator = n * (k - 1) - chi2
    f = (n - 1) * chi2 / denominator if denominator > 0 else math.inf
    f_p = float(stats.f.sf(f, k - 1, (k - 1) * (n - 1))) if math.isfinite(f) else 0.0
    return Ranking(methods, [float(r) for r in mean_ranks], n, float(chi2), p, float(f), f_p, critical_difference(k, n, alpha))


def plot_critical_difference(ranking: Ranking, path, title: str = "") -> None:
    """Demšar's figure: mean ranks on an axis, methods whose ranks lie within one critical
    difference joined by a bar (not detectably different)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = np.argsort(ranking.mean_ranks)
    names = [ranking.methods[i] for i in order]
    ranks = [ranking.mean_ranks[i] for i in order]
    k, cd = len(names), ranking.critical_difference
    fig, ax = plt.subplots(figsize=(7, 1.2 + 0.32 * k))
    ax.set_xlim(k + 0.5, 0.5)  # rank 1 (best) on the right, as in Demšar's figures
    ax.set_ylim(-(k + 1), 2)
    ax.axhline(0, color="black", lw=1)
    for r in range(1, k + 1):
        ax.plot([r, r], [0, 0.15], color="black", lw=1)
        ax.text(r, 0.3, str(r), ha="center", va="bottom", fontsize=8)
    for row, (name, rank) in enumerate(zip(names, ranks)):
        y = -(row + 1) * 0.8
        ax.plot([rank, rank], [0, y], color="0.4", lw=0.8)
        ax.text(rank, y - 0.1, f"{name} ({rank:.2f})", ha="center", va="top", fontsize=8)
    cliques, start = [], 0
    for i in range(k):  # maximal runs of neighbours within one CD
        j = i
        while j + 1 < k and ranks[j + 1] - ranks[i] <= cd:
            j += 1
        if j > i and not any(a <= i and j <= b for a, b in cliques):
            cliques.append((i, j))
    for level, (i, j) in enumerate(cliques):
        ax.plot([ranks[i] - 0.03, ranks[j] + 0.03], [-0.35 - 0.2 * level] * 2, color="black", lw=3)
    ax.plot([1, 1 + cd], [1.4, 1.4], color="black", lw=1.5)
    ax.text(1 + cd / 2, 1.5, f"CD = {cd:.2f}", ha="center", va="bottom", fontsize=8)
    ax.set_title(title or f"mean rank over {ranking.blocks} blocks (Friedman p = {ranking.p:.3g})", fontsize=9)
    ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
