"""The table a search prints: samples ranked by the metric the scheduler compared."""

from bench.results.record import RunRecord, write_record
from bench.results.search import search_rows, search_table


def sample(folder, name, lr, alpha, status, iteration, val, error=None):
    curves = [{"iter": 2, "loss": 1.0}] + [{"iter": it, "val_miou": v} for it, v in val]
    record = RunRecord(name=name, status=status, config={"lr": lr, "selector_params": {"alpha": alpha}},
                       iteration=iteration, curves=curves, error=error)
    write_record(folder / name, record)


def test_samples_are_ranked_by_their_last_evaluation_and_stopped_ones_say_where(tmp_path):
    sample(tmp_path, "a", 0.01, 2.0, "complete", 40, [(20, 0.50), (40, 0.30)])  # last, not best, counts
    sample(tmp_path, "b", 0.02, 8.0, "stopped", 20, [(20, 0.40)],
           {"type": "StoppedBySearch", "message": "the search's scheduler stopped this sample at iteration 20", "iteration": 20})
    sample(tmp_path, "c", 0.03, 4.0, "complete", 40, [(20, 0.20), (40, 0.45)])
    sample(tmp_path, "d", 0.04, 1.0, "failed", 3, [],
           {"type": "DivergedError", "message": "loss is nan", "iteration": 3})
    rows = search_rows(tmp_path, ["lr", "selector.alpha"], "val_miou", "max")
    assert [r["run"] for r in rows] == ["c", "b", "a", "d"]
    assert [r["val_miou"] for r in rows] == [0.45, 0.40, 0.30, None]
    assert [r["selector.alpha"] for r in rows] == [4.0, 8.0, 2.0, 1.0]
    assert rows[1]["status"] == "stopped at 20"
    assert rows[3]["status"] == "failed (DivergedError at iteration 3: loss is nan)"
    assert [r["run"] for r in search_rows(tmp_path, ["lr"], "val_miou", "min")] == ["a", "b", "c", "d"]
    table = search_table(tmp_path, ["lr", "selector.alpha"], "val_miou", "max")
    assert table.splitlines()[0] == "| run | lr | selector.alpha | val_miou | status |"
    assert table.splitlines()[2] == "| c | 0.03 | 4 | 0.45 | complete |"
    assert "best by val_miou (max): lr=0.03, selector.alpha=4 (c, complete)" in table
