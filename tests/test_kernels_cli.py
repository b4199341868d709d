import json

from bench.cli import main
from bench.selection import available_selectors


def test_kernels_command_prints_and_writes_the_table(tmp_path, capsys):
    out = tmp_path / "k.json"
    main(["kernels", "--shapes", "2x5x16x16", "--budget", "0.01", "--ups-passes", "2", "--device", "cpu", "--json", str(out)])
    printed = capsys.readouterr().out
    assert "| selector" in printed and "x bare" in printed
    data = json.loads(out.read_text())
    rows = {r["kernel"]: r for r in data["timings"]}
    assert set(rows) == {"bare threshold", "csl (per-image SVD loop)", *available_selectors()}
    assert rows["bare threshold"]["ratio_to_bare"] == 1.0
    for r in rows.values():
        assert r["median_ms"] > 0 and r["repeats"] >= 5
        assert abs(r["ratio_to_bare"] - r["median_ms"] / rows["bare threshold"]["median_ms"]) < 1e-9
    assert data["environment"]["threads"] >= 1
