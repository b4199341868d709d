import json
import types

import pytest
import torch

from bench.tools import kernels
from bench.orchestration.cli import main
from bench.contract import available_selectors


def test_kernels_command_prints_and_writes_the_table(tmp_path, capsys):
    out = tmp_path / "k.json"
    main(["kernels", "--shapes", "2x5x16x16", "--budget", "0.01", "--param", "ups.passes=2", "--threads", "1", "--device", "cpu", "--json", str(out)])
    printed = capsys.readouterr().out
    assert "| selector" in printed and "x bare" in printed
    header = [c.strip() for c in printed[printed.index("| selector") :].splitlines()[0].strip("|").split("|")]
    assert header[-6:] == ["passes", "ms/pass", "x bare/pass", "iters", "ms/iter", "x bare/iter"]
    data = json.loads(out.read_text())
    rows = {r["kernel"]: r for r in data["timings"]}
    one_iteration = "csa (sinkhorn_iters=1)"  # CSA again with 1 Sinkhorn iteration, in the same rounds
    assert set(rows) == {kernels.BARE, kernels.NAIVE, kernels.READ, kernels.SVD_LOOP, one_iteration, *available_selectors()}
    assert kernels.BARE == "bare threshold (amax)"  # every "x bare" divides by the amax threshold (issue 21)
    assert len({r["repeats"] for r in rows.values()}) == 1  # round-robin: every kernel as often
    # stochastic passes: ups given 2 (--param), csa its default 10; per pass = per call / passes
    for name, passes in (("ups", 2), ("csa", 10), (one_iteration, 10)):
        r = rows[name]
        assert r["passes"] == passes
        assert r["ms_per_pass"] == pytest.approx(r["median_ms"] / passes)
        assert r["ratio_per_pass"] == pytest.approx(r["ratio_to_bare"] / passes)
    csa, bare = rows["csa"], rows[kernels.BARE]
    assert csa["iterations"] == 100 and rows[one_iteration]["iterations"] == 1
    assert csa["ms_per_iteration"] == pytest.approx((csa["median_ms"] - rows[one_iteration]["median_ms"]) / 99)
    assert csa["ratio_per_iteration"] == pytest.approx(csa["ms_per_iteration"] / bare["median_ms"])
    for name in set(rows) - {"ups", "csa", one_iteration}:
        assert rows[name]["passes"] == 0 and rows[name]["ms_per_pass"] is None and rows[name]["ms_per_iteration"] is None
    for r in rows.values():  # units: 2*16*16 pixels, 2*5*16*16 float32 values read per call
        assert r["mpixel_per_s"] * r["median_ms"] * 1e3 == pytest.approx(512)
        assert r["gb_per_s"] * r["median_ms"] * 1e6 == pytest.approx(2 * 5 * 16 * 16 * 4)
    assert data["environment"]["threads"] == 1


def test_bad_selector_parameter_is_named(capsys):
    with pytest.raises(SystemExit, match="ups.*no parameter 'pases'.*did you mean 'passes'"):
        main(["kernels", "--shapes", "2x5x16x16", "--param", "ups.pases=2", "--device", "cpu"])


class FakeClock:
    """perf_counter that only moves when a fake kernel runs."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self):
        return self.now


def test_medians_and_ratios_against_a_fake_clock(monkeypatch):
    """Kernels that take 1 ms (bare), 8 ms (the naive threshold), 0.5 ms (one read) and 3 ms /
    1.5 ms with one 100 ms outlier: the table must give the medians and their ratios to the
    bare threshold, whatever the outlier."""
    clock = FakeClock()
    monkeypatch.setattr(kernels, "time", types.SimpleNamespace(perf_counter=clock.perf_counter))
    monkeypatch.setattr(kernels, "bare_threshold", lambda probs, valid: setattr(clock, "now", clock.now + 1e-3))
    monkeypatch.setattr(kernels, "naive_threshold", lambda probs, valid: setattr(clock, "now", clock.now + 8e-3))
    monkeypatch.setattr(kernels, "one_read", lambda probs: setattr(clock, "now", clock.now + 0.5e-3))
    calls = {"slow": 0}

    class Fake:
        mc_passes, context_keys = 0, ()

        def __init__(self, ms):
            self.ms = ms

        def params(self):
            return {}

        def select(self, probs, valid):
            calls["slow"] += self.ms == 3
            outlier = self.ms == 3 and calls["slow"] == 3
            clock.now += (100 if outlier else self.ms) * 1e-3

    monkeypatch.setattr(kernels, "get_selector", lambda name, num_classes: Fake({"a": 3, "b": 1.5}[name]))
    rows = {r.kernel: r for r in kernels.time_kernels([(1, 2, 4, 4)], selectors=["a", "b"], min_repeats=7, budget_s=0.0, include_svd_loop=False)}
    assert rows[kernels.BARE].median_ms == pytest.approx(1.0)
    assert rows["a"].median_ms == pytest.approx(3.0) and rows["a"].ratio_to_bare == pytest.approx(3.0)
    assert rows["b"].ratio_to_bare == pytest.approx(1.5) and rows["b"].ratio_to_read == pytest.approx(3.0)
    assert rows["a"].ratio_to_read == pytest.approx(6.0)
    assert rows[kernels.NAIVE].ratio_to_bare == pytest.approx(8.0)
    assert {r.repeats for r in rows.values()} == {7}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_svd_loop_reference_computes_what_csl_computes(seed):
    """The speed table compares CSL with the per-image SVD loop: only meaningful if both
    give the same weights (generic inputs: no ties, no rank-1 images)."""
    from bench.contract import get_selector

    probs, valid = kernels.synthetic_inputs((3, 5, 16, 16), "cpu", seed=seed)
    expected = get_selector("csl", num_classes=5).select(probs, valid).weight
    assert torch.allclose(kernels.svd_loop_csl(probs, valid), expected, atol=1e-4)


def test_per_pass_and_per_iteration_against_a_fake_clock(monkeypatch):
    """A selector given 4 stochastic passes that takes 8 ms (bare: 1 ms) is 2 ms and 2x per
    pass; one with `solver_iters=50` taking 1 + 0.2 ms per iteration is timed again with
    solver_iters=1: (11 - 1.2) / 49 = 0.2 ms per iteration, 0.2x the bare threshold."""
    clock = FakeClock()
    monkeypatch.setattr(kernels, "time", types.SimpleNamespace(perf_counter=clock.perf_counter))
    monkeypatch.setattr(kernels, "bare_threshold", lambda probs, valid: setattr(clock, "now", clock.now + 1e-3))
    monkeypatch.setattr(kernels, "naive_threshold", lambda probs, valid: setattr(clock, "now", clock.now + 8e-3))
    monkeypatch.setattr(kernels, "one_read", lambda probs: setattr(clock, "now", clock.now + 0.5e-3))

    class Fake:
        context_keys = ()

        def __init__(self, name, solver_iters=50):
            self.name, self.iters = name, solver_iters
            self.mc_passes = 4 if name == "mc" else 0

        def params(self):
            return {"solver_iters": self.iters} if self.name == "it" else {}

        def select(self, probs, valid):
            clock.now += (8.0 if self.name == "mc" else 1.0 + 0.2 * self.iters) * 1e-3

    monkeypatch.setattr(kernels, "get_selector", lambda name, num_classes, **kw: Fake(name, **kw))
    rows = {r.kernel: r for r in kernels.time_kernels([(1, 2, 4, 4)], selectors=["mc", "it"], min_repeats=3, budget_s=0.0, include_svd_loop=False)}
    assert set(rows) == {kernels.BARE, kernels.NAIVE, kernels.READ, "mc", "it", "it (solver_iters=1)"}
    mc, it, once = rows["mc"], rows["it"], rows["it (solver_iters=1)"]
    assert mc.passes == 4 and mc.ms_per_pass == pytest.approx(2.0) and mc.ratio_per_pass == pytest.approx(mc.ratio_to_bare / 4) == pytest.approx(2.0)
    assert it.passes == 0 and it.ms_per_pass is None and it.ratio_per_pass is None
    assert it.median_ms == pytest.approx(11.0) and once.median_ms == pytest.approx(1.2)
    assert it.iterations == 50 and it.ms_per_iteration == pytest.approx(0.2) and it.ratio_per_iteration == pytest.approx(0.2)
    assert once.iterations == 1 and once.ms_per_iteration is None
    assert mc.iterations is None and mc.ms_per_iteration is None
    table = kernels.format_table(list(rows.values()))
    assert "x bare/pass" in table and "x bare/iter" in table
