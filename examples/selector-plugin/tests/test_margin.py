"""The margin selector: a hand-computed case, and cslbench's contract checks (the same ones
`cslbench check-selector margin` runs)."""

import pytest
import torch

from bench.contract import available_selectors, get_selector
from bench.tools.check_selector import CHECKS


def test_margin_is_registered_through_its_entry_point():
    assert "margin" in available_selectors()


def test_margin_keeps_pixels_whose_top_two_differ_by_at_least_gap():
    # one 2x2 image, K = 3; every probability is exact in binary, so is every margin
    pixels = [
        [0.75, 0.25, 0.0],  # margin 0.5: kept (the bound is inclusive)
        [0.5, 0.375, 0.125],  # margin 0.125: not kept
        [0.125, 0.125, 0.75],  # margin 0.625: kept, label 2
        [1.0, 0.0, 0.0],  # margin 1: would be kept, but the pixel is not valid
    ]
    probs = torch.tensor(pixels).T.reshape(1, 3, 2, 2)
    valid = torch.tensor([[[True, True], [True, False]]])
    out = get_selector("margin", num_classes=3, gap=0.5).select(probs, valid)
    assert out.label.tolist() == [[[0, 0], [2, 0]]]
    assert out.reliable.tolist() == [[[True, False], [True, False]]]
    assert out.weight.tolist() == [[[1.0, 0.0], [1.0, 0.0]]]
    # gap 0 keeps every valid pixel, gap 1 only the certain ones
    assert get_selector("margin", num_classes=3, gap=0.0).select(probs, valid).reliable.tolist() == [[[True, True], [True, False]]]
    assert get_selector("margin", num_classes=3, gap=1.0).select(probs, valid).reliable.sum() == 0


def test_a_gap_outside_0_1_is_refused():
    with pytest.raises(ValueError, match="selector 'margin': gap must lie in"):
        get_selector("margin", num_classes=3, gap=1.5)


@pytest.mark.parametrize("check", list(CHECKS))
def test_margin_meets_the_selector_contract(check):
    CHECKS[check]("margin")
