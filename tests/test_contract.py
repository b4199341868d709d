"""The selector contract: registry, errors, degenerate input, properties, state, host
reads, speed. Every per-selector check is in bench/tools/check_selector.py (also run by
`cslbench check-selector`); here it runs for every registered selector (`--selector NAME`
restricts it), on plugins, and the tests that are not per selector."""

import sys
import textwrap

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import bench.contract as selection
from bench.contract import Selection, available_selectors, build_context, get_selector, selector_params
from bench.tools import check_selector as contract

# precision: tests/test_precision.py; properties: below, with hypothesis drawing the batches
CHECKED_HERE = [c for c in contract.CHECKS if c not in ("precision", "properties")]


@pytest.mark.every_selector("name")
@pytest.mark.parametrize("check", CHECKED_HERE)
def test_contract(name, check):
    contract.CHECKS[check](name)


def test_every_built_in_selector_is_declared_and_registered():
    """Built-in selectors come in through cslbench's own entry points, as plugins do."""
    import tomllib
    from pathlib import Path

    declared = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]["entry-points"]["cslbench.selectors"]
    assert set(available_selectors()) >= set(declared)  # and any installed plugin's
    for name, target in declared.items():
        cls = selection.selector_class(name)
        assert f"{cls.__module__}:{cls.__qualname__}" == target and cls.name == name


def test_unknown_selector_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown selector 'cls'.*did you mean 'csl'.*fixed"):
        get_selector("cls", num_classes=3)


def test_unknown_parameter_names_the_valid_ones():
    with pytest.raises(ValueError, match=r"selector 'csl' has no parameter 'alpah'.*'alpha'.*features"):
        get_selector("csl", num_classes=3, alpah=2.0)


def test_bad_parameter_values_are_named():
    with pytest.raises(ValueError, match="csl.*features.*'cv'"):
        get_selector("csl", num_classes=3, features="xy")
    with pytest.raises(ValueError, match="fixed.*tau"):
        get_selector("fixed", num_classes=3, tau=1.5)
    with pytest.raises(ValueError, match="csl.*neglog"):
        get_selector("csl", num_classes=3, features="logc_neg_gv", pick="neglog")


def test_parameters_are_discoverable():
    params = selector_params("csl")
    assert params["alpha"] == 2.0 and params["features"] == "cv" and params["variance"] == "author"
    assert selector_params("covar")["features"] == "cgv" and selector_params("covar")["pick"] == "linear"
    assert selector_params("fixed") == {"tau": 0.95}


@st.composite
def batches(draw):
    B = draw(st.integers(1, 3))
    K = draw(st.integers(2, 6))
    H = draw(st.integers(1, 7))
    W = draw(st.integers(1, 7))
    seed = draw(st.integers(0, 2**16))
    scale = draw(st.sampled_from([0.0, 0.5, 3.0, 12.0]))
    p_valid = draw(st.sampled_from([0.0, 0.3, 1.0]))
    g = torch.Generator().manual_seed(seed)
    probs = (torch.randn(B, K, H, W, generator=g) * scale).softmax(1)
    valid = torch.rand(B, H, W, generator=g) < p_valid
    return probs, valid


@pytest.mark.every_selector("name")
@given(batch=batches())
def test_selection_properties(name, batch):
    contract.check_properties(name, [batch])


@pytest.mark.parametrize("name", ["csl", "covar"])
@pytest.mark.parametrize("K", [2, 5])
def test_identical_pixels_are_one_cluster(name, K):
    """Every valid pixel of an image is the same point: one cluster, all equal weights."""
    probs, valid = contract.degenerate_batch("identical", K)
    out = get_selector(name, num_classes=K).select(probs, valid)
    assert (out.weight == out.weight[:, :1, :1]).all()


def test_load_state_dict_rejects_foreign_state():
    with pytest.raises(ValueError, match="softmatch.*state keys"):
        get_selector("softmatch", num_classes=3).load_state_dict({"tau": torch.tensor(0.5)})
    with pytest.raises(ValueError, match="flexmatch.*shape"):
        get_selector("flexmatch", num_classes=3).load_state_dict(get_selector("flexmatch", num_classes=5).state_dict())


PLUGIN = textwrap.dedent(
    '''
    import torch
    from bench.contract import Selector, hard_selection

    class Margin(Selector):
        """Keep pixels whose top-1 minus top-2 probability is at least `gap`."""

        def __init__(self, num_classes, gap=0.5):
            super().__init__(num_classes)
            self.gap = gap

        def _select(self, probs, valid, moments, **context):
            top2 = probs.topk(2, dim=1).values
            return hard_selection(moments.label, (top2[:, 0] - top2[:, 1]) >= self.gap, valid)
    '''
)
# Broken on purpose: weight 1 at every pixel, valid or not.
LEAKY = textwrap.dedent(
    '''
    import torch
    from bench.contract import Selection, Selector

    class Leaky(Selector):
        """Weight 1 everywhere, ignoring valid."""

        def _select(self, probs, valid, moments, **context):
            return Selection(label=moments.label, weight=torch.ones_like(moments.confidence), reliable=valid.clone())
    '''
)
# Broken on purpose: reads its threshold on the host (a GPU sync in every training step).
SYNCING = textwrap.dedent(
    '''
    from bench.contract import Selector, hard_selection

    class MeanThreshold(Selector):
        """Keep pixels above the batch's mean confidence."""

        def _select(self, probs, valid, moments, **context):
            tau = float(moments.confidence.mean())
            return hard_selection(moments.label, moments.confidence >= tau, valid)
    '''
)


def install_plugin(tmp_path, monkeypatch, module, source, entry):
    """A package on sys.path that declares `entry` in the cslbench.selectors group, and a
    registry that will look for it afresh (restored after the test)."""
    (tmp_path / f"{module}.py").write_text(source)
    dist = tmp_path / f"{module}-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {module}\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(f"[cslbench.selectors]\n{entry}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, module, raising=False)


# The plugins here are named plugin_*: examples/selector-plugin may be installed as `margin`.
def test_entry_point_plugin_is_discovered(tmp_path, monkeypatch, scoped_registry):
    install_plugin(tmp_path, monkeypatch, "margin_plugin", PLUGIN, "plugin_margin = margin_plugin:Margin")
    assert "plugin_margin" in available_selectors()
    sel = get_selector("plugin_margin", num_classes=3, gap=0.2)
    probs = torch.tensor([[0.6, 0.3, 0.1], [0.4, 0.35, 0.25]]).T.reshape(1, 3, 1, 2)
    out = sel.select(probs, torch.ones(1, 1, 2, dtype=torch.bool))
    assert out.reliable.tolist() == [[[True, False]]]
    with pytest.raises(ValueError, match="plugin_margin.*has no parameter 'gapp'"):
        get_selector("plugin_margin", num_classes=3, gapp=0.2)


def test_a_plugin_passes_every_contract_check(tmp_path, monkeypatch, scoped_registry):
    install_plugin(tmp_path, monkeypatch, "margin_plugin", PLUGIN, "plugin_margin = margin_plugin:Margin")
    results = contract.run_checks("plugin_margin")
    assert [r.check for r in results] == list(contract.CHECKS)
    assert all(r.passed for r in results), "\n".join(map(str, results))


def test_a_broken_plugin_fails_naming_the_selector_and_the_check(tmp_path, monkeypatch, scoped_registry):
    install_plugin(tmp_path, monkeypatch, "leaky_plugin", LEAKY, "plugin_leaky = leaky_plugin:Leaky")
    with pytest.raises(AssertionError, match=r"^selector 'plugin_leaky' failed check 'degenerate': no_valid_in_one_image \(shape 2x2x5x4\): "
                       r"weight is nonzero outside valid at 20 of 20 invalid pixels \(largest 1\); it must be exactly 0 where valid is False$"):
        contract.check_degenerate("plugin_leaky")
    results = {r.check: r for r in contract.run_checks("plugin_leaky")}
    assert {c for c, r in results.items() if not r.passed} == {"degenerate", "properties"}
    assert "weight is nonzero outside valid" in results["properties"].detail


def test_a_host_read_in_select_fails_the_host_reads_check(tmp_path, monkeypatch, scoped_registry):
    install_plugin(tmp_path, monkeypatch, "syncing_plugin", SYNCING, "plugin_syncing = syncing_plugin:MeanThreshold")
    with pytest.raises(AssertionError, match=r"selector 'plugin_syncing' failed check 'host_reads': call 1 of select.*"
                       r"__float__ reads a tensor on the host.*syncing_plugin.py:8 \(tau = float\(moments.confidence.mean\(\)\)\)"):
        contract.check_host_reads("plugin_syncing")
    contract.check_degenerate("plugin_syncing")  # the host read is its only fault


class _NoDefault(selection.Selector):
    """A parameter without a default."""

    def __init__(self, num_classes, gap):
        super().__init__(num_classes)
        self.gap = gap

    def _select(self, probs, valid, moments, **context):
        return selection.hard_selection(moments.label, valid, valid)


class _Unchecked(selection.Selector):
    """Skips the base class's validation."""

    def select(self, probs, valid, **context):
        return selection.hard_selection(probs.argmax(1), valid, valid)


class _HiddenState(selection.Selector):
    """Counts its calls without declaring the count in state_dict."""

    calls = 0

    def _select(self, probs, valid, moments, **context):
        self.calls += 1
        return selection.hard_selection(moments.label, moments.confidence >= 1.0 / (1 + self.calls), valid)


class _PickledState(selection.Selector):
    """Keeps a Python object in its state, which torch.load(weights_only=True) refuses."""

    def __init__(self, num_classes):
        super().__init__(num_classes)
        self.seen = _Seen()

    def _select(self, probs, valid, moments, **context):
        self.seen.batches += 1
        return selection.hard_selection(moments.label, valid, valid)

    def state_dict(self):
        return {"seen": self.seen}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.seen = state["seen"]


class _Seen:
    batches = 0


class _PerPixelLoop(selection.Selector):
    """Thresholds one pixel at a time in Python."""

    def _select(self, probs, valid, moments, **context):
        keep = torch.zeros_like(valid)
        for index in range(keep.numel()):
            keep.view(-1)[index] = moments.confidence.view(-1)[index] >= 0.95
        return selection.hard_selection(moments.label, keep, valid)


@pytest.mark.parametrize(
    "cls, check, reason",
    [
        (_NoDefault, "registry", r"parameters \['gap'\] have no default"),
        (_Unchecked, "errors", "probs containing NaN: accepted without an error"),
        (_HiddenState, "properties", "empty state_dict selected differently the second time"),
        (_PickledState, "state", r"does not load with torch.load\(weights_only=True\)"),
        (_PerPixelLoop, "speed", r"\d+x fixed .* above the limit"),
    ],
    ids=lambda v: v if isinstance(v, str) and " " not in v else None,
)
def test_each_check_catches_its_fault(scoped_registry, cls, check, reason):
    selection.register_selector("faulty")(cls)
    with pytest.raises(contract.ContractError, match=rf"^selector 'faulty' failed check '{check}': .*{reason}"):
        contract.CHECKS[check]("faulty")


@pytest.mark.parametrize(
    "call",
    [
        lambda x: x.sum().item(), lambda x: bool((x > 0).any()), lambda x: float(x.max()), lambda x: x[x > 0.5],
        lambda x: x.nonzero(), lambda x: torch.where(x > 0.5), lambda x: torch.equal(x, x), lambda x: x.tolist(),
        lambda x: torch.bincount((x * 3).long().flatten(), minlength=3), lambda x: x.cpu(),
        lambda x: x.flatten().repeat_interleave(torch.tensor([1, 2, 1, 2])), lambda x: torch.masked_select(x, x > 0),
    ],
    ids=["item", "bool", "float", "bool-index", "nonzero", "where-1-arg", "equal", "tolist", "bincount", "cpu", "tensor-repeats", "masked_select"],
)
def test_the_contract_guard_catches_every_kind_of_host_read(call):
    with pytest.raises(contract.HostReadError, match="reads a tensor on the host"):
        with contract.no_host_reads():
            call(torch.rand(2, 2))


def test_the_contract_guard_lets_device_side_work_pass():
    x = torch.rand(2, 3, 4)
    with contract.no_host_reads():
        y = torch.where(x > 0.5, x, 0.0).sum(1).softmax(-1)
        y = y[:, torch.tensor([0, 1])].repeat_interleave(2, dim=1)
        torch.zeros(5, dtype=torch.int64).index_add_(0, (x * 4).long().flatten(), torch.ones((), dtype=torch.int64).expand(24))
    assert y.shape == (2, 4)


def test_check_selector_command(tmp_path, monkeypatch, scoped_registry, capsys):
    from bench.orchestration.cli import main

    install_plugin(tmp_path, monkeypatch, "margin_plugin", PLUGIN, "plugin_margin = margin_plugin:Margin")
    install_plugin(tmp_path, monkeypatch, "leaky_plugin", LEAKY, "plugin_leaky = leaky_plugin:Leaky")
    main(["check-selector", "plugin_margin"])
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[:3] for line in lines[:-1]] == [["plugin_margin", check, "PASS"] for check in contract.CHECKS]
    assert "x fixed" in lines[-2] and lines[-1] == "8 of 8 checks passed"
    with pytest.raises(SystemExit) as exit:
        main(["check-selector", "plugin_leaky", "plugin_margin"])
    assert exit.value.code == 1
    out = capsys.readouterr().out
    assert "plugin_leaky   degenerate  FAIL  no_valid_in_one_image (shape 2x2x5x4): weight is nonzero outside valid" in out
    assert out.splitlines()[-1] == "14 of 16 checks passed; failed: plugin_leaky degenerate, plugin_leaky properties"
    with pytest.raises(SystemExit, match="unknown selector 'plugin_margn'.*did you mean 'plugin_margin'"):
        main(["check-selector", "plugin_margn"])


def test_broken_plugin_import_is_raised_not_swallowed(tmp_path, monkeypatch, scoped_registry):
    install_plugin(tmp_path, monkeypatch, "broken_plugin", "import does_not_exist_anywhere\n", "broken = broken_plugin:Thing")
    with pytest.raises(ImportError, match="selector 'broken'.*broken_plugin.*failed to import.*does_not_exist_anywhere"):
        available_selectors()


def test_register_decorator_refuses_a_taken_name():
    class Other(selection.Selector):
        def _select(self, probs, valid, moments, **context):
            raise AssertionError

    with pytest.raises(selection.RegistryError, match="'fixed' is claimed twice.*methods.fixed:FixedThreshold"):
        selection.register_selector("fixed")(Other)


def test_selection_is_a_plain_result():
    out = get_selector("fixed", num_classes=2).select(torch.full((1, 2, 1, 1), 0.5), torch.ones(1, 1, 1, dtype=torch.bool))
    assert isinstance(out, Selection) and out.negatives is None


def test_build_context_takes_only_what_a_selector_declares():
    asked = []

    class Wants(selection.Selector):
        context_keys = ("mc_logits", "progress")
        mc_passes = 3

    class Declares(selection.Selector):
        context_keys = ("labeled_probs",)

    available = {
        "mc_logits": lambda passes: asked.append(passes) or "passes",
        "labeled_probs": lambda: asked.append("labeled") or "probs",
        "progress": 0.5,
    }
    assert build_context(Wants(3), available) == {"mc_logits": "passes", "progress": 0.5}
    assert asked == [3]  # nothing computed that was not asked for
    assert build_context(Declares(3), available) == {"labeled_probs": "probs"} and asked == [3, "labeled"]
    assert build_context(Declares(3), {}) == {}  # missing: left to required_context to name
    Declares.context_keys = ("gt",)
    with pytest.raises(ValueError, match="declares unknown context 'gt'"):
        build_context(Declares(3), available)
