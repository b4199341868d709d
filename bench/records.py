"""Run records and checkpoints: the source of truth for every result.

`record.json` is rewritten atomically (temp file + fsync + rename) at every log step, so a
reader or a crash sees the previous version or the next, never half of one. Checkpoints hold
everything needed to continue to the same result: model, optimiser, EMA teacher, selector
state, RNG states, meters and curves. The checkpoint before the newest is kept as
`checkpoint.prev.pt`: a newest one that cannot be read (a disk that filled up, a copy cut
short) costs one checkpoint interval, not the run.
"""

from __future__ import annotations

import json
import math
import os
import platform
import random
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

RECORD = "record.json"
CHECKPOINT = "checkpoint.pt"
PREVIOUS_CHECKPOINT = "checkpoint.prev.pt"


class CheckpointError(RuntimeError):
    pass


def atomic_write_text(path: Path | str, text: str) -> None:
    """Write `text` to `path` so readers see the old file or the new one, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _fsync_dir(folder: Path) -> None:
    """Make a rename durable: the folder entry is data too."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _json_safe(value: Any) -> Any:
    """NaN and infinities become null: JSON has no NaN, and a missing value is honest."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def write_record(out: Path, record: dict) -> None:
    atomic_write_text(Path(out) / RECORD, json.dumps(_json_safe(record), indent=1, allow_nan=False))


def read_record(out: Path) -> dict | None:
    path = Path(out) / RECORD
    return json.loads(path.read_text()) if path.is_file() else None


def read_record_or_none(out: Path) -> dict | None:
    """The record, or None when there is none or it cannot be parsed (a half-written file
    from a crash outside our atomic writes, or a hand edit)."""
    try:
        record = read_record(out)
    except (json.JSONDecodeError, UnicodeDecodeError, OSError):
        return None
    return record if isinstance(record, dict) else None


def failure(exc: BaseException, iteration: int | None) -> dict:
    """What a failed run's record says about why. An error re-raised from a DataLoader
    worker ("Caught DataError in DataLoader worker process 0. Original Traceback ...") is
    reported as the original: its type and last line, which name the file."""
    kind, message = type(exc).__name__, str(exc).strip() or type(exc).__name__
    if "Original Traceback" in message:
        last = [line for line in message.splitlines() if line.strip()][-1]
        kind, _, message = last.partition(": ")
        kind = kind.rsplit(".", 1)[-1]
    return {"type": kind, "message": message, "iteration": iteration}


def describe_error(error: Any) -> str:
    """One line for tables and summaries (older records hold a plain string)."""
    if isinstance(error, dict):
        where = f" at iteration {error['iteration']}" if error.get("iteration") is not None else ""
        first = str(error.get("message", "")).strip().splitlines()
        return f"{error.get('type', 'error')}{where}: {first[0] if first else ''}"
    return str(error) if error else ""


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
    _fsync_dir(out)


def load_checkpoint(out: Path) -> dict | None:
    """The newest readable checkpoint; None when there is none. A newest one that cannot be
    read falls back to the previous one with a warning; none readable is an error naming
    the files."""
    import warnings

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
        raise CheckpointError(
            "no readable checkpoint:\n  " + "\n  ".join(errors) + f"\ndelete them to start {out} over"
        )
    return None


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


def git_sha() -> str | None:
    root = Path(__file__).resolve().parents[1]
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5)
        if sha.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True, text=True, timeout=5)
        return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def library_versions() -> dict[str, str]:
    import timm
    import torchvision

    import bench

    return {
        "python": platform.python_version(),
        "cslbench": bench.__version__,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "timm": timm.__version__,
        "numpy": np.__version__,
    }
