"""Prediction banks: hand-built banks scored against hand-computed values, the stored
precision, and the ways a bank can be wrong (a truncated file, another split, a plugin)."""

import json
import sys

import pytest
import torch

from bench.results.bank import MANIFEST, BankError, add_point, as_stored, read_manifest, start_bank
from bench.results.predictions import Predictions
from bench.results.scoring import score_bank

# Two images of 1 x 4 pixels, two classes; the first channel is P(class 0).
P0 = [torch.tensor([0.9, 0.8, 0.6, 0.3]), torch.tensor([0.95, 0.7, 0.55, 0.2])]
GT = [torch.tensor([[0, 0, 1, 1]]), torch.tensor([[0, 1, 0, 255]])]  # 255: void
IDENTITY = {"dataset": "hand", "split_sha256": {"unlabeled.txt": "a" * 64}, "images": ["a", "b"], "num_classes": 2,
            "config_hash": "c0ffee", "mc_passes": 0}


def hand_predictions(progress=1.0) -> Predictions:
    probs = [torch.stack([p, 1 - p]).reshape(2, 1, 4) for p in P0]
    return Predictions(probs, GT, None, None, 2, progress)


def hand_bank(folder, points=(5, 10)):
    manifest = start_bank(folder, IDENTITY, GT, {"cslbench": "test"})
    for it in points:
        manifest = add_point(folder, manifest, it, hand_predictions(it / 10))
    return manifest


def test_scores_of_a_hand_built_bank(tmp_path):
    hand_bank(tmp_path)
    rows = score_bank(tmp_path, ["fixed"], bootstrap=50, params={"fixed": {"tau": 0.75}})
    fixed = [r for r in rows if r["name"] == "fixed"]
    assert [(r["iteration"], r["progress"]) for r in fixed] == [(5, 0.5), (10, 1.0)]
    # confidences: a 0.9 0.8 0.6 0.7, b 0.95 0.7 0.55 (0.8 void); labels 0 0 0 1 in both
    # kept (C >= 0.75, labelled): a0 a1 b0, all right; right overall: a0 a1 a3 b0 b2
    r = fixed[0]
    assert r["coverage"] == pytest.approx(3 / 7) and r["precision"] == 1.0 and r["recall"] == pytest.approx(3 / 5)
    # weight 1 on 3 of the 5 right pixels, 0 on both wrong ones: (3*2 wins + 0.5 * 2*2 ties) / (5*2)
    assert r["auroc"] == pytest.approx(0.8)
    # fixed is the max-confidence threshold itself: the 3 most confident labelled pixels are its own
    assert r["matched_threshold_precision"] == pytest.approx(1.0) and r["precision_gain"] == pytest.approx(0.0)


PLUGIN = '''
from bench.contract import Selector, hard_selection

class LeastConfident(Selector):
    """Keeps the pixels with max confidence below 0.75: worse than a threshold of that size."""

    def _select(self, probs, valid, moments, **context):
        return hard_selection(moments.label, moments.confidence < 0.75, valid)
'''


def test_a_plugin_selector_is_scored_from_a_bank(tmp_path, monkeypatch, scoped_registry):
    (tmp_path / "least_plugin.py").write_text(PLUGIN)
    dist = tmp_path / "least_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: least-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[cslbench.selectors]\nleast = least_plugin:LeastConfident\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "least_plugin", raising=False)
    hand_bank(tmp_path / "bank", points=(10,))
    rows = {r["name"]: r for r in score_bank(tmp_path / "bank", bootstrap=50)}
    assert "least" in rows and "fixed" in rows  # every registered selector, the plugin with them
    r = rows["least"]
    # kept: a2 (wrong) a3 (right) b1 (wrong) b2 (right): precision 1/2; the threshold admitting 4
    # takes 0.95 0.9 0.8 (right) and half of the 0.7 bin (a3 right, b1 wrong): 3.5 / 4
    assert r["coverage"] == pytest.approx(4 / 7) and r["precision"] == pytest.approx(0.5)
    assert r["matched_threshold_precision"] == pytest.approx(3.5 / 4) and r["precision_gain"] == pytest.approx(0.5 - 3.5 / 4)


def test_stored_precision_float16_renormalised():
    g = torch.Generator().manual_seed(0)
    probs = (torch.randn(21, 64, 64, generator=g) * 4).softmax(0)
    stored = as_stored(Predictions([probs], [torch.zeros(64, 64, dtype=torch.long)], None, None, 21)).probs[0]
    assert (stored - probs).abs().max() < 1e-3  # float16: 11 significant bits, then renormalised
    assert (stored.sum(0) - 1).abs().max() < 1e-6
    assert (stored.argmax(0) != probs.argmax(0)).float().mean() < 1e-3  # near-ties only


def test_a_truncated_point_is_an_error_naming_it(tmp_path):
    manifest = hand_bank(tmp_path)
    point = tmp_path / manifest.points[1].file
    point.write_bytes(point.read_bytes()[: point.stat().st_size // 2])
    with pytest.raises(BankError, match=f"{point.name} is corrupt or was changed: sha256"):
        score_bank(tmp_path, ["fixed"], bootstrap=10)
    point.unlink()
    with pytest.raises(BankError, match=f"{point.name} is missing"):
        score_bank(tmp_path, ["fixed"], bootstrap=10)


def test_a_bank_of_another_split_is_refused_with_the_reason(tmp_path):
    hand_bank(tmp_path)
    other = {**IDENTITY, "split_sha256": {"unlabeled.txt": "b" * 64}}
    with pytest.raises(BankError, match=r"other predictions \(split_sha256: bank has .*aaaa.*, this run .*bbbb"):
        start_bank(tmp_path, other, GT, {})


def test_a_half_written_bank_goes_on(tmp_path):
    manifest = hand_bank(tmp_path, points=(5,))
    (tmp_path / "point-000010.pt").write_bytes(b"half of a point")  # written, never named: the crash came before the manifest
    again = start_bank(tmp_path, IDENTITY, GT, {})
    assert [p.iteration for p in again.points] == [5]
    again = add_point(tmp_path, again, 10, hand_predictions())
    again = add_point(tmp_path, again, 5, hand_predictions())  # a point already there is not written twice
    assert [p.iteration for p in read_manifest(tmp_path).points] == [5, 10] and manifest.truth_sha256 == again.truth_sha256
    assert len(score_bank(tmp_path, ["fixed"], bootstrap=10)) == 2 * 4  # 3 baselines + fixed, per point


def test_a_manifest_of_another_format_version_is_refused(tmp_path):
    hand_bank(tmp_path)
    data = json.loads((tmp_path / MANIFEST).read_text())
    (tmp_path / MANIFEST).write_text(json.dumps({**data, "version": 99}))
    with pytest.raises(BankError, match="format version 99, but this cslbench reads version 1; re-record"):
        read_manifest(tmp_path)
    with pytest.raises(BankError, match="not a prediction bank"):
        read_manifest(tmp_path / "elsewhere")


def test_record_a_checkpoint_then_score_it_from_the_command_line(tmp_path, capsys):
    import csv

    from bench.harness.config import load_config
    from bench.harness.train import Trainer
    from bench.orchestration.cli import main

    tiny = ["backbone=test_resnet", "crop=32", "batch_size=2", "iters=2", "eval_every=2", "log_every=2", "probe_images=0",
            "head_channels=16", "aspp_dilations=[1,2]", "wandb_mode=disabled", "selector=fixed", f"out={tmp_path / 'run'}"]
    Trainer(load_config(overrides=tiny), show_progress=False).run()
    main(["bank", "record", str(tmp_path / "run"), "--images", "2"])
    main(["bank", "record", str(tmp_path / "run"), "--images", "2"])  # the point is there: nothing written twice
    manifest = read_manifest(tmp_path / "run" / "bank")
    assert [(p.iteration, p.progress) for p in manifest.points] == [(2, 1.0)] and len(manifest.images) == 2
    assert manifest.mc_passes == 10  # UPS and CSA declare 10 passes: the bank holds what they read
    main(["bank", "score", str(tmp_path / "run" / "bank"), "--selectors", "fixed", "ups", "--bootstrap", "20"])
    out = tmp_path / "run" / "bank" / "scores"
    rows = list(csv.DictReader((out / "scores.csv").open()))
    assert [r["name"] for r in rows] == ["max confidence", "margin (top-1 - top-2)", "1 - normalised entropy", "fixed", "ups"]
    assert all(r["iteration"] == "2" for r in rows) and float(rows[3]["coverage"]) >= 0
    assert (out / "scores_over_training.png").read_bytes()[:4] == b"\x89PNG"
    assert "| ups |" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="images"):  # 3 images is another bank than the 2 there
        main(["bank", "record", str(tmp_path / "run"), "--images", "3"])
