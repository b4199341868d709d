"""The selector contract: registry, errors, degenerate input, properties, state."""

import sys
import textwrap

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import bench.selection as selection
from bench.selection import Selection, available_selectors, build_context, get_selector, selector_params

ALL = ["ael", "all", "corrmatch", "covar", "csa", "csl", "cwbass", "daw", "fixed", "flexmatch", "freematch", "s4mc",
       "semivl_avg", "semivl_ratio", "softmatch", "u2pl", "ups"]
STATEFUL = ["softmatch", "freematch", "flexmatch", "daw", "corrmatch", "cwbass", "s4mc", "csa"]


SMALL = {"ups": {"passes": 4}, "csa": {"passes": 4}}  # fewer stochastic passes, to keep the tests quick


def context_for(name, probs, seed=0):
    """The context a selector declares, built as the trainer builds it: everything is
    offered, `build_context` takes what the selector asks for."""
    B, K, H, W = probs.shape
    g = torch.Generator().manual_seed(seed)
    base = torch.log(probs.clamp(min=1e-6))
    available = {
        "mc_logits": lambda passes: base + 0.05 * torch.randn(passes, B, K, H, W, generator=g),
        "labeled_probs": (torch.randn(B, K, H, W, generator=g) * 3).softmax(1),
        "labeled_target": torch.randint(0, K, (B, H, W), generator=g),
        "progress": 0.3,
    }
    return build_context(build(name, K), available)


def build(name, K):
    return get_selector(name, num_classes=K, **SMALL.get(name, {}))


def test_every_selector_is_registered():
    assert available_selectors() == sorted(ALL)


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


@pytest.mark.parametrize("name", ALL)
def test_bad_input_raises_value_error_naming_selector(name):
    K = 3
    sel = build(name, K)
    probs = torch.full((2, K, 4, 4), 1.0 / K)
    valid = torch.ones(2, 4, 4, dtype=torch.bool)
    ctx = context_for(name, probs)
    bad_nan = probs.clone()
    bad_nan[1, 2, 3, 3] = float("nan")
    bad_inf = probs.clone()
    bad_inf[0, 0, 0, 0] = float("inf")
    bad_neginf = probs.clone()
    bad_neginf[0, 1, 2, 0] = float("-inf")
    cases = [
        (bad_nan, valid, "NaN or Inf"),
        (bad_inf, valid, "NaN or Inf"),
        (bad_neginf, valid, "NaN or Inf"),
        (probs[0], valid[0], "rank 4"),
        (probs, valid[:, :3], r"valid must have shape"),
        (probs, valid.float(), "bool"),
        (probs[:, :2] * 1.5, valid, "K=2 classes but the selector was built with num_classes=3"),
        (probs * 3.0, valid, "sum to 1"),
    ]
    for p, v, message in cases:
        with pytest.raises(ValueError, match=rf"selector '{name}'.*{message}"):
            sel.select(p, v, **ctx)
    with pytest.raises(ValueError, match=rf"selector '{name}'.*K >= 2"):
        sel.select(torch.ones(2, 1, 4, 4), valid, **ctx)
    with pytest.raises(ValueError, match=rf"selector '{name}'.*num_classes must be an integer >= 2"):
        get_selector(name, num_classes=1)


def test_unlabeled_ground_truth_cannot_be_passed():
    probs = torch.full((1, 3, 2, 2), 1 / 3)
    valid = torch.ones(1, 2, 2, dtype=torch.bool)
    with pytest.raises(ValueError, match="unknown context.*gt"):
        get_selector("fixed", num_classes=3).select(probs, valid, gt=torch.zeros(1, 2, 2))


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


def check_properties(name, out, probs, valid):
    assert out.weight.dtype == torch.float32 and out.label.dtype == torch.int64
    assert out.reliable.dtype == torch.bool
    assert out.weight.shape == valid.shape == out.label.shape == out.reliable.shape
    assert not torch.isnan(out.weight).any()
    assert ((out.weight >= 0) & (out.weight <= 1)).all()
    assert (out.weight[~valid] == 0).all() and not out.reliable[~valid].any()
    assert (out.weight[out.reliable] > 0).all()
    if name not in ("ups", "csa"):  # UPS and CSA label with the MC mean
        assert torch.equal(out.label, probs.argmax(1))


@pytest.mark.parametrize("name", ALL)
@given(batch=batches())
def test_selection_properties(name, batch):
    probs, valid = batch
    K = probs.shape[1]
    out = build(name, K).select(probs, valid, **context_for(name, probs))
    check_properties(name, out, probs, valid)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("case", ["no_valid", "one_valid", "identical", "uniform", "one_hot"])
@pytest.mark.parametrize("K", [2, 5])
def test_degenerate_input_is_defined(name, case, K):
    B, H, W = 2, 5, 4
    g = torch.Generator().manual_seed(1)
    probs = (torch.randn(B, K, H, W, generator=g) * 2).softmax(1)
    valid = torch.ones(B, H, W, dtype=torch.bool)
    if case == "no_valid":
        valid[0] = False
    elif case == "one_valid":
        valid[:] = False
        valid[1, 2, 3] = True
    elif case == "identical":
        probs[:] = probs[:, :, :1, :1]
    elif case == "uniform":
        probs = torch.full((B, K, H, W), 1.0 / K)
    elif case == "one_hot":
        probs = torch.nn.functional.one_hot(torch.randint(0, K, (B, H, W), generator=g), K).permute(0, 3, 1, 2).float()
    out = build(name, K).select(probs, valid, **context_for(name, probs))
    check_properties(name, out, probs, valid)
    if case == "no_valid":
        assert (out.weight[0] == 0).all()
    if case == "identical" and name in ("csl", "covar"):
        # every valid pixel of an image is the same point: one cluster, all equal weights
        assert (out.weight == out.weight[:, :1, :1]).all()


@pytest.mark.parametrize("name", STATEFUL)
def test_state_round_trip(name, tmp_path):
    K = 4
    g = torch.Generator().manual_seed(0)
    seq = [((torch.randn(2, K, 6, 6, generator=g) * 3).softmax(1), torch.rand(2, 6, 6, generator=g) < 0.9) for _ in range(4)]
    a = build(name, K)
    for probs, valid in seq[:3]:
        a.select(probs, valid, **context_for(name, probs))
    path = tmp_path / "state.pt"
    torch.save(a.state_dict(), path)
    b = build(name, K)
    b.load_state_dict(torch.load(path, weights_only=True))
    probs, valid = seq[3]
    ctx = context_for(name, probs, seed=5)
    out_a, out_b = a.select(probs, valid, **ctx), b.select(probs, valid, **ctx)
    assert torch.equal(out_a.weight, out_b.weight)
    # and the state really changed with the batches seen
    fresh = build(name, K).state_dict()
    changed = any(
        not torch.equal(torch.as_tensor(fresh[k]), torch.as_tensor(v)) for k, v in a.state_dict().items()
    )
    assert changed


def test_load_state_dict_rejects_foreign_state():
    with pytest.raises(ValueError, match="softmatch.*state keys"):
        get_selector("softmatch", num_classes=3).load_state_dict({"tau": torch.tensor(0.5)})
    with pytest.raises(ValueError, match="flexmatch.*shape"):
        get_selector("flexmatch", num_classes=3).load_state_dict(get_selector("flexmatch", num_classes=5).state_dict())


PLUGIN = textwrap.dedent(
    """
    import torch
    from bench.selection import Selector, hard_selection

    class Margin(Selector):
        def __init__(self, num_classes, gap=0.5):
            super().__init__(num_classes)
            self.gap = gap

        def _select(self, probs, valid, moments, **context):
            top2 = probs.topk(2, dim=1).values
            return hard_selection(moments.label, (top2[:, 0] - top2[:, 1]) >= self.gap, valid)
    """
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
    monkeypatch.setattr(selection, "_REGISTRY", {n: selection.selector_class(n) for n in selection.available_selectors()})  # loaded first
    monkeypatch.setattr(selection, "_loaded", False)
    monkeypatch.delitem(sys.modules, module, raising=False)


def test_entry_point_plugin_is_discovered(tmp_path, monkeypatch):
    install_plugin(tmp_path, monkeypatch, "margin_plugin", PLUGIN, "margin = margin_plugin:Margin")
    assert "margin" in available_selectors()
    sel = get_selector("margin", num_classes=3, gap=0.2)
    probs = torch.tensor([[0.6, 0.3, 0.1], [0.4, 0.35, 0.25]]).T.reshape(1, 3, 1, 2)
    out = sel.select(probs, torch.ones(1, 1, 2, dtype=torch.bool))
    assert out.reliable.tolist() == [[[True, False]]]
    with pytest.raises(ValueError, match="margin.*has no parameter 'gapp'"):
        get_selector("margin", num_classes=3, gapp=0.2)


def test_broken_plugin_import_is_raised_not_swallowed(tmp_path, monkeypatch):
    install_plugin(tmp_path, monkeypatch, "broken_plugin", "import does_not_exist_anywhere\n", "broken = broken_plugin:Thing")
    with pytest.raises(ImportError, match="selector plugin 'broken'.*does_not_exist_anywhere"):
        available_selectors()


def test_register_decorator_refuses_a_taken_name():
    class Other(selection.Selector):
        def _select(self, probs, valid, moments, **context):
            raise AssertionError

    with pytest.raises(ValueError, match="'fixed' is already registered"):
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
