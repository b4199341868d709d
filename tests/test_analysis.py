import numpy as np
import pytest

import bench.contract as selection
from bench.harness import analysis
from bench.results import scoring
from bench.results.predictions import Predictions
from bench.results.scoring import precision_at_count, score_predictions
from bench.tools.probability_field import prediction_field


def test_precision_at_count_matches_sorting():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, scoring.BINS, size=500)
    correct = rng.random(500) < scores / scoring.BINS
    all_h = np.bincount(scores, minlength=scoring.BINS)[None].astype(float)
    cor_h = np.bincount(scores[correct], minlength=scoring.BINS)[None].astype(float)
    order = np.argsort(-scores, kind="stable")
    for k in (1, 37, 250, 500):
        top = scores[order][:k]
        # exact when the k-th score is not tied across the cut; otherwise the pro-rata share
        cut = top[-1]
        above = scores > cut
        tied = scores == cut
        expected = (correct[above].sum() + (k - above.sum()) * correct[tied].mean()) / k
        assert precision_at_count(all_h, cor_h, np.array([k]))[0] == pytest.approx(expected)


def field_predictions(n=6, k=5):
    probs, gts, mcs = [], [], []
    for i in range(n):
        f, mc = prediction_field(batch=1, num_classes=k, size=32, seed=i, mc_passes=3)
        probs.append(f.probs[0])
        gts.append(f.gt[0])
        mcs.append(mc[:, 0])
    lab, _ = prediction_field(batch=2, num_classes=k, size=32, seed=99)
    return Predictions(probs, gts, mcs, (lab.probs, lab.gt), k)


def test_a_fixed_threshold_gains_nothing_over_the_matched_threshold():
    rows = {r["name"]: r for r in score_predictions(field_predictions(), ["fixed", "all"], bootstrap=200)}
    fixed = rows["fixed"]
    # fixed IS a global max-confidence threshold: same pixels, same precision
    assert abs(fixed["precision_gain"]) < 0.005
    assert rows["all"]["coverage"] == pytest.approx(1.0) and abs(rows["all"]["precision_gain"]) < 1e-9
    for score in ("max confidence", "margin (top-1 - top-2)", "1 - normalised entropy"):
        assert 0.5 < rows[score]["auroc"] < 1


class LeastConfident(selection.Selector):
    """Keeps the least confident 30% of pixels: worse than any threshold of equal size."""

    def _select(self, probs, valid, moments, **context):
        c = moments.confidence
        return selection.hard_selection(moments.label, c <= c.flatten().quantile(0.3), valid)


class NextClass(selection.Selector):
    """Keeps every pixel, labelled with the class after the argmax."""

    def _select(self, probs, valid, moments, **context):
        return selection.hard_selection((moments.label + 1) % self.num_classes, valid, valid)


@pytest.fixture
def test_selectors(scoped_registry):
    selection.register_selector("least-confident")(LeastConfident)
    selection.register_selector("next-class")(NextClass)


def test_the_bootstrap_interval_is_a_point_for_identical_images_and_catches_a_bad_selector(test_selectors):
    one = field_predictions(n=1)
    copies = Predictions(one.probs * 5, one.gt * 5, one.mc_logits * 5, one.labeled, one.num_classes)
    row = {r["name"]: r for r in score_predictions(copies, ["least-confident"], bootstrap=100)}["least-confident"]
    lo, hi = row["gain_ci"]  # every resample is the same five images
    assert lo == pytest.approx(row["precision_gain"]) and hi == pytest.approx(row["precision_gain"])
    bad = {r["name"]: r for r in score_predictions(field_predictions(), ["least-confident"], bootstrap=200)}["least-confident"]
    assert bad["precision_gain"] < 0 and bad["gain_ci"][1] < 0


def test_each_selector_is_judged_on_its_own_labels(test_selectors):
    preds = field_predictions()
    row = {r["name"]: r for r in score_predictions(preds, ["next-class"], bootstrap=10)}["next-class"]
    hits = total = 0
    for p, g in zip(preds.probs, preds.gt):
        keep = (g != 255) & (g < preds.num_classes)
        hits += int(((p.argmax(0) + 1) % preds.num_classes == g)[keep].sum())
        total += int(keep.sum())
    assert row["coverage"] == 1.0 and row["precision"] == pytest.approx(hits / total)


def test_figures_are_written(tmp_path):
    preds = field_predictions(n=3)
    analysis.plot_confidence_overlap(preds, tmp_path / "a.png")
    analysis.plot_cv_plane(preds, tmp_path / "b.png")
    analysis.plot_precision_coverage(preds, tmp_path / "c.png", names=["fixed", "csl", "ael"])
    for name in "abc":
        data = (tmp_path / f"{name}.png").read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_calibration_by_hand():
    import torch

    # eight pixels, two classes, class 0 always the argmax with confidence c; truth 0 = right
    conf = torch.tensor([0.97, 0.97, 0.9, 0.9, 0.9, 0.9, 0.6, 0.6])
    right = torch.tensor([1, 0, 1, 1, 1, 0, 1, 0])
    probs = torch.stack([conf, 1 - conf]).reshape(2, 1, 8)
    gt = (1 - right).reshape(1, 8)
    gt_with_void = torch.cat([gt, torch.full((1, 1), 255)], 1)  # a void pixel counts nowhere
    probs = torch.cat([probs, torch.tensor([0.99, 0.01]).reshape(2, 1, 1)], 2)
    out = scoring.calibration(Predictions([probs], [gt_with_void], None, None, 2))
    # 15 bins: 0.97 -> bin 14 (acc 1/2), 0.9 -> bin 13 (acc 3/4), 0.6 -> bin 9 (acc 1/2)
    ece = 2 / 8 * abs(0.5 - 0.97) + 4 / 8 * abs(0.75 - 0.9) + 2 / 8 * abs(0.5 - 0.6)
    assert out["ece"] == pytest.approx(ece) and out["pixels"] == 8 and out["accuracy"] == pytest.approx(5 / 8)
    assert out["wrong_confident_share"] == pytest.approx(1 / 3)  # of 3 wrong pixels, one has C >= 0.95
    assert out["confident_error_rate"] == pytest.approx(1 / 2)  # of 2 pixels with C >= 0.95, one is wrong
    perfect = scoring.calibration(Predictions([torch.tensor([[[1.0]], [[0.0]]])], [torch.zeros(1, 1, dtype=torch.long)], None, None, 2))
    assert perfect["ece"] == 0 and perfect["accuracy"] == 1 and np.isnan(perfect["wrong_confident_share"])
