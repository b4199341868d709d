"""What a run measures besides training: mIoU on val or test, every selector scored on
the teacher's current predictions, and the confidence AUROC on unlabelled images."""

from __future__ import annotations

import json

import torch

from bench.harness.analysis import calibration, predict, select_eval
from bench.harness.build import RunParts
from bench.harness.evaluate import confidence_probe, evaluate

# The selection-quality columns kept per selector at each scoring point.
SCORE_COLUMNS = ("coverage", "precision", "matched_threshold_precision", "precision_gain", "gain_ci", "auroc")


def miou(parts: RunParts, entries=None) -> dict:
    """mIoU of the evaluated model on val (the curves, best-val), or on the given entries."""
    cfg = parts.config
    loader = parts.eval_loader(entries)
    return evaluate(parts.eval_model, loader, parts.num_classes, cfg.eval_mode, cfg.eval_crop or cfg.crop, cfg.eval_stride, parts.device, parts.autocast)


def final_miou(parts: RunParts, last_val: dict) -> dict:
    """The reported result: the last val evaluation, or the held-out test split."""
    return last_val if parts.config.eval_split == "val" else miou(parts, parts.split.test)


def score_selectors(parts: RunParts, done: int) -> dict:
    """Every registered selector on the teacher's current predictions for the same
    unlabeled images, with the teacher's calibration: is confidence failing as
    self-training goes on? Its random draws (stochastic passes) leave training's alone."""
    model = parts.eval_model
    was_training = model.training
    devices = [parts.device] if parts.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(parts.config.seed * 1_000_003 + done)
        model.eval()
        try:
            with parts.autocast():  # the model as in training; selectors in fp32 (outside autocast)
                preds = predict(model, parts.source, parts.split, parts.device, parts.config.selection_probe_images)
        finally:
            model.train(was_training)
        rows = select_eval(preds, bootstrap=500, seed=done)
    scores = {
        "iter": done,
        "images": len(preds.probs),
        **calibration(preds),
        "selectors": {r["name"]: {k: r[k] for k in SCORE_COLUMNS if k in r} for r in rows},
    }
    return json.loads(json.dumps(scores, default=float))  # plain floats: checkpoints load with weights_only


def confidence_auroc(parts: RunParts) -> dict | None:
    """Max-confidence AUROC for correctness on (up to probe_images) unlabeled images."""
    cfg = parts.config
    if not cfg.probe_images or not parts.split.unlabeled:
        return None
    loader = parts.eval_loader(parts.split.unlabeled[: cfg.probe_images])
    return confidence_probe(parts.eval_model, loader, parts.num_classes, parts.device, parts.autocast, cfg.probe_images)
