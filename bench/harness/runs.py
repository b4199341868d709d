"""A finished (or checkpointed) run folder, loaded for analysis without a trainer.

`load_run(path)` gives the model whose evaluation the record reports (the EMA teacher
when the run had one), the data it was trained and evaluated on, and its config and
record: no optimiser, no loaders, no W&B, nothing written.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from bench.harness.config import TrainConfig, from_dict
from bench.data.sources import Source, get_source
from bench.data.splits import Split, load_split
from bench.harness.models import DeepLabV3Plus, build_model
from bench.harness.device import resolve_device
from bench.harness.checkpoint import CHECKPOINT, load_checkpoint
from bench.results.record import RECORD, RecordError, RunRecord, read_record


class RunFolderError(RuntimeError):
    pass


@dataclass
class LoadedRun:
    path: Path
    config: TrainConfig
    record: RunRecord
    model: DeepLabV3Plus  # in eval mode on `device`
    teacher: bool  # the model is the run's EMA teacher
    iteration: int  # of the checkpoint the weights come from
    source: Source
    split: Split
    device: torch.device

    @property
    def num_classes(self) -> int:
        return self.source.num_classes


def load_run(path: str | Path, device: str = "auto") -> LoadedRun:
    run = Path(path)
    run = run.parent if run.is_file() else run
    if not (run / RECORD).is_file() or not (run / CHECKPOINT).is_file():
        raise RunFolderError(f"{run} is not a run folder with {RECORD} and {CHECKPOINT} (train it first, or pass the run's folder)")
    try:
        record = read_record(run)
        config = from_dict(record.config)
    except (RecordError, ValueError, KeyError, TypeError) as exc:  # record, config and missing-key errors
        raise RunFolderError(f"{run}/{RECORD} cannot be read as a run record ({type(exc).__name__}: {exc})") from None
    state = load_checkpoint(run)
    if state.get("config_hash") != record.config_hash:
        raise RunFolderError(f"{run}: {CHECKPOINT} (config hash {state.get('config_hash')}) is not the run in {RECORD} ({record.config_hash})")
    if record.status == "complete" and state.get("iteration") != record.iteration:
        raise RunFolderError(
            f"{run}: the readable checkpoint is from iteration {state.get('iteration')}, but the record reports iteration "
            f"{record.iteration}; its weights did not produce the recorded mIoU"
        )
    source = get_source(config.dataset, config.root, config.resize)
    split = load_split(source, config.split_dir, config.split, config.labeled, config.eval_split)
    recorded = (record.splits or {}).get("sha256")
    if recorded and recorded != split.sha256:
        raise RunFolderError(f"{run}: the split files now in {split.origin} differ from the ones this run was trained on (sha256 in {RECORD})")
    target = resolve_device(device)
    model = build_model(config, source.num_classes, load_weights=False)  # weights: the checkpoint
    teacher = state.get("ema") is not None
    model.load_state_dict(state["ema"] if teacher else state["model"])
    return LoadedRun(run, config, record, model.to(target).eval(), teacher, state["iteration"], source, split, target)
