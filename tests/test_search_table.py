"""The table a search prints: its samples ranked per trial of the grid."""

from bench.results.record import RunRecord, write_record
from bench.results.search import search_rows, search_table


def sample(folder, name, lr, alpha, status, iteration, val, error=None):
    curves = [{"iter": 2, "loss": 1.0}] + [{"iter": it, "val_miou": v} for it, v in val]
    record = RunRecord(name=name, status=status, config={"lr": lr, "selector_params": {"alpha": alpha}},
                       iteration=iteration, curves=curves, error=error)
    write_record(folder / name, record)


def test_samples_are_ranked_by_how_far_they_went_then_their_last_evaluation_per_trial(tmp_path):
    sample(tmp_path, "csl-seed=0-aaaa", 0.01, 2.0, "complete", 40, [(20, 0.50), (40, 0.30)])  # last, not best, counts
    sample(tmp_path, "csl-seed=0-bbbb", 0.02, 8.0, "stopped", 20, [(20, 0.40)],  # above 0.30, but pruned at a rung
           {"type": "StoppedBySearch", "message": "the search's scheduler stopped this sample at iteration 20", "iteration": 20})
    sample(tmp_path, "csl-seed=0-cccc", 0.03, 4.0, "complete", 40, [(20, 0.20), (40, 0.45)])
    sample(tmp_path, "csl-seed=0-dddd", 0.04, 1.0, "failed", 3, [],
           {"type": "DivergedError", "message": "loss is nan", "iteration": 3})
    sample(tmp_path, "csl-seed=1-eeee", 0.05, 1.0, "complete", 40, [(40, 0.10)])  # another trial of the grid
    rows = search_rows(tmp_path, ["lr", "selector.alpha"], "val_miou", "max")
    assert [r["run"][-4:] for r in rows] == ["cccc", "aaaa", "bbbb", "dddd", "eeee"]
    assert [r["trial"] for r in rows] == ["csl-seed=0"] * 4 + ["csl-seed=1"]
    assert [r["val_miou"] for r in rows] == [0.45, 0.30, 0.40, None, 0.10]
    assert [r["selector.alpha"] for r in rows] == [4.0, 2.0, 8.0, 1.0, 1.0]
    assert rows[2]["status"] == "stopped at 20"
    assert rows[3]["status"] == "failed (DivergedError at iteration 3: loss is nan)"
    assert [r["run"][-4:] for r in search_rows(tmp_path, ["lr"], "val_miou", "min")] == ["aaaa", "cccc", "bbbb", "dddd", "eeee"]
    table = search_table(tmp_path, ["lr", "selector.alpha"], "val_miou", "max").splitlines()
    assert table[0] == "| run | lr | selector.alpha | val_miou | status |"
    assert table[2] == "| csl-seed=0-cccc | 0.03 | 4 | 0.45 | complete |"
    assert table[5] == "| csl-seed=0-dddd | 0.04 | 1 | – | failed (DivergedError at iteration 3: loss is nan) |"
    assert table[-3:-1] == ["csl-seed=0: best by val_miou (max) lr=0.03, selector.alpha=4 (csl-seed=0-cccc, complete)",
                            "csl-seed=1: best by val_miou (max) lr=0.05, selector.alpha=1 (csl-seed=1-eeee, complete)"]
