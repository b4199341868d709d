"""Recording prediction banks: the teacher on fixed unlabelled images, at points of a run
(`bank_points`) or for a finished checkpoint (`cslbench bank record`). The format and the
scoring are in bench/results (bank.py, scoring.py); this is the part that needs a model."""

from __future__ import annotations

from pathlib import Path

import torch

from bench.harness.analysis import mc_passes_declared, predict
from bench.harness.provenance import git_sha, library_versions
from bench.results.bank import Manifest, add_point, as_stored, start_bank
from bench.results.predictions import Predictions


def bank_identity(config, source, split, images: int, mc_passes: int) -> dict:
    """What must agree for points to belong in one bank."""
    return {
        "dataset": f"{source.name}" + (f" resize={list(source.resize)}" if source.resize else ""),
        "split_sha256": split.sha256,
        "images": [e.image for e in split.unlabeled[:images]],
        "num_classes": source.num_classes,
        "config_hash": config.hash(),
        "mc_passes": mc_passes,
    }


class BankRecorder:
    """Writes points of one bank; each point is also returned as the bank will give it back."""

    def __init__(self, folder: Path | str, config, source, split, images: int):
        self.folder, self.source, self.split, self.images, self.seed = Path(folder), source, split, images, config.seed
        self.mc_passes = mc_passes_declared(source.num_classes)
        self.identity = bank_identity(config, source, split, images, self.mc_passes)
        self.manifest: Manifest | None = None

    def record(self, model, device, iteration: int, progress: float, autocast, selector_states: dict | None = None) -> Predictions:
        """The teacher's predictions at `iteration` (its random draws kept apart from
        training's), written as a point with the stateful selectors' training states, in
        stored precision."""
        was_training = model.training
        devices = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.seed * 1_000_003 + iteration)
            model.eval()
            try:
                with autocast():  # the model as in training; selectors in fp32 (outside autocast)
                    preds = predict(model, self.source, self.split, device, self.images, self.mc_passes)
            finally:
                model.train(was_training)
        preds.progress = progress
        preds.selector_states = selector_states or {}
        if self.manifest is None:
            code = {"cslbench": library_versions()["cslbench"], "git_sha": git_sha()}
            self.manifest = start_bank(self.folder, self.identity, preds.gt, code)
        self.manifest = add_point(self.folder, self.manifest, iteration, preds)
        return as_stored(preds)
