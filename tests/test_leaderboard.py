"""Leaderboard tables from hand-written records against hand-computed values."""

import json
import math

import pytest

from bench.config import TrainConfig
from bench.leaderboard import leaderboard, load_rows, build_tables, paired_p_value


def write(root, name, miou, seed, status="complete", sel=(0.9, 0.6, 0.5), **cfg):
    config = TrainConfig(**{"seed": seed, **cfg}).validate().to_dict()
    record = {
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


def test_means_stds_and_paired_p_by_hand(runs):
    text = leaderboard(runs)
    # fixed: 50, 52, 54 -> 52.0 ± 2.0 ; csl: 53, 56, 55 -> 54.7 ± 1.5 ; supervised 41.0 ± 1.0
    assert "| fixed | 52.0 ± 2.0 (3) | – |" in text
    assert "| supervised | 41.0 ± 1.0 (3) |" in text
    # paired t over seeds: d = (3, 4, 1) points; t = 3.0237 with 2 dof; for 2 dof the
    # t CDF is 1/2 + t / (2 sqrt(2 + t^2)), so p = 1 - t / sqrt(2 + t^2) = 0.0942
    t = (0.02 + 2 / 300) / (math.sqrt(((0.03 - 0.08 / 3) ** 2 + (0.04 - 0.08 / 3) ** 2 + (0.01 - 0.08 / 3) ** 2) / 2) / math.sqrt(3))
    p = 1 - t / math.sqrt(2 + t * t)
    assert p == pytest.approx(0.0942, abs=1e-4)
    assert f"| **54.7 ± 1.5 (3)** | {p:.3f} (3) |" in text
    # the other columns: best-val = miou + 1 point, wall s = 100 + seed -> 101 on average;
    # csl recall 70, 71, 72 -> 71.0; bold marks the best per column (higher precision and
    # recall; coverage is not ranked)
    assert "| fixed | 52.0 ± 2.0 (3) | – | 53.0 | **90.0** | 60.0 | 50.0 | **101** | **2.00** | **0** |" in text
    assert "| **55.7** | 80.0 | **71.0** | 60.0 | **101** |" in text
    # failed and running runs are listed, not dropped
    assert "csl-broken: failed (boom)" in text and "csl-live: running" in text


def test_paired_p_value_needs_two_matched_seeds():
    assert math.isnan(paired_p_value({0: 0.5}, {0: 0.4})[0])
    assert paired_p_value({0: 0.5, 1: 0.6, 5: 0.9}, {0: 0.5, 1: 0.6, 2: 0.1}) == (1.0, 2)


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
        assert float(rows["csl"]["p_vs_fixed"]) == pytest.approx(0.0942, abs=1e-4) and rows["csl"]["n"] == "3"
        assert float(rows["csl"]["recall"]) == pytest.approx(0.71) and rows["supervised"]["precision"] == ""
