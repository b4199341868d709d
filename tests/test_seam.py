"""The selector seam: the only way a training step reaches its selector."""

import torch

from bench.contract import get_selector
from bench.harness.seam import SelectorSeam


def probs_and_valid(B=2, K=3, H=4, W=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, K, H, W, generator=g) * 3).softmax(1), torch.ones(B, H, W, dtype=torch.bool)


def test_it_counts_the_passes_that_ran_and_hands_over_only_what_is_declared():
    seam = SelectorSeam(get_selector("ups", num_classes=3, passes=3), torch.device("cpu"))
    probs, valid = probs_and_valid()
    asked = []

    def passes(n):
        asked.append(n)
        return torch.log(probs)[None].expand(n, *probs.shape).clone()

    for t in (1, 2):
        seam.begin(t)
        seam(probs, valid, mc_logits=passes, progress=0.5, labeled_probs=lambda: 1 / 0)  # undeclared: never called
    reading = seam.read()
    assert asked == [3, 3] and reading.extra_forward_passes == 6
    assert reading.failures == [] and reading.selector_s > 0


def test_value_checks_wait_for_the_read_and_name_the_iteration():
    seam = SelectorSeam(get_selector("fixed", num_classes=3), torch.device("cpu"))
    probs, valid = probs_and_valid()
    seam.begin(1)
    seam(probs, valid)
    seam.begin(2)
    seam(probs * 2, valid)  # sums to 2: a misuse, recorded but not raised here
    seam.begin(3)
    seam(probs * 2, valid)
    [failure] = seam.read().failures
    assert failure.iteration == 2 and failure.selector == "fixed" and "sum to 1" in failure.message and not failure.diverged


def test_its_state_round_trips_with_the_selector_state():
    seam = SelectorSeam(get_selector("freematch", num_classes=3), torch.device("cpu"))
    probs, valid = probs_and_valid()
    seam.begin(1)
    seam(probs, valid)
    again = SelectorSeam(get_selector("freematch", num_classes=3), torch.device("cpu"))
    again.load_state_dict(seam.state_dict())
    assert again.selector_s == seam.selector_s and again.extra_forward_passes == 0
    other, _ = probs_and_valid(seed=1)
    assert torch.equal(again(other, valid).weight, seam(other, valid).weight)


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and bool(torch.isclose(a, b, rtol=0, atol=0, equal_nan=True).all())
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b


def test_followers_hold_the_states_their_selectors_reach_on_the_stream_and_leave_the_run_alone():
    """A run that banks its teacher keeps every stateful selector without passes in the
    state it would have in training: each follower's state equals a fresh selector's fed
    the same batches directly, the run's selection is unchanged, and the states survive
    a checkpoint (a follower missing from it starts following at the resume)."""
    from bench.contract import available_selectors
    from bench.harness.seam import StateFollowers

    stateful = [n for n in available_selectors() if get_selector(n, num_classes=3).state_dict() and get_selector(n, num_classes=3).mc_passes == 0]
    assert {"flexmatch", "freematch", "softmatch", "daw"} <= set(stateful)
    plain = SelectorSeam(get_selector("fixed", num_classes=3), torch.device("cpu"))
    banked = SelectorSeam(get_selector("fixed", num_classes=3), torch.device("cpu"), StateFollowers(3))
    direct = {n: get_selector(n, num_classes=3) for n in stateful}
    labeled_probs, _ = probs_and_valid(seed=99)
    labeled_target = torch.randint(0, 3, labeled_probs.argmax(1).shape, generator=torch.Generator().manual_seed(5))  # some wrong
    for t in range(1, 5):
        probs, valid = probs_and_valid(seed=t)
        available = {"progress": t / 4, "labeled_probs": labeled_probs, "labeled_target": labeled_target}
        assert torch.equal(plain(probs, valid, **available).weight, banked(probs, valid, **available).weight)
        for n, sel in direct.items():
            sel.select(probs, valid, **{k: v for k, v in available.items() if k in sel.context_keys})
    states = banked.selector_states()
    assert set(states) == set(stateful)
    for n in stateful:
        assert states[n]["since"] == 0 and states[n]["params"] == direct[n].params()
        assert _same(states[n]["state"], direct[n].state_dict()), n
    resumed = SelectorSeam(get_selector("fixed", num_classes=3), torch.device("cpu"), StateFollowers(3))
    resumed.load_state_dict(banked.state_dict(), iteration=4)
    assert all(_same(resumed.selector_states()[n], states[n]) for n in stateful)
    late = SelectorSeam(get_selector("fixed", num_classes=3), torch.device("cpu"), StateFollowers(3))
    late.load_state_dict(plain.state_dict(), iteration=4)  # banking switched on at the resume
    assert {s["since"] for s in late.selector_states().values()} == {4}


def test_a_stateful_run_selector_with_its_defaults_is_its_own_follower():
    from bench.harness.seam import StateFollowers

    seam = SelectorSeam(get_selector("flexmatch", num_classes=3), torch.device("cpu"), StateFollowers(3, skip="flexmatch"))
    assert "flexmatch" not in seam.followers.selectors
    probs, valid = probs_and_valid()
    seam(probs, valid)
    assert _same(seam.selector_states()["flexmatch"]["state"], seam.selector.state_dict())
    tuned = SelectorSeam(get_selector("flexmatch", num_classes=3, tau=0.7), torch.device("cpu"), StateFollowers(3))
    tuned(probs, valid)  # not its defaults: the bank's flexmatch state is the follower's
    assert _same(tuned.selector_states()["flexmatch"]["state"], seam.selector.state_dict())
