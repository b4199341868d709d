import math

import pytest
import torch

from bench.harness.losses import PseudoTargets, negative_learning_loss, pseudo_label_loss


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
    a = PseudoTargets(torch.zeros(1, 2, 2, dtype=torch.long), torch.ones(1, 2, 2), torch.ones(1, 2, 2, dtype=torch.bool), torch.zeros(1, 3, 2, 2, dtype=torch.bool),
                      torch.ones(1, 2, 2, dtype=torch.bool))
    b = PseudoTargets(torch.full((1, 2, 2), 2), torch.full((1, 2, 2), 0.5), torch.zeros(1, 2, 2, dtype=torch.bool), torch.ones(1, 3, 2, 2, dtype=torch.bool),
                      torch.zeros(1, 2, 2, dtype=torch.bool))
    box = torch.tensor([[[True, False], [False, False]]])
    m = a.paste(b, box)
    assert m.label.tolist() == [[[2, 0], [0, 0]]]
    assert m.weight.tolist() == [[[0.5, 1.0], [1.0, 1.0]]]
    assert m.valid.tolist() == [[[False, True], [True, True]]]
    assert m.negatives[0, :, 0, 0].all() and not m.negatives[0, :, 1, 1].any()
    assert m.reliable.tolist() == [[[False, True], [True, True]]]
    assert [t.reliable.shape for t in PseudoTargets.split(m, [1])] == [(1, 2, 2)]


def test_logit_penalty_by_hand():
    from bench.harness.losses import logit_penalty

    # pixel a: z = (20, 5, 12), label 0 -> gaps (0, 20-5-10 = 5, 20-12-10 < 0 -> 0): 5
    # pixel b: z = (1, 3, 0), label 1 -> every gap below the margin: 0
    logits = torch.tensor([[20.0, 1.0], [5.0, 3.0], [12.0, 0.0]]).view(1, 3, 1, 2)
    label = torch.tensor([[[0, 1]]])
    ones = torch.ones(1, 1, 2, dtype=torch.bool)
    target = PseudoTargets(label, torch.ones(1, 1, 2), ones, None, ones)
    assert logit_penalty(logits, target, 10.0).item() == pytest.approx(5 / (2 * 3))
    only_a = PseudoTargets(label, torch.ones(1, 1, 2), ones, None, torch.tensor([[[True, False]]]))
    assert logit_penalty(logits, only_a, 10.0).item() == pytest.approx(5 / 3)
    disagree = PseudoTargets(torch.tensor([[[2, 1]]]), torch.ones(1, 1, 2), ones, None, ones)  # a's argmax is 0, not 2
    assert logit_penalty(logits, disagree, 10.0).item() == 0.0
    assert logit_penalty(logits, target, 4.0).item() == pytest.approx((11 + 4) / 6)  # margin 4: 20-5-4 + 20-12-4
    nothing = PseudoTargets(label, torch.zeros(1, 1, 2), ones, None, torch.zeros(1, 1, 2, dtype=torch.bool))
    assert logit_penalty(logits, nothing).item() == 0.0  # S empty: 0, not NaN


def test_logit_penalty_trains_and_is_checked(tmp_path):
    from bench.harness.config import ConfigError, TrainConfig, apply
    from bench.harness.launch import train

    tiny = dict(backbone="test_resnet", crop=32, batch_size=2, iters=2, eval_every=2, log_every=1, checkpoint_every=2,
                probe_images=2, head_channels=16, aspp_dilations=[1, 2], wandb_mode="disabled", selector="fixed", selector_params={"tau": 0.0})
    cfg = apply(TrainConfig(), {**tiny, "logit_penalty": 0.1, "logit_penalty_margin": 0.0, "strong_bn_stats": False, "out": str(tmp_path / "pen")}, "test").validate()
    record = train(cfg, show_progress=False)
    pens = [p["loss_pen"] for p in record.curves if "loss_pen" in p]
    assert len(pens) == 2 and all(v > 0 for v in pens)  # margin 0: every non-top logit counts
    with pytest.raises(ConfigError, match="logit_penalty needs a semi-supervised framework"):
        apply(TrainConfig(), {**tiny, "framework": "supervised", "logit_penalty": 0.1}, "test").validate()
