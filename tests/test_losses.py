import math

import pytest
import torch

from bench.losses import PseudoTargets, negative_learning_loss, pseudo_label_loss


def test_pseudo_label_loss_normalisers_by_hand():
    # two pixels, K = 2; logits chosen so that CE is log(1 + e^-2) and log(1 + e^2)
    logits = torch.tensor([[2.0, -2.0], [0.0, 0.0], [5.0, 1.0]]).T.reshape(1, 2, 1, 3)
    logits = logits - logits.mean(1, keepdim=True)
    label = torch.tensor([[[0, 1, 1]]])
    weight = torch.tensor([[[1.0, 0.5, 0.0]]])
    valid = torch.tensor([[[True, True, False]]])
    ce = [math.log(1 + math.exp(-4.0)), math.log(2.0)]
    target = PseudoTargets(label, weight, valid)
    assert pseudo_label_loss(logits, target, "valid").item() == pytest.approx((ce[0] + 0.5 * ce[1]) / 2, rel=1e-5)
    assert pseudo_label_loss(logits, target, "selected").item() == pytest.approx((ce[0] + 0.5 * ce[1]) / 1.5, rel=1e-5)


def test_nothing_selected_gives_zero_loss_not_nan():
    target = PseudoTargets(torch.zeros(1, 2, 2, dtype=torch.long), torch.zeros(1, 2, 2), torch.ones(1, 2, 2, dtype=torch.bool))
    for normaliser in ("valid", "selected"):
        assert pseudo_label_loss(torch.randn(1, 3, 2, 2), target, normaliser).item() == 0.0


def test_negative_learning_loss_by_hand():
    logits = torch.log(torch.tensor([0.7, 0.2, 0.1])).view(1, 3, 1, 1)
    negatives = torch.tensor([False, True, True]).view(1, 3, 1, 1)
    expected = -(math.log(0.8) + math.log(0.9)) / 2
    assert negative_learning_loss(logits, negatives).item() == pytest.approx(expected, rel=1e-5)


def test_cutmix_paste_moves_every_field_together():
    a = PseudoTargets(torch.zeros(1, 2, 2, dtype=torch.long), torch.ones(1, 2, 2), torch.ones(1, 2, 2, dtype=torch.bool), torch.zeros(1, 3, 2, 2, dtype=torch.bool))
    b = PseudoTargets(torch.full((1, 2, 2), 2), torch.full((1, 2, 2), 0.5), torch.zeros(1, 2, 2, dtype=torch.bool), torch.ones(1, 3, 2, 2, dtype=torch.bool))
    box = torch.tensor([[[True, False], [False, False]]])
    m = a.paste(b, box)
    assert m.label.tolist() == [[[2, 0], [0, 0]]]
    assert m.weight.tolist() == [[[0.5, 1.0], [1.0, 1.0]]]
    assert m.valid.tolist() == [[[False, True], [True, True]]]
    assert m.negatives[0, :, 0, 0].all() and not m.negatives[0, :, 1, 1].any()
