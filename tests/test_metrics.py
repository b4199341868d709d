"""Both meters against counts worked out by hand."""

import math

import pytest
import torch

from bench.contract.metrics import IoUMeter, SelectionQualityMeter, auroc_from_histograms
from bench.contract import Selection


def sel(label, weight, reliable):
    return Selection(
        label=torch.tensor(label).view(1, 1, -1),
        weight=torch.tensor(weight, dtype=torch.float32).view(1, 1, -1),
        reliable=torch.tensor(reliable).view(1, 1, -1),
    )


def test_iou_meter_by_hand():
    m = IoUMeter(num_classes=3, ignore_index=255)
    # batch 1: gt  0 0 1 1 255 ; pred 0 1 1 1 2
    m.update(torch.tensor([[0, 1, 1, 1, 2]]), torch.tensor([[0, 0, 1, 1, 255]]))
    # batch 2: gt 2 2 0 ; pred 2 0 0
    m.update(torch.tensor([[2, 0, 0]]), torch.tensor([[2, 2, 0]]))
    r = m.compute()
    # class 0: tp 2 (b1 p0, b2 p2), fp 1 (b2 gt2->0), fn 1 (b1 gt0->1) -> 2/4
    # class 1: tp 2, fp 1, fn 0 -> 2/3 ; class 2: tp 1, fp 0, fn 1 -> 1/2
    assert r["per_class_iou"] == pytest.approx([0.5, 2 / 3, 0.5])
    assert r["miou"] == pytest.approx((0.5 + 2 / 3 + 0.5) / 3)
    assert r["pixel_accuracy"] == pytest.approx(5 / 7)
    assert r["pixels"] == 7


def test_iou_meter_absent_class_is_nan_and_skipped():
    m = IoUMeter(num_classes=4)
    m.update(torch.tensor([0, 1, 1]), torch.tensor([0, 1, 0]))
    r = m.compute()
    assert math.isnan(r["per_class_iou"][2]) and math.isnan(r["per_class_iou"][3])
    assert r["miou"] == pytest.approx((0.5 + 0.5) / 2)


def test_selection_meter_by_hand():
    m = SelectionQualityMeter(num_classes=3, auroc_bins=11)
    # gt:      0    0    1    1    2    2    255
    # label:   0    1    1    1    2    0    0
    # correct: T    F    T    T    T    F    -
    # reliable T    T    T    F    T    F    T
    # weight   1    1    1   .5    1   .2    1
    m.update(
        sel([0, 1, 1, 1, 2, 0, 0], [1, 1, 1, 0.5, 1, 0.2, 1], [True, True, True, False, True, False, True]),
        torch.tensor([0, 0, 1, 1, 2, 2, 255]).view(1, 1, -1),
    )
    r = m.compute()
    assert r["pixels"] == 6
    assert r["coverage"] == pytest.approx(4 / 6)
    assert r["precision"] == pytest.approx(3 / 4)
    assert r["recall"] == pytest.approx(3 / 4)
    assert r["f1"] == pytest.approx(0.75)
    assert r["weighted_precision"] == pytest.approx((1 + 1 + 0.5 + 1) / (1 + 1 + 1 + 0.5 + 1 + 0.2))
    assert r["label_accuracy"] == pytest.approx(4 / 6)
    assert r["per_class_coverage"] == pytest.approx([1.0, 0.5, 0.5])
    # AUROC: positives w = {1, 1, .5, 1}, negatives w = {1, .2}.
    # pairs: each w=1 positive vs neg 1 -> 0.5, vs .2 -> 1 ; w=.5 vs 1 -> 0, vs .2 -> 1
    assert r["auroc"] == pytest.approx((3 * 1.5 + 1) / 8)
    # pseudo-label IoU over selected pixels: gt0: (0->0),(0->1); gt1: (1->1); gt2: (2->2)
    # class0 1/2, class1 1/2, class2 1/1
    assert r["pseudo_miou"] == pytest.approx((0.5 + 0.5 + 1.0) / 3)


def test_selection_meter_sums_before_dividing():
    m = SelectionQualityMeter(num_classes=2)
    m.update(sel([0], [1], [True]), torch.tensor([1]).view(1, 1, 1))  # 1 selected, wrong
    m.update(sel([0, 0, 0], [1, 1, 1], [True] * 3), torch.tensor([0, 0, 0]).view(1, 1, 3))  # 3 right
    assert m.compute()["precision"] == pytest.approx(3 / 4)  # not mean(0, 1) = 0.5


def test_selection_meter_empty_is_nan_not_an_error():
    m = SelectionQualityMeter(num_classes=2)
    m.update(sel([0, 1], [0, 0], [False, False]), torch.tensor([0, 1]).view(1, 1, 2))
    r = m.compute()
    assert math.isnan(r["precision"]) and r["coverage"] == 0 and r["recall"] == 0


def test_auroc_against_pairwise_count():
    g = torch.Generator().manual_seed(0)
    pos = torch.randint(0, 50, (200,), generator=g)
    neg = torch.randint(0, 50, (150,), generator=g)
    pairwise = ((pos[:, None] > neg[None]).double() + 0.5 * (pos[:, None] == neg[None]).double()).mean()
    hist = lambda x: torch.bincount(x, minlength=50)  # noqa: E731
    assert auroc_from_histograms(hist(pos), hist(neg)) == pytest.approx(float(pairwise))


def test_since_equals_a_fresh_meter_over_the_later_batches():
    a = SelectionQualityMeter(num_classes=3, auroc_bins=11)
    b = SelectionQualityMeter(num_classes=3, auroc_bins=11)
    gt = torch.tensor([0, 0, 1, 1, 2, 2]).view(1, 1, -1)
    a.update(sel([0, 1, 1, 1, 2, 0], [1, 1, 1, 0.5, 1, 0.2], [True, True, True, False, True, False]), gt)
    snapshot = a.state_dict()
    later = sel([0, 0, 2, 1, 2, 2], [1, 0.3, 1, 1, 0, 1], [True, False, True, True, False, True])
    a.update(later, gt)
    b.update(later, gt)
    assert a.since(snapshot) == b.compute()
