"""Paired intervals, Holm, power and ranks against hand-computed values, scipy, and simulation."""

import math

import numpy as np
import pytest
from scipy import stats

from bench.results.statistics import (
    compare_paired,
    critical_difference,
    holm,
    holm_levels,
    minimum_detectable_difference,
    paired_power,
    plot_critical_difference,
    rank_methods,
    verdict,
)


def test_paired_difference_interval_and_p_by_hand():
    # differences 3, 4, 1: mean 8/3, sd^2 = ((1/3)^2 + (4/3)^2 + (5/3)^2) / 2 = 7/3
    result = compare_paired([53.0, 56.0, 55.0], [50.0, 52.0, 54.0])
    sd = math.sqrt(7 / 3)
    assert result.n == 3 and result.difference == pytest.approx(8 / 3) and result.sd == pytest.approx(sd)
    half = 4.302652729911275 * sd / math.sqrt(3)  # t(0.975, 2 dof) from the table
    assert (result.low, result.high) == pytest.approx((8 / 3 - half, 8 / 3 + half))
    t = (8 / 3) / (sd / math.sqrt(3))
    assert result.p == pytest.approx(1 - t / math.sqrt(2 + t * t))  # the t CDF for 2 dof in closed form
    assert result.p == pytest.approx(stats.ttest_rel([53, 56, 55], [50, 52, 54]).pvalue)


def test_paired_difference_edge_cases():
    one = compare_paired([0.5], [0.4])
    assert one.n == 1 and one.difference == pytest.approx(0.1) and math.isnan(one.p) and math.isnan(one.mde)
    same = compare_paired([0.5, 0.6], [0.4, 0.5])  # identical differences: no spread
    assert same.p == 0.0 and same.low == pytest.approx(0.1) and same.high == pytest.approx(0.1) and same.mde == 0.0
    assert compare_paired([0.5, 0.6], [0.5, 0.6]).p == 1.0
    with pytest.raises(ValueError, match="one length"):
        compare_paired([1, 2, 3], [1, 2])


def test_holm_by_hand():
    # sorted 0.005, 0.01, 0.03, 0.04 -> x4, x3, x2, x1 = 0.02, 0.03, 0.06, 0.04 -> running max
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    adjusted = holm([0.02, math.nan, 0.04])  # NaN is no test: m = 2
    assert adjusted[0] == pytest.approx(0.04) and math.isnan(adjusted[1]) and adjusted[2] == pytest.approx(0.04)
    assert holm([0.6, 0.7]) == [1.0, 1.0]  # capped at 1
    assert holm([]) == []


def test_power_at_the_mde_is_eighty_percent_by_simulation():
    rng = np.random.default_rng(0)
    n, sd = 5, 2.0
    mde = minimum_detectable_difference(sd, n)
    d = rng.normal(mde, sd, size=(200_000, n))
    t = d.mean(1) / (d.std(1, ddof=1) / math.sqrt(n))
    rejected = np.mean(np.abs(t) > stats.t.ppf(0.975, n - 1))
    assert rejected == pytest.approx(0.8, abs=0.005)
    assert paired_power(mde, sd, n) == pytest.approx(0.8, abs=1e-9)


def test_mde_approaches_the_normal_formula_and_shrinks_with_seeds():
    large = minimum_detectable_difference(1.0, 2000)
    assert large == pytest.approx((stats.norm.ppf(0.975) + stats.norm.ppf(0.8)) / math.sqrt(2000), rel=2e-3)
    values = [minimum_detectable_difference(1.0, n) for n in (2, 3, 5, 10)]
    assert values == sorted(values, reverse=True)
    assert minimum_detectable_difference(2.0, 5) == pytest.approx(2 * minimum_detectable_difference(1.0, 5))


def test_verdicts():
    better = compare_paired([0.6, 0.62, 0.61], [0.5, 0.51, 0.52])
    assert verdict(better, 0.01) == "better"
    assert verdict(compare_paired([0.5, 0.51, 0.52], [0.6, 0.62, 0.61]), 0.01) == "worse"
    assert verdict(better, 0.2) == "no detectable difference"
    assert verdict(compare_paired([0.5], [0.4]), math.nan) == "too few seeds"
    # undetected, and the seeds could not have seen the effect of interest: inconclusive, with the MDE shown
    assert verdict(better, 0.2, mde=0.654, effect_of_interest=0.02, scale=100) == "inconclusive (MDE 65.4)"
    assert verdict(better, 0.2, mde=0.015, effect_of_interest=0.02, scale=100) == "no detectable difference"
    assert verdict(better, 0.01, mde=0.654, effect_of_interest=0.02) == "better"  # detected: the MDE does not matter


def test_holm_levels_by_hand():
    # sorted 0.005 (k = 4: 0.02 < .05, rejected), 0.01 (k = 3: 0.03, rejected), 0.03 (k = 2: 0.06, kept),
    # 0.04 (k stays 2: its own step would be k = 1, 0.04 < .05, but Holm keeps it: holm() gives 0.06)
    assert holm_levels([0.01, 0.04, 0.03, 0.005]) == pytest.approx([1 - 0.05 / 3, 1 - 0.05 / 2, 1 - 0.05 / 2, 1 - 0.05 / 4])
    levels = holm_levels([0.02, math.nan])
    assert levels[0] == pytest.approx(0.95) and math.isnan(levels[1])  # one test: the plain 95% interval
    assert holm_levels([]) == []


def test_holm_level_intervals_exclude_zero_exactly_when_holm_rejects():
    rng = np.random.default_rng(2)
    rejected = kept_after_own_step = 0  # the second: where a level from its own step (no freezing) would disagree
    for _ in range(300):
        m, n = rng.integers(2, 5), rng.integers(3, 6)
        ref = rng.normal(size=n)
        methods = [ref + rng.normal(rng.uniform(1, 3), 1, size=n) for _ in range(m)]
        p = [compare_paired(x, ref).p for x in methods]
        for x, p_x, level, adjusted, rank in zip(methods, p, holm_levels(p), holm(p), stats.rankdata(p, method="ordinal")):
            c = compare_paired(x, ref, level)
            assert (c.low > 0 or c.high < 0) == (adjusted < 0.05)
            rejected += adjusted < 0.05
            kept_after_own_step += adjusted >= 0.05 and (m - rank + 1) * p_x < 0.05
    assert rejected > 300 and kept_after_own_step > 10


def test_nemenyi_critical_difference_matches_demsar():
    # Demšar 2006, Table 5 (q_0.05) and the worked example: k = 4, N = 14 -> CD = 1.25
    for k, q in ((2, 1.960), (3, 2.343), (4, 2.569), (5, 2.728), (10, 3.164)):
        assert critical_difference(k, 6) == pytest.approx(q * math.sqrt(k * (k + 1) / 36), abs=1e-3)
    assert critical_difference(4, 14) == pytest.approx(1.25, abs=0.005)


def test_friedman_matches_scipy_and_ranks_by_hand():
    rng = np.random.default_rng(1)
    values = rng.normal(size=(8, 4)) + np.array([0.0, 0.5, 1.0, 1.5])  # no ties
    scores = {f"b{i}": {m: values[i, j] for j, m in enumerate("abcd")} for i in range(8)}
    ranking = rank_methods(scores)
    expected = stats.friedmanchisquare(*values.T)
    assert ranking.chi2 == pytest.approx(expected.statistic) and ranking.p == pytest.approx(expected.pvalue)
    ranks = np.mean([stats.rankdata(-row) for row in values], axis=0)
    assert ranking.mean_ranks == pytest.approx(list(ranks)) and sum(ranking.mean_ranks) == pytest.approx(10)
    n, k = 8, 4
    assert ranking.iman_davenport_f == pytest.approx((n - 1) * ranking.chi2 / (n * (k - 1) - ranking.chi2))


def test_ranking_ties_share_ranks_and_missing_methods_drop():
    scores = {"p1": {"a": 0.5, "b": 0.5, "c": 0.4, "only-here": 0.9}, "p2": {"a": 0.6, "b": 0.4, "c": 0.3}}
    ranking = rank_methods(scores)
    assert ranking.methods == ["a", "b", "c"] and ranking.mean_ranks == pytest.approx([1.25, 1.75, 3.0])
    with pytest.raises(ValueError, match="two blocks"):
        rank_methods({"p1": {"a": 1.0, "b": 0.0}})


def test_critical_difference_figure_is_written(tmp_path):
    scores = {f"b{i}": {"fixed": 0.5 + i / 100, "csl": 0.52 + i / 100, "supervised": 0.4} for i in range(4)}
    plot_critical_difference(rank_methods(scores), tmp_path / "cd.png")
    assert (tmp_path / "cd.png").read_bytes()[:4] == b"\x89PNG"
