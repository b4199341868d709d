"""Checkpoints: everything needed to continue a run to the same result.

A checkpoint holds the model, optimiser, EMA teacher, selector state and counters, the run
log (curves, meters, clocks) and every RNG state. It is written, fsynced, then rotated:
the one before the newest is kept as `checkpoint.prev.pt`, so a newest one that cannot be
read (a disk that filled up, a copy cut short) costs one checkpoint interval, not the run.
"""

from __future__ import annotations

import os
import random
import warnings
from pathlib import Path

import numpy as np
import torch

from bench.files import fsync_dir

CHECKPOINT = "checkpoint.pt"
PREVIOUS_CHECKPOINT = "checkpoint.prev.pt"


class CheckpointError(RuntimeError):
    pass


class ResumeError(RuntimeError):
    pass


def save_checkpoint(out: Path, state: dict) -> None:
    """Write, fsync, then rotate: checkpoint.pt -> checkpoint.prev.pt, new -> checkpoint.pt."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path, previous = out / CHECKPOINT, out / PREVIOUS_CHECKPOINT
    tmp = out / f".{CHECKPOINT}.tmp"
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    if path.exists():
        os.replace(path, previous)
    os.replace(tmp, path)
    fsync_dir(out)


def load_checkpoint(out: Path) -> dict | None:
    """The newest readable checkpoint; None when there is none. A newest one that cannot be
    read falls back to the previous one with a warning; none readable is an error naming
    the files."""
    out = Path(out)
    files = [p for p in (out / CHECKPOINT, out / PREVIOUS_CHECKPOINT) if p.is_file()]
    errors = []
    for file in files:
        try:
            state = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as exc:  # truncated zip, bad pickle, ...
            errors.append(f"{file}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
            continue
        if errors:
            warnings.warn(f"{errors[0]}; resuming from the previous checkpoint {file} (iteration {state.get('iteration')})")
        return state
    if errors:
        raise CheckpointError("no readable checkpoint:\n  " + "\n  ".join(errors) + f"\ndelete them to start {out} over")
    return None


def warm_start_weights(path: str, expected_hash: str | None) -> tuple[dict, str | None]:
    """Model weights and config hash of an earlier run (its folder or a checkpoint file)."""
    file = Path(path)
    file = file / CHECKPOINT if file.is_dir() else file
    if not file.is_file():
        raise FileNotFoundError(f"init_from={path}: no {file.name} there (train that run first)")
    try:  # the newest weights or an error: an older checkpoint would be a silent change of start
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"init_from={path}: {file} cannot be read ({type(exc).__name__}: {exc}); retrain that run") from None
    found = state.get("config_hash")
    if expected_hash is not None and found != expected_hash:
        raise ResumeError(
            f"init_from={path} holds a run with config hash {found}, but this run expects {expected_hash} "
            "(the warm start was retrained with another config; rerun it, or drop init_from_hash)"
        )
    return state["model"], found


def rng_state() -> dict:
    """Every RNG the training loop draws from, in types `torch.load(weights_only=True)` reads."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss), "cached": float(cached)},
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def capture(parts, done: int) -> dict:
    """The state of `parts` (a RunParts) after `done` iterations. Built on every worker (the
    run log sums their counts); the caller writes it on rank 0 only."""
    return {
        "iteration": done,
        "config_hash": parts.config.hash(),
        "model": parts.model.state_dict(),
        "optimizer": parts.optimizer.state_dict(),
        "ema": parts.ema.state_dict() if parts.ema is not None else None,
        "seam": parts.seam.state_dict() if parts.seam is not None else None,
        "log": parts.log.state_dict(),
        "rng": rng_state(),
    }


def restore(parts, state: dict) -> int:
    """Put `state` (from `capture`) back into `parts`; the iteration to continue from."""
    if state.get("config_hash") != parts.config.hash():
        raise ResumeError(
            f"checkpoint in {parts.out} was written with another config (hash {state.get('config_hash')} vs "
            f"{parts.config.hash()}); use the same config or another out="
        )
    if "seam" not in state:
        raise ResumeError(
            f"checkpoint in {parts.out} was written by an older cslbench (no selector seam state); "
            f"delete {parts.out}/checkpoint*.pt to train the run from the start"
        )
    parts.model.load_state_dict(state["model"])
    parts.optimizer.load_state_dict(state["optimizer"])
    if parts.ema is not None:
        parts.ema.load_state_dict(state["ema"])
    if parts.seam is not None:
        parts.seam.load_state_dict(state["seam"], state["iteration"])
    parts.log.load_state_dict(state["log"])
    set_rng_state(state["rng"])
    return state["iteration"]
