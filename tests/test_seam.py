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
