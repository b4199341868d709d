"""The run record: the one file every result is read from.

`record.json` is rewritten atomically at every log step, so a reader or a crash sees the
previous version or the next, never half of one. `write_record` is its only writer and
`read_record` its only reader (the trainer, the sweeps, `load_run`, the leaderboard). A
record of another schema version is refused with what to do; there are no conversions.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.files import atomic_write_text, json_safe

RECORD = "record.json"
SCHEMA_VERSION = 2  # 1: the untyped records before it (no schema_version key)
STATUSES = ("running", "complete", "failed", "skipped", "stopped")  # stopped: pruned by a search scheduler


class RecordError(ValueError):
    """A record that cannot be read as this version's run record."""


@dataclass
class RunRecord:
    name: str
    status: str  # one of STATUSES
    config: dict  # TrainConfig.to_dict()
    config_hash: str | None = None
    iteration: int = 0  # the last iteration the record describes
    curves: list[dict] = field(default_factory=list)
    final: dict | None = None  # complete runs: mIoU on the eval split, best/last val, per class
    selection: dict | None = None  # selection quality over all of training (semi-supervised)
    selection_over_training: list[dict] | None = None  # every selector scored on the teacher at each bank point
    cost: dict | None = None
    error: dict | None = None  # failed or skipped: {type, message, iteration}
    traceback: str | None = None
    splits: dict | None = None  # origin, sha256 of each split file, sizes
    model: dict | None = None  # weights source and hash, normalisation, output stride, peak lr
    device: str | None = None
    determinism: dict | None = None
    git_sha: str | None = None
    versions: dict | None = None
    started: str | None = None
    updated: str | None = None
    resumed_from: int | None = None
    # each time the run went on from its checkpoint after its process ended without finishing:
    # {cause: "died" (killed, node lost: no error) | "lost" (a data-parallel worker's node) | "failed",
    #  reached, resumed_from, recomputed}
    restarts: list[dict] = field(default_factory=list)
    wandb_id: str | None = None
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self):
        if self.status not in STATUSES:
            raise RecordError(f"record {self.name!r}: status {self.status!r} is not one of {STATUSES}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_FIELDS = {f.name for f in dataclasses.fields(RunRecord)}


def write_record(out: Path | str, record: RunRecord) -> None:
    atomic_write_text(Path(out) / RECORD, json.dumps(json_safe(record.to_dict()), indent=1, allow_nan=False))


def record_from_dict(data: Any, where: str = RECORD) -> RunRecord:
    if not isinstance(data, dict):
        raise RecordError(f"{where}: not a run record (a JSON object was expected)")
    version = data.get("schema_version", 1)
    if version != SCHEMA_VERSION:
        raise RecordError(
            f"{where}: record schema {version}, but this cslbench reads schema {SCHEMA_VERSION} only; "
            "rerun the run (or read it with the cslbench version that wrote it)"
        )
    unknown = sorted(set(data) - _FIELDS)
    if unknown:
        raise RecordError(f"{where}: unknown record fields {unknown} (written by another cslbench?)")
    try:
        return RunRecord(**data)
    except TypeError as exc:  # a required field missing
        raise RecordError(f"{where}: {exc}") from None


def read_record(out: Path | str) -> RunRecord | None:
    """The record in run folder `out`; None when there is none. A file that is not a
    record of this schema is a `RecordError` naming it."""
    path = Path(out) / RECORD
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RecordError(f"{path}: not valid JSON ({exc})") from None
    return record_from_dict(data, str(path))


def read_record_or_none(out: Path | str) -> RunRecord | None:
    """The record, or None when there is none or it cannot be read (a half-written file
    from a crash outside our atomic writes, a hand edit, another schema)."""
    try:
        return read_record(out)
    except (RecordError, OSError):
        return None


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


def describe_error(error: dict | None) -> str:
    """One line for tables and summaries."""
    if not error:
        return ""
    where = f" at iteration {error['iteration']}" if error.get("iteration") is not None else ""
    first = str(error.get("message", "")).strip().splitlines()
    return f"{error.get('type', 'error')}{where}: {first[0] if first else ''}"
