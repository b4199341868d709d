"""Leaderboard tables from hand-written records against hand-computed values."""

import math

import pytest

from bench.harness.config import TrainConfig
from bench.results.leaderboard import build_tables, leaderboard, left_out, load_rows, paired_p_value
from bench.results.record import RunRecord, write_record
from bench.results.statistics import minimum_detectable_difference


def write(root, name, miou, seed, status="complete", sel=(0.9, 0.6, 0.5), splits=None, config_hash=None, **cfg):
    config = TrainConfig(**{"seed": seed, **cfg}).validate().to_dict()
    (root / name).mkdir(parents=True)
    write_record(root / name, RunRecord(
        name=name,
        status=status,
        config=config,
        config_hash=config_hash,
        splits=splits,
        error={"type": "RuntimeError", "message": "boom", "iteration": 3} if status == "failed" else None,
        final={"miou": miou, "miou_best_val": miou + 0.01} if status == "complete" else None,
        selection=dict(zip(("precision", "recall", "coverage"), sel)) if cfg.get("framework") != "supervised" else None,
        cost={"wall_s": 100.0 + seed, "selector_ms_per_iter": 2.0, "extra_forward_passes": 0},
    ))


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


def _t_two_dof(level):
    """The t quantile of a two-sided `level` interval with 2 dof, inverting that CDF:
    u = t / sqrt(2 + t^2) -> t = u sqrt(2 / (1 - u^2)); 4.3027 at 95%, 6.2053 at 97.5%."""
    return level * math.sqrt(2 / (1 - level * level))


def rows_of(text):
    return {line.split(" | ")[0].lstrip("| "): line.split(" | ") for line in text.splitlines() if line.startswith("| ")}


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
    # intervals at Holm's step: supervised judged first (k = 2: 97.5%), csl second (k = 1: 95%)
    sup_half = _t_two_dof(0.975) / math.sqrt(3)
    assert f"| supervised | 41.0 ± 1.0 (3) | -11.0 [{-11 - sup_half:+.1f}, {-11 + sup_half:+.1f}] at 97.5% (3 pairs) | {holm_sup:.3f} |" in text
    assert f"| **54.7 ± 1.5 (3)** | +2.7 [{8 / 3 - half:+.1f}, {8 / 3 + half:+.1f}] at 95% (3 pairs) | {holm_csl:.3f} |" in text
    row = rows_of(text)
    # MDE: the difference the 3 seeds detect with 80% power, from the observed spread (simulated check
    # of the power calculation in test_statistics), at alpha / 2 for the table's two comparisons
    mde = 100 * minimum_detectable_difference(sd / 100, 3, alpha=0.025)
    assert row["csl"][4] == f"{mde:.1f}" and mde > 2
    assert minimum_detectable_difference(sd / 100, 3, alpha=0.025) > minimum_detectable_difference(sd / 100, 3)
    # undetected with an MDE above the 2-point effect of interest: inconclusive, not "no difference"
    assert row["supervised"][5] == "worse" and row["csl"][5] == f"inconclusive (MDE {mde:.1f})"
    assert rows_of(leaderboard(runs, effect_of_interest=math.ceil(mde)))["csl"][5] == "no detectable difference"
    # the other columns: best-val = miou + 1 point, wall s = 100 + seed -> 101 on average;
    # csl recall 70, 71, 72 -> 71.0; bold marks the best per column (higher precision and
    # recall; coverage is not ranked)
    assert "| fixed | 52.0 ± 2.0 (3) | – | – | – | – | 53.0 | **90.0** | 60.0 | 50.0 | **101** | **2.00** | **0** |" in text
    assert "| **55.7** | 80.0 | **71.0** | 60.0 | **101** |" in text
    assert "p (Holm): two-sided paired t-test" in text  # the legend
    # failed and running runs are listed, not dropped
    assert "csl-broken: failed (RuntimeError at iteration 3: boom)" in text and "csl-live: running" in text


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
    # seeds 0 and 1 only: 3 and 4 points; the means (3 seeds) are not over the pairs: 54.5 vs 51.0 are
    assert "| +3.5 [" in text and "at 95% (2 pairs: 54.5 vs 51.0) |" in text
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
    assert "- no fixed run in 2.0: nothing is compared" in text  # said, not left to guess from the dashes
    with pytest.raises(KeyError, match="not a config key"):
        leaderboard(tmp_path, by="nonsense")


@pytest.mark.parametrize("fmt,marker", [("csv", "method,column"), ("latex", r"\begin{tabular}"), ("html", "<table>")])
def test_other_formats(runs, fmt, marker):
    out = leaderboard(runs, fmt=fmt)
    assert marker in out
    if fmt == "csv":
        import csv
        import io

        records = list(csv.DictReader(io.StringIO(out)))
        rows = {r["method"]: r for r in records}
        assert float(rows["fixed"]["mean"]) == pytest.approx(0.52) and float(rows["fixed"]["std"]) == pytest.approx(0.02)
        assert float(rows["csl"]["p"]) == pytest.approx(0.0942, abs=1e-4) and rows["csl"]["n"] == "3"
        assert float(rows["csl"]["difference"]) == pytest.approx(0.08 / 3) and rows["csl"]["verdict"].startswith("inconclusive (MDE ")
        assert float(rows["csl"]["ci_level"]) == pytest.approx(0.95) and float(rows["supervised"]["ci_level"]) == pytest.approx(0.975)
        assert float(rows["csl"]["paired_mean"]) == pytest.approx(0.08 / 3 + 0.52)
        assert float(rows["csl"]["reference_paired_mean"]) == pytest.approx(0.52)
        listed = {r["run"].rsplit("/", 1)[-1]: r["status"] for r in records if not r["method"]}
        assert listed == {"csl-broken": "failed", "csl-live": "running"}  # what is not in the tables, too
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


def test_every_complete_record_is_in_a_table_or_listed_with_why(tmp_path):
    """A sweep folder: trials continuing from per-seed warm starts, a warm start still without
    trials, one found only by its hash, and a supervised run of a budget no table has."""
    sweep = tmp_path / "sweep"
    for seed in range(2):
        for method, miou, cfg in (("fixed", 0.50, {"selector": "fixed"}), ("csl", 0.52, {"selector": "csl"}), ("sup", 0.40, {"framework": "supervised"})):
            write(sweep / "trials", f"{method}-{seed}", miou + seed / 100, seed, init_from_hash=f"h{seed}", **cfg)
    # warm starts: supervised at the trials' budget (so they would be a second supervised run of seed 0
    # and 1 in the table) or at their own (so they would vanish); one is found by its folder only
    write(sweep / "warmup", "warmup-seed=0", 0.45, 0, config_hash="h0", framework="supervised")
    write(sweep / "warmup", "warmup-seed=2", 0.45, 2, config_hash="h2", framework="supervised", iters=600)
    write(sweep / "pretrain", "seed-1", 0.46, 1, config_hash="h1", framework="supervised")
    write(sweep / "other", "sup-123", 0.40, 0, framework="supervised", iters=123)
    (sweep / "torn").mkdir()
    (sweep / "torn" / "record.json").write_text('{"status": "comp')  # unreadable: it continues from nothing
    text = leaderboard(sweep)
    assert [r[0] for r in build_tables(load_rows(sweep)[0])[0].rows] == ["supervised", "fixed", "csl"]
    assert "| supervised | 40.5 ± 0.7 (2) |" in text  # the two trials, no warm start among its seeds
    warm = "complete (warm start: a stage other runs continue from, not a method)"
    stray = "complete (supervised, and no semi-supervised table has dataset=synthetic, protocol=synthetic, backbone=resnet10t, budget=123, eval_split=val)"
    listed = text.split("Not in the tables, with why:\n")[1].splitlines()
    assert listed[0].startswith(f"- {sweep}/torn: unreadable (")
    assert listed[1:] == [f"- {sweep}/other/sup-123: {stray}", f"- {sweep}/pretrain/seed-1: {warm}", f"- {sweep}/warmup/warmup-seed=0: {warm}", f"- {sweep}/warmup/warmup-seed=2: {warm}"]
    # 10 complete records: 6 in the table, 4 listed
    frame, _ = load_rows(sweep)
    tables = build_tables(frame)
    assert frame.height == 10 and len(tables[0].runs) == 6 and left_out(frame, tables).height == 4
    # a folder of warm starts alone: no table, every record listed
    alone = leaderboard(sweep / "warmup")
    assert alone.startswith("no tables: no complete runs to compare") and alone.count(warm) == 2


def test_mean_and_delta_over_other_seeds_show_the_paired_means(tmp_path):
    # fixed: seeds 0-2 (50, 52, 54); csl: seeds 0-3 (53, 56, 55, 60), seed 3 has no fixed run
    for seed, miou in enumerate([0.50, 0.52, 0.54]):
        write(tmp_path, f"fixed-{seed}", miou, seed, selector="fixed")
    for seed, miou in enumerate([0.53, 0.56, 0.55, 0.60]):
        write(tmp_path, f"csl-{seed}", miou, seed, selector="csl")
    text = leaderboard(tmp_path)
    # the row mean is over 4 seeds (56.0), the Δ over 3 pairs: 54.7 vs 52.0 -> +2.7; both shown
    half = _t_two_dof(0.95) * math.sqrt(7 / 3) / math.sqrt(3)
    assert f"| **56.0 ± 2.9 (4)** | +2.7 [{8 / 3 - half:+.1f}, {8 / 3 + half:+.1f}] at 95% (3 pairs: 54.7 vs 52.0) |" in text
    assert "- csl vs fixed: not paired: seed 3 (no fixed run)" in text
    assert "the mean and Δ cover different seeds and the cell adds both paired means" in text  # the note


def test_the_interval_excludes_zero_exactly_when_holm_says_better_or_worse(tmp_path):
    # a - fixed: 2, 3, 4 points (t = 3 sqrt 3, p = .035); b - fixed: 1.9, 3, 4.1 (t = 3 sqrt 3 / 1.1, p = .042).
    # Holm: 2 x .035 = .070 keeps a, and so b. Unadjusted, a's 95% interval 3 +- 4.303 / sqrt 3 = [+0.5, +5.5]
    # excludes 0 beside "no difference"; at Holm's step (k = 2 for both: 97.5%) it is 3 +- 6.205 / sqrt 3.
    for seed, (f, da, db) in enumerate([(0.50, 0.02, 0.019), (0.52, 0.03, 0.03), (0.54, 0.04, 0.041)]):
        write(tmp_path, f"fixed-{seed}", f, seed, selector="fixed")
        write(tmp_path, f"a-{seed}", f + da, seed, selector="csl")
        write(tmp_path, f"b-{seed}", f + db, seed, selector="csl", selector_params={"alpha": 2.0})
    p_a, p_b = _p_two_dof(3 * math.sqrt(3)), _p_two_dof(3 * math.sqrt(3) / 1.1)
    assert 0.025 < p_a < p_b < 0.05  # each below 0.05 alone; b even below 0.05 / 1, Holm's k after a rejection
    row = rows_of(leaderboard(tmp_path))
    t = _t_two_dof(0.975)
    assert row["csl"][2] == f"+3.0 [{3 - t / math.sqrt(3):+.1f}, {3 + t / math.sqrt(3):+.1f}] at 97.5% (3 pairs)" == "+3.0 [-0.6, +6.6] at 97.5% (3 pairs)"
    assert row["csl (alpha=2.0)"][2] == f"+3.0 [{3 - 1.1 * t / math.sqrt(3):+.1f}, {3 + 1.1 * t / math.sqrt(3):+.1f}] at 97.5% (3 pairs)"
    assert row["csl"][3] == row["csl (alpha=2.0)"][3] == f"{2 * p_a:.3f}" and row["csl"][5].startswith("inconclusive")


def test_two_pairs_with_a_large_mde_are_inconclusive(tmp_path):
    # csl - fixed: 0 and 8 points: mean 4, sd 8 / sqrt 2, t = 4 / (sd / sqrt 2) = 1; 1 dof (Cauchy):
    # p = 1 - (2 / pi) atan(1) = 0.5, and one comparison: the 95% interval, t(.975) = tan(0.475 pi) = 12.706
    for seed, (f, c) in enumerate([(0.50, 0.50), (0.52, 0.60)]):
        write(tmp_path, f"fixed-{seed}", f, seed, selector="fixed")
        write(tmp_path, f"csl-{seed}", c, seed, selector="csl")
    half = math.tan(0.475 * math.pi) * 4
    mde = 100 * minimum_detectable_difference(0.08 / math.sqrt(2), 2)
    assert 60 < mde < 70  # a 65-point MDE from two pairs: nothing of interest is ruled out
    row = rows_of(leaderboard(tmp_path))["csl"]
    assert row[2:6] == [f"+4.0 [{4 - half:+.1f}, {4 + half:+.1f}] at 95% (2 pairs)", "0.500", f"{mde:.1f}", f"inconclusive (MDE {mde:.1f})"]
    assert rows_of(leaderboard(tmp_path, effect_of_interest=70))["csl"][5] == "no detectable difference"
