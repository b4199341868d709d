"""What a run measures besides training: mIoU on val or test, every selector scored on the
teacher's banked predictions, and the confidence AUROC on unlabelled images."""

from __future__ import annotations

import copy
import json

from bench.contract.metrics import SelectionQualityMeter
from bench.harness.build import RunParts
from bench.harness.evaluate import confidence_probe, evaluate
from bench.results.scoring import COLUMNS, calibration, score_predictions, select_all


def miou(parts: RunParts, entries=None) -> dict:
    """mIoU of the evaluated model on val (the curves, best-val), or on the given entries."""
    cfg = parts.config
    loader = parts.eval_loader(entries)
    return evaluate(parts.eval_model, loader, parts.num_classes, cfg.eval_mode, cfg.eval_crop or cfg.crop, cfg.eval_stride, parts.device, parts.autocast)


def final_miou(parts: RunParts, last_val: dict) -> dict:
    """The reported result: the last val evaluation, or the held-out test split."""
    return last_val if parts.config.eval_split == "val" else miou(parts, parts.split.test)


def bank_and_score(parts: RunParts, done: int) -> dict:
    """Bank the teacher's predictions at iteration `done` (out/bank) and score every
    registered selector on them as the bank gives them back; beside them, the run's own
    selector in its training state on the same images (what its meter says there)."""
    states = parts.seam.selector_states()
    preds = parts.bank.record(parts.eval_model, parts.device, done, done / parts.config.iters, parts.autocast, states)
    rows = score_predictions(preds, bootstrap=500, seed=done)
    scores = {
        "iter": done,
        "images": len(preds.probs),
        **calibration(preds),
        "selectors": {r["name"]: {k: r[k] for k in COLUMNS if k in r} for r in rows},
        "online": own_selection(parts, preds),
    }
    return json.loads(json.dumps(scores, default=float))  # plain floats: checkpoints load with weights_only


def own_selection(parts: RunParts, preds) -> dict:
    """The run's selector as it stands in training (a copy: training's state is left alone)
    on `preds`, through the meter training uses."""
    selector = copy.deepcopy(parts.seam.selector)
    meter = SelectionQualityMeter(parts.num_classes)
    for i, s in enumerate(select_all(selector, preds)):
        meter.update(s, preds.gt[i][None], valid=preds.valid(i)[None])
    q = meter.compute()
    return {"selector": selector.name, "params": selector.params(), **{k: q[k] for k in ("coverage", "precision", "recall")}}


def confidence_auroc(parts: RunParts) -> dict | None:
    """Max-confidence AUROC for correctness on (up to probe_images) unlabeled images."""
    cfg = parts.config
    if not cfg.probe_images or not parts.split.unlabeled:
        return None
    loader = parts.eval_loader(parts.split.unlabeled[: cfg.probe_images])
    return confidence_probe(parts.eval_model, loader, parts.num_classes, parts.device, parts.autocast, cfg.probe_images)
