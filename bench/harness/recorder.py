"""The run's books: its record on disk (rank 0 writes it) and its W&B run.

The record says `running` from the first iteration, is rewritten at every log step, and
ends `complete` (after the final checkpoint is durable) or `failed` with the error and
the iteration it names.
"""

from __future__ import annotations

import traceback

import torch

from bench.harness.build import RunParts
from bench.harness.checkpoint import CHECKPOINT, PREVIOUS_CHECKPOINT, ResumeError, load_checkpoint, restore
from bench.harness.provenance import git_sha, library_versions, now
from bench.harness.tracking import Tracker, start_tracking
from bench.results.record import RECORD, RunRecord, failure, read_record_or_none, write_record

BEST_VAL_NOTE = "best validation mIoU over all evaluations: model selection on val, not a held-out result"


class RunExistsError(ResumeError):
    """A new run would overwrite an earlier one."""


def new_record(parts: RunParts) -> RunRecord:
    cfg, split, device = parts.config, parts.split, parts.device
    return RunRecord(
        name=parts.out.name,
        status="running",
        config=cfg.to_dict(),
        config_hash=cfg.hash(),
        splits={
            "origin": split.origin,
            "sha256": split.sha256,
            "sizes": {"labeled": len(split.labeled), "unlabeled": len(split.unlabeled), "val": len(split.val), "test": len(split.test)},
        },
        git_sha=git_sha(),
        versions=library_versions(),
        device=f"cuda: {torch.cuda.get_device_name(device)}" if device.type == "cuda" else f"cpu: {torch.get_num_threads()} threads",
        determinism=parts.determinism,
        model={**parts.model.describe(), "peak_lr": {"backbone": cfg.lr, "head": cfg.lr * cfg.head_lr_mult}},
        started=now(),
        updated=now(),
    )


def refuse_overwrite(parts: RunParts) -> None:
    if parts.replicas.is_main and any((parts.out / name).exists() for name in (RECORD, CHECKPOINT, PREVIOUS_CHECKPOINT)):
        previous = read_record_or_none(parts.out)
        status = previous.status if previous is not None else "no readable record"
        raise RunExistsError(f"{parts.out} already holds a run ({status}); continue it with --resume, or pass out=<another folder>")


def resume_run(parts: RunParts, record: RunRecord) -> tuple[int, RunRecord]:
    """Continue from the checkpoint: (iteration to start from, the record to go on with).
    A record without a checkpoint (failed early, skipped, unreadable) holds no progress
    and is replaced; a complete one is kept as it is."""
    previous = read_record_or_none(parts.out)
    if previous is not None and previous.status == "complete" and previous.config_hash != parts.config.hash():
        raise ResumeError(
            f"{parts.out} holds a run with another config (hash {previous.config_hash} vs "
            f"{parts.config.hash()}); resume with the same config or choose another out="
        )
    state = load_checkpoint(parts.out)
    if state is None:
        return 0, previous if previous is not None and previous.status == "complete" else record
    start = restore(parts, state)
    if previous is not None:
        if previous.status == "complete" and start >= parts.config.iters:
            return start, previous
        record.started, record.wandb_id = previous.started, previous.wandb_id
        record.restarts = previous.restarts + ([restart(previous, start)] if previous.status in ("running", "failed") else [])
    record.resumed_from = start
    return start, record


def restart(previous: RunRecord, start: int) -> dict:
    """What going on from the checkpoint at `start` costs: the iterations the ended attempt
    trained past it (at least; its record is written at log steps, so up to log_every - 1
    more may have run unseen)."""
    if previous.status == "running":  # it ended without a word: killed, or its node went away
        cause = "died"
    else:  # failed: a lost data-parallel worker (the sweep marks it), or the run's own error
        cause = "lost" if (previous.error or {}).get("lost") else "failed"
    return {"cause": cause, "reached": previous.iteration, "resumed_from": start, "recomputed": max(0, previous.iteration - start)}


class Recorder:
    def __init__(self, parts: RunParts, record: RunRecord, tracker: Tracker | None, on_log=None):
        self.parts, self.record, self.on_log = parts, record, on_log  # on_log(point, done): Ray Tune reports through it
        if not parts.replicas.is_main:
            tracker = Tracker()  # one W&B run per run: rank 0's
        cfg = parts.config
        self.tracker = tracker if tracker is not None else start_tracking(
            record.config, parts.out.name, parts.out, cfg.wandb_project, cfg.wandb_group, cfg.wandb_mode, run_id=record.wandb_id
        )
        if self.tracker.run_id:  # a resumed run continues the same W&B run
            record.wandb_id = self.tracker.run_id

    def write(self) -> None:
        if self.parts.replicas.is_main:
            write_record(self.parts.out, self.record)

    def running(self) -> None:
        self.record.status = "running"
        self.write()

    def log(self, done: int, lr: float) -> dict:
        log = self.parts.log
        point = log.log_point(done, lr)
        r = self.record
        r.status, r.iteration, r.curves, r.updated = "running", done, log.curves, now()
        r.cost = log.cost_summary(done, self.parts.device, self.parts.seam)
        if log.selection_over_training:
            r.selection_over_training = log.selection_over_training
        self.write()
        self.tracker.log(point, step=done)
        if self.on_log is not None:
            self.on_log(point, done)
        return point

    def complete(self, final: dict, confidence_auroc: dict | None) -> None:
        parts, log, r = self.parts, self.parts.log, self.record
        cfg = parts.config
        r.status, r.iteration, r.updated = "complete", cfg.iters, now()
        r.curves = log.curves  # from the checkpoint when a resume starts at the budget (no log step ran)
        r.final = {
            "eval_split": cfg.eval_split,  # miou, per_class_iou and pixel_accuracy are on it
            "miou": final["miou"],
            "miou_last_val": log.last_eval["miou"],
            "miou_best_val": log.best_val[0],
            "best_val_iter": log.best_val[1],
            "best_val_note": BEST_VAL_NOTE,
            "per_class_iou": final["per_class_iou"],
            "pixel_accuracy": final["pixel_accuracy"],
            "unlabeled_probe": confidence_auroc,
        }
        r.selection = log.global_meter().compute() if log.meter is not None else None
        r.selection_over_training = log.selection_over_training or None
        r.cost = log.cost_summary(cfg.iters, parts.device, parts.seam)
        self.write()
        self.tracker.summary({"final_miou": final["miou"], "miou_best_val": log.best_val[0], **{f"selection_{k}": v for k, v in (r.selection or {}).items()}})

    def fail(self, error: BaseException, iteration: int) -> bool:
        """Record why the run ended early; False when that is no failure (an error whose
        `record_status` says otherwise, e.g. a search's scheduler stopping it)."""
        r = self.record
        r.status, r.updated = getattr(error, "record_status", "failed"), now()
        r.error = failure(error, getattr(error, "iteration", iteration))
        r.traceback = traceback.format_exc(limit=-8) if r.status == "failed" else None
        self.write()
        return r.status == "failed"
