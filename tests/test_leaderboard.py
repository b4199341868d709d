"""Leaderboard tables from hand-written records against hand-computed values."""

import json
import math

import pytest

from bench.config import TrainConfig
from bench.leaderboard import leaderboard, load_rows, build_tables, paired_p_value


def write(root, name, miou, seed, status="complete", sel=(0.9, 0.6, 0.5), splits=None, **cfg):
    config = TrainConfig(**{"seed": seed, **cfg}).validate().to_dict()
    record = {
        "splits": splits,
        "status": status,
        "error": "boom" if status == "failed" else None,
        "config": config,
        "final": {"miou": miou, "miou_best_val": miou + 0.01} if status == "complete" else None,
        "selection": dict(zip(("precision", "recall", "coverage"), sel)) if cfg.get("framework") != "supervised" else None,
        "cost": {"wall_s": 100.0 + seed, "selector_ms_per_iter": 2.0, "extra_forward_passes": 0},
    }
    (root / name).mkdir(parents=True)
    (root / name / "record.json").write_text(json.dumps(record))


@pytest.fixture
def runs(tmp_path):
    for seed, (f, c, s) in enumerate([(0.50, 0.53, 0.40), (0.52, 0.56, 0.41), (0.54, 0.55, 0.42)]):
        write(tmp_path, f"fixed-{seed}", f, seed, selector="fixed")
        write(tmp_path, f"csl-{seed}", c, seed, selector="csl", sel=(0.8, 0.7 + seed / 100, 0.6))
        write(tmp_path, f"sup-{seed}", s, seed, framework="supervised")
    write(tmp_path, "csl-broken", None, 7, status="failed", selector="csl")
    write(tmp_path, "csl-live", None, 8, status="running", selector="csl")
    return tmp_path


def _p_two_dof(t):
    """Two-sided p of a t statistic with 2 dof: the t CDF is 1/2 + t / (2 sqrt(2 + t^2))."""
    return 1 - abs(t) / math.sqrt(2 + t * t)


def test_means_differences_holm_and_verdicts_by_hand(runs):
    text = leaderboard(runs)
    # fixed: 50, 52, 54 -> 52.0 ± 2.0 ; csl: 53, 56, 55 -> 54.7 ± 1.5 ; supervised 41.0 ± 1.0
    assert "| fixed | 52.0 ± 2.0 (3) | – | – | – | – |" in text
    # csl - fixed per seed: 3, 4, 1 points: mean 2.67, sd sqrt(7/3), 95% interval +- t(.975, 2) sd / sqrt(3)
    sd = math.sqrt(7 / 3)
    half = 4.302652729911275 * sd / math.sqrt(3)
    p_csl = _p_two_dof((8 / 3) / (sd / math.sqrt(3)))
    assert p_csl == pytest.approx(0.0942, abs=1e-4)
    # supervised - fixed: -10, -11, -12: mean -11, sd 1
    p_sup = _p_two_dof(-11 / (1 / math.sqrt(3)))
    # Holm over the two comparisons: the smaller p doubled, the larger kept (and at least that)
    holm_sup, holm_csl = 2 * p_sup, max(p_csl, 2 * p_sup)
    assert f"| supervised | 41.0 ± 1.0 (3) | -11.0 [{-11 - 4.3027 / math.sqrt(3):+.1f}, {-11 + 4.3027 / math.sqrt(3):+.1f}] (3) | {holm_sup:.3f} |" in text
    assert f"| **54.7 ± 1.5 (3)** | +2.7 [{8 / 3 - half:+.1f}, {8 / 3 + half:+.1f}] (3) | {holm_csl:.3f} |" in text
    row = {line.split(" | ")[0].lstrip("| "): line.split(" | ") for line in text.splitlines() if line.startswith("| ")}
    assert row["supervised"][5] == "worse" and row["csl"][5] == "no detectable difference"
    # MDE: the difference the 3 seeds detect with 80% power, from the observed spread (simulated check
    # of the power calculation in test_statistics), at alpha / 2 for the table's two comparisons
    from bench.statistics import minimum_detectable_difference

    assert row["csl"][4] == f"{100 * minimum_detectable_difference(sd / 100, 3, alpha=0.025):.1f}"
    assert minimum_detectable_difference(sd / 100, 3, alpha=0.025) > minimum_detectable_difference(sd / 100, 3)
    # the other columns: best-val = miou + 1 point, wall s = 100 + seed -> 101 on average;
    # csl recall 70, 71, 72 -> 71.0; bold marks the best per column (higher precision and
    # recall; coverage is not ranked)
    assert "| fixed | 52.0 ± 2.0 (3) | – | – | – | – | 53.0 | **90.0** | 60.0 | 50.0 | **101** | **2.00** | **0** |" in text
    assert "| **55.7** | 80.0 | **71.0** | 60.0 | **101** |" in text
    assert "p (Holm): two-sided paired t-test" in text  # the legend
    # failed and running runs are listed, not dropped
    assert "csl-broken: failed (boom)" in text and "csl-live: running" in text


def test_another_reference_method(runs):
    text = leaderboard(runs, reference="supervised")
    assert "Δ vs supervised" in text and "| supervised | 41.0 ± 1.0 (3) | – | – | – | – |" in text
    assert "| fixed | 52.0 ± 2.0 (3) | +11.0" in text


def test_seeds_pair_only_with_the_same_split_and_warm_start(tmp_path):
    for seed, (f, c) in enumerate([(0.50, 0.53), (0.52, 0.56), (0.54, 0.55)]):
        split = {"sha256": {"labeled.txt": "a", "unlabeled.txt": "b", "generator": "synthetic v2"}}
        write(tmp_path, f"fixed-{seed}", f, seed, selector="fixed", splits=split, init_from_hash="w")
        clash = {"sha256": {**split["sha256"], "generator": "synthetic v1"}} if seed == 2 else split
        write(tmp_path, f"csl-{seed}", c, seed, selector="csl", splits=clash, init_from_hash="w")
    text = leaderboard(tmp_path)
    assert "| +3.5 [" in text and "(2) |" in text  # seeds 0 and 1 only: 3 and 4 points
    assert "csl vs fixed: not paired: seed 2 (labelled split differs)" in text


def test_paired_p_value_needs_two_matched_seeds():
    assert math.isnan(paired_p_value({0: 0.5}, {0: 0.4})[0])
    assert paired_p_value({0: 0.5, 1: 0.6, 5: 0.9}, {0: 0.5, 1: 0.6, 2: 0.1}) == (1.0, 2)


def test_ranks_across_splits_and_the_figure(tmp_path):
    # three splits; csl best in all, fixed second, supervised last -> mean ranks 1, 2, 3
    for labeled in (10, 20, 40):
        for seed in range(2):
            write(tmp_path, f"f{labeled}-{seed}", 0.50 + seed / 100, seed, selector="fixed", labeled=labeled)
            write(tmp_path, f"c{labeled}-{seed}", 0.55 + seed / 100, seed, selector="csl", labeled=labeled)
            write(tmp_path, f"s{labeled}-{seed}", 0.40 + seed / 100, seed, framework="supervised", labeled=labeled)
    text = leaderboard(tmp_path, figure=tmp_path / "cd.png")
    assert "| csl | 1.00 |\n| fixed | 2.00 |\n| supervised | 3.00 |" in text
    # Friedman with N = 3 blocks, k = 3: chi2 = 12 N / (k (k+1)) (sum R^2 - k (k+1)^2 / 4) = 3 (14 - 12) = 6
    assert "Friedman χ² = 6.00" in text and "critical difference 1.91" in text  # 2.343 sqrt(12 / 18)
    assert (tmp_path / "cd.png").exists()
    with pytest.raises(ValueError, match="two or more protocols"):
        leaderboard(tmp_path / "f10-0", figure=tmp_path / "none.png")


def test_supervised_runs_join_the_semi_supervised_table(runs):
    frame, others = load_rows(runs)
    tables = build_tables(frame)
    assert len(tables) == 1 and [r[0] for r in tables[0].rows] == ["supervised", "fixed", "csl"]
    assert others.height == 2


def test_by_pivots_a_config_key(tmp_path):
    for seed in range(2):
        for alpha, miou in ((2.0, 0.5 + seed / 100), (8.0, 0.6 + seed / 100)):
            write(tmp_path, f"a{alpha}-{seed}", miou, seed, selector="csl", selector_params={"alpha": alpha})
    text = leaderboard(tmp_path, by="selector.alpha")
    assert "mIoU 2.0" in text and "mIoU 8.0" in text
    assert "| csl | 50.5 ± 0.7 (2) | 60.5 ± 0.7 (2) |" in text  # one method: nothing to bold
    with pytest.raises(KeyError, match="not a config key"):
        leaderboard(tmp_path, by="nonsense")


@pytest.mark.parametrize("fmt,marker", [("csv", "method,column"), ("latex", r"\begin{tabular}"), ("html", "<table>")])
def test_other_formats(runs, fmt, marker):
    out = leaderboard(runs, fmt=fmt)
    assert marker in out
    if fmt == "csv":
        import csv
        import io

        rows = {r["method"]: r for r in csv.DictReader(io.StringIO(out))}
        assert float(rows["fixed"]["mean"]) == pytest.approx(0.52) and float(rows["fixed"]["std"]) == pytest.approx(0.02)
        assert float(rows["csl"]["p"]) == pytest.approx(0.0942, abs=1e-4) and rows["csl"]["n"] == "3"
        assert float(rows["csl"]["difference"]) == pytest.approx(0.08 / 3) and rows["csl"]["verdict"] == "no detectable difference"
        assert float(rows["csl"]["recall"]) == pytest.approx(0.71) and rows["supervised"]["precision"] == ""


def test_by_budget_gives_one_table_and_the_difference_figure(tmp_path):
    for iters, gain in ((100, 0.01), (300, 0.05)):
        for seed in range(3):
            write(tmp_path, f"f{iters}-{seed}", 0.40 + gain + seed / 100 + (seed == 1) / 200, seed, selector="fixed", iters=iters)
            write(tmp_path, f"s{iters}-{seed}", 0.40 + seed / 100, seed, framework="supervised", iters=iters)
    text = leaderboard(tmp_path, by="iters", reference="supervised", differences=tmp_path / "gain.png")
    assert text.count("### dataset=") == 1 and "val mIoU 100" in text and "val mIoU 300" in text
    # fixed - supervised per seed: gain, gain + 0.5, gain points -> mean gain + 1/6 point
    assert "| fixed |" in text and "+1.2 [" in text and "+5.2 [" in text
    assert (tmp_path / "gain.png").read_bytes()[:4] == b"\x89PNG"


def test_two_runs_of_one_seed_in_a_cell_are_an_error_not_two_seeds(tmp_path):
    for seed in range(2):
        write(tmp_path / "a", f"fixed-{seed}", 0.5, seed, selector="fixed")
        write(tmp_path / "b", f"fixed-{seed}", 0.4, seed, selector="fixed", lr=0.02)  # another recipe, same label
    with pytest.raises(ValueError, match="2 .method, seed. cells hold more than one run.*--by KEY"):
        leaderboard(tmp_path)
    assert "mIoU 0.01" in leaderboard(tmp_path, by="lr") and "mIoU 0.02" in leaderboard(tmp_path, by="lr")


def test_a_cold_start_does_not_pair_with_a_warm_start(tmp_path):
    for seed in range(3):
        write(tmp_path, f"fixed-{seed}", 0.5 + seed / 100, seed, selector="fixed", init_from_hash=f"w{seed}")
        write(tmp_path, f"sup-{seed}", 0.4, seed, framework="supervised")  # from scratch: init_from_hash None
    text = leaderboard(tmp_path)
    assert "supervised vs fixed: not paired: seed 0 (warm start differs)" in text and "too few seeds" in text
