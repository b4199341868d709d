"""Prediction banks: a teacher's outputs on fixed unlabelled images at points of a run, kept
so that any selector can be scored on them later, on any machine, without the model.

    BANK/
      manifest.json        format and version, where the images come from, the run, every file's sha256
      truth.pt             the hidden ground truth per image (uint8, 255 = void): selectors never see it
      point-000300.pt      the teacher at iteration 300: what a selector may read

A point holds, per image, the class probabilities (float16) and, when a registered selector
declares them, stochastic passes as logits (float16, `mc_passes` of them); the labelled
batch's probabilities (float16) and targets; the training progress; and the states stateful
selectors had in training at that point, where the run followed them. The truth lives in
its own file: scoring hands a selector a point's contents only. Every file is
written atomically and named in the manifest with its sha256 only once complete: a bank
cut short holds fewer points and goes on from there; a file whose bytes differ from the
manifest is an error naming it. docs/banks.md is the specification.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from bench.files import atomic_write_text, fsync_dir, sha256_of
from bench.results.predictions import Predictions

FORMAT = "cslbench-prediction-bank"
VERSION = 1
MANIFEST = "manifest.json"
TRUTH = "truth.pt"
STORED = torch.float16  # probabilities within 2^-11 relative (4.9e-4 at 1): docs/banks.md
# What must agree for points to belong in one bank (and a resumed recording to continue it).
IDENTITY = ("dataset", "split_sha256", "images", "num_classes", "config_hash", "mc_passes")


class BankError(ValueError):
    """A bank that cannot be read or added to: names the file or the key and what to do."""


@dataclass
class PointEntry:
    iteration: int
    progress: float
    file: str
    sha256: str


@dataclass
class Manifest:
    dataset: str  # the source and how its images were made (name, resize, generator)
    split_sha256: dict  # sha256 of each split file the images come from
    images: list[str]  # image ids, in the order of every tensor list
    num_classes: int
    config_hash: str  # the run whose teacher this is
    mc_passes: int  # stochastic passes stored per image (the most any selector declared)
    truth_sha256: str
    points: list[PointEntry] = field(default_factory=list)
    code: dict = field(default_factory=dict)  # cslbench version and git sha that wrote it
    format: str = FORMAT
    version: int = VERSION

    def identity(self) -> dict:
        return {k: getattr(self, k) for k in IDENTITY}


def as_stored(preds: Predictions) -> Predictions:
    """`preds` as a bank gives them back: probabilities rounded to float16 and renormalised
    over the classes, passes rounded to float16. Scoring in training uses this too, so a
    score read from the bank is the score the run measured."""

    def probs(p: Tensor) -> Tensor:
        p = p.to(STORED).float()
        return p / p.sum(dim=-3, keepdim=True).clamp(min=1e-12)

    return Predictions(
        probs=[probs(p) for p in preds.probs],
        gt=preds.gt,
        mc_logits=[m.to(STORED).float() for m in preds.mc_logits] if preds.mc_logits is not None else None,
        labeled=(probs(preds.labeled[0]), preds.labeled[1]) if preds.labeled is not None else None,
        num_classes=preds.num_classes,
        progress=preds.progress,
        selector_states=preds.selector_states,
    )


def _save_atomic(path: Path, obj) -> str:
    """torch.save through a temporary file, fsync, rename; the sha256 of what was written."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    data = buffer.getvalue()
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)
    return hashlib.sha256(data).hexdigest()


def _write_manifest(folder: Path, manifest: Manifest) -> None:
    atomic_write_text(folder / MANIFEST, json.dumps(asdict(manifest), indent=1))


def read_manifest(folder: Path | str) -> Manifest:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise BankError(f"{folder} is not a prediction bank: no {MANIFEST} (record one with `cslbench bank record RUN`)")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BankError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise BankError(f"{path}: not a {FORMAT} manifest")
    if data.get("version") != VERSION:
        raise BankError(f"{path}: bank format version {data.get('version')}, but this cslbench reads version {VERSION}; re-record the bank")
    try:
        points = [PointEntry(**p) for p in data.pop("points")]
        return Manifest(**data, points=points)
    except TypeError as exc:
        raise BankError(f"{path}: {exc}") from None


def start_bank(folder: Path | str, identity: dict, truth: list[Tensor], code: dict) -> Manifest:
    """A new bank in `folder`, or the one there if it holds the same images of the same run
    (a recording cut short goes on); anything else there is an error naming what differs."""
    folder = Path(folder)
    if (folder / MANIFEST).is_file():
        manifest = read_manifest(folder)
        differs = [k for k in IDENTITY if manifest.identity()[k] != identity[k]]
        if differs:
            shown = "; ".join(f"{k}: bank has {_short(manifest.identity()[k])}, this run {_short(identity[k])}" for k in differs)
            raise BankError(f"{folder} holds a bank of other predictions ({shown}); record into another folder")
        return manifest
    folder.mkdir(parents=True, exist_ok=True)
    truth_sha = _save_atomic(folder / TRUTH, {"gt": [g.to(torch.uint8) for g in truth]})
    manifest = Manifest(**identity, truth_sha256=truth_sha, code=code)
    _write_manifest(folder, manifest)
    return manifest


def add_point(folder: Path | str, manifest: Manifest, iteration: int, preds: Predictions) -> Manifest:
    """Write the point and then name it in the manifest (a crash between the two leaves a
    file the manifest does not name: the point is recorded again). Truth is not written here."""
    folder = Path(folder)
    if any(p.iteration == iteration for p in manifest.points):
        return manifest
    name = f"point-{iteration:06d}.pt"
    data = {
        "iteration": iteration,
        "progress": preds.progress,
        "probs": [p.to(STORED) for p in preds.probs],
        "mc_logits": [m.to(STORED) for m in preds.mc_logits] if preds.mc_logits is not None else None,
        "labeled": (preds.labeled[0].to(STORED), preds.labeled[1].to(torch.uint8)) if preds.labeled is not None else None,
        "selector_states": preds.selector_states,
    }
    digest = _save_atomic(folder / name, data)
    manifest.points.append(PointEntry(iteration, preds.progress, name, digest))
    manifest.points.sort(key=lambda p: p.iteration)
    _write_manifest(folder, manifest)
    return manifest


def _load_verified(folder: Path, name: str, sha256: str) -> dict:
    path = folder / name
    if not path.is_file():
        raise BankError(f"{path} is missing (the manifest names it); re-record the bank")
    found = sha256_of(path)
    if found != sha256:
        raise BankError(f"{path} is corrupt or was changed: sha256 {found[:12]}… but the manifest says {sha256[:12]}…; re-record it")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise BankError(f"{path} cannot be read ({type(exc).__name__}: {exc}); re-record it") from None


def load_truth(folder: Path | str, manifest: Manifest) -> list[Tensor]:
    return [g.long() for g in _load_verified(Path(folder), TRUTH, manifest.truth_sha256)["gt"]]


def load_point(folder: Path | str, manifest: Manifest, entry: PointEntry, truth: list[Tensor]) -> Predictions:
    """The point as scoring takes it, with the truth beside it (not inside what a selector gets)."""
    data = _load_verified(Path(folder), entry.file, entry.sha256)
    labeled = data["labeled"]
    stored = Predictions(
        probs=data["probs"],
        gt=truth,
        mc_logits=data["mc_logits"],
        labeled=(labeled[0], labeled[1].long()) if labeled is not None else None,
        num_classes=manifest.num_classes,
        progress=data["progress"],
        selector_states=data.get("selector_states") or {},  # optional: a point banked from a checkpoint alone has none
    )
    return as_stored(stored)  # float16 -> float32, renormalised exactly as in training


def _short(value) -> str:
    text = json.dumps(value, sort_keys=True) if not isinstance(value, str) else value
    return text if len(text) <= 60 else text[:57] + "..."
