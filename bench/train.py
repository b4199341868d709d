"""The training loop: one semi-supervised run in which only the selector changes.

The algorithm is a plain function per framework (bench/frameworks.py). This module builds
what a run needs, feeds the step batches without unlabelled ground truth (that goes to the
selection meter here), and keeps the books: evaluation, the run record, checkpoints, W&B.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from bench.config import TrainConfig
from bench.data.loaders import MIX, UNLABELED, EvalSet, LabeledSet, UnlabeledSet, eval_collate, iteration_loader
from bench.data.sources import get_source
from bench.distributed import RANK_SEED_STRIDE, Replicas
from bench.data.splits import load_split
from bench.evaluate import confidence_probe, evaluate
from bench.frameworks import FRAMEWORKS, Batch, StepOut, UnlabeledView
from bench.labels import IGNORE
from bench.metrics import SelectionQualityMeter
from bench.models import build_model
from bench.records import (
    CHECKPOINT,
    PREVIOUS_CHECKPOINT,
    RECORD,
    CheckpointError,
    failure,
    git_sha,
    library_versions,
    load_checkpoint,
    read_record,
    read_record_or_none,
    rng_state,
    save_checkpoint,
    set_rng_state,
    write_record,
)
from bench.runlog import RunLog
from bench.runtime import use_deterministic_kernels
from bench.selection import DeferredChecks, Selection, Selector, build_context, deferred_value_checks, get_selector
from bench.tracking import Tracker, start_tracking

BEST_VAL_NOTE = "best validation mIoU over all evaluations: model selection on val, not a held-out result"


class ResumeError(RuntimeError):
    pass


class RunExistsError(ResumeError):
    """A new run would overwrite an earlier one."""


class DivergedError(RuntimeError):
    """The loss stopped being a number: training on would only produce noise."""

    def __init__(self, message: str, iteration: int):
        super().__init__(message)
        self.iteration = iteration


class SelectorInputError(ValueError):
    """A selector was given what it cannot take (found by its deferred value checks)."""

    def __init__(self, message: str, iteration: int):
        super().__init__(message)
        self.iteration = iteration


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device={name}: no CUDA device is visible to PyTorch (use device=cpu)")
    return torch.device(name)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _to(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if isinstance(v, Tensor) else v for k, v in batch.items()}


def split_truth(lab: dict, unl: dict | None = None, mix: dict | None = None) -> tuple[Batch, Tensor | None]:
    """The step's batch, and apart from it the unlabelled ground truth (for the meter only)."""
    if unl is None:
        return Batch(lab["image"], lab["mask"]), None
    unl, mix = dict(unl), dict(mix)
    gt = torch.cat([unl.pop("gt"), mix.pop("gt")])
    return Batch(lab["image"], lab["mask"], UnlabeledView(**unl), UnlabeledView(**mix)), gt


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


def build_optimizer(model, cfg: TrainConfig) -> torch.optim.SGD:
    """SGD with the head at `head_lr_mult` times the backbone's rate (UniMatch's recipe for
    a freshly initialised head; the config makes it 1 for a warm-started one)."""
    groups = [{"params": model.backbone_parameters(), "lr": cfg.lr}, {"params": model.head_parameters(), "lr": cfg.lr * cfg.head_lr_mult}]
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def poly_lr(optimizer: torch.optim.Optimizer, cfg: TrainConfig, t: int) -> float:
    lr = cfg.lr * (1 - t / cfg.iters) ** cfg.poly_power
    optimizer.param_groups[0]["lr"] = lr
    optimizer.param_groups[1]["lr"] = lr * cfg.head_lr_mult
    return lr


@torch.no_grad()
def update_ema(ema, model, steps: int, momentum: float) -> None:
    """Mean-teacher EMA after `steps` optimiser steps, with the usual warm-up of the momentum."""
    m = min(1 - 1 / (steps + 1), momentum)
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p, 1 - m)
    for e, b in zip(ema.buffers(), model.buffers()):
        e.copy_(b)


class MeasuredSelector:
    """The selector as a step calls it: the context it declares, an extra-pass count, and
    its time (the only part of the step timed). On CUDA the time is taken with events and
    read at log steps, so measuring it adds no synchronisation to the step."""

    def __init__(self, selector: Selector, log: RunLog, device: torch.device):
        self.selector, self.log, self.device = selector, log, device
        self._events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []

    def __call__(self, probs: Tensor, valid: Tensor, **available) -> Selection:
        context = build_context(self.selector, available)
        if "mc_logits" in context:  # the passes that ran, not the ones asked for
            self.log.cost["extra_forward_passes"] += context["mc_logits"].shape[0]
        if self.device.type != "cuda":
            start = time.perf_counter()
            selection = self.selector.select(probs, valid, **context)
            self.log.cost["selector_s"] += time.perf_counter() - start
            return selection
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        selection = self.selector.select(probs, valid, **context)
        end.record()
        self._events.append((start, end))
        return selection

    def charge(self) -> None:
        """Add the GPU time of the selections since the last call (waits for them)."""
        for start, end in self._events:
            end.synchronize()
            self.log.cost["selector_s"] += start.elapsed_time(end) / 1e3
        self._events.clear()


class Trainer:
    def __init__(self, config: TrainConfig, resume: bool = False, tracker: Tracker | None = None, show_progress: bool = True, on_log=None):
        cfg = self.config = config.validate()
        self.out = Path(cfg.out)
        self.replicas = Replicas.current()
        if cfg.replicas != self.replicas.world:
            raise ValueError(
                f"replicas={cfg.replicas} but this process is one of {self.replicas.world} workers; "
                "data-parallel runs start through bench.distributed.train_data_parallel (cslbench train replicas=N)"
            )
        if not resume and self.replicas.is_main and any((self.out / name).exists() for name in (RECORD, CHECKPOINT, PREVIOUS_CHECKPOINT)):
            status = (read_record_or_none(self.out) or {}).get("status", "no readable record")
            raise RunExistsError(f"{self.out} already holds a run ({status}); continue it with --resume, or pass out=<another folder>")
        self.device = resolve_device(cfg.device)
        if cfg.device == "auto":  # the record says what ran (and the hash: CUDA means bf16)
            cfg.device = self.device.type
        self.show_progress = show_progress
        self.on_log = on_log  # called with each logged point (Ray Tune reports through it)
        self.framework = FRAMEWORKS[cfg.framework]

        self.determinism = use_deterministic_kernels(cfg.deterministic)  # before the first CUDA op
        torch.manual_seed(cfg.seed)
        self.source = get_source(cfg.dataset, cfg.root, cfg.resize)
        self.num_classes = self.source.num_classes
        self.split = load_split(self.source, cfg.split_dir, cfg.split, cfg.labeled, cfg.eval_split)
        self.model = build_model(cfg, self.num_classes).to(self.device)
        if cfg.init_from:
            weights, cfg.init_from_hash = warm_start_weights(cfg.init_from, cfg.init_from_hash)
            self.model.load_state_dict(weights)
        self.ema = copy.deepcopy(self.model).eval().requires_grad_(False) if cfg.ema_teacher else None
        self.optimizer = build_optimizer(self.model, cfg)
        # What the step calls: the model itself, or its DistributedDataParallel wrapper
        self.net = DistributedDataParallel(self.model) if self.replicas.world > 1 else self.model
        semi = self.framework.semi_supervised
        if semi and not self.split.unlabeled:
            raise ValueError(f"framework={cfg.framework} needs unlabeled images, but split {self.split.origin} has none")
        self.selector = get_selector(cfg.selector, num_classes=self.num_classes, **cfg.selector_params) if semi else None
        self.log = RunLog(SelectionQualityMeter(self.num_classes, device=self.device) if semi else None, _replicas=self.replicas)
        self.select = MeasuredSelector(self.selector, self.log, self.device) if semi else None
        self.checks = DeferredChecks()
        self.start_iter = 0
        self.record = self._new_record()
        if resume:
            self._resume()
        if not self.replicas.is_main:
            tracker = Tracker()  # one W&B run per run: rank 0's
        self.tracker = tracker if tracker is not None else start_tracking(
            self.record["config"], self.out.name, self.out, cfg.wandb_project, cfg.wandb_group, cfg.wandb_mode,
            run_id=self.record.get("wandb_id"),
        )
        if self.tracker.run_id:  # a resumed run continues the same W&B run
            self.record["wandb_id"] = self.tracker.run_id

    def train_step(self, t: int, batch: Batch) -> StepOut:
        with self.autocast():
            out = self.framework.step(self.net, self.ema, self.select, batch, self.config, t)
        self.optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        self.optimizer.step()
        if self.ema is not None:
            update_ema(self.ema, self.model, t + 1, self.config.ema_momentum)
        return out

    def run(self) -> dict:
        cfg, log = self.config, self.log
        if self.record["status"] == "complete":
            print(f"{self.out}: already complete; nothing to do")
            return self.record
        self.record["status"] = "running"
        self._write_record()
        self.model.train()
        bar = tqdm(total=cfg.iters, initial=self.start_iter, desc=self.out.name, unit="it", disable=not self.show_progress, dynamic_ncols=True)
        t, failed = self.start_iter, True
        try:
            streams = [iter(loader) for loader in self._loaders()]
            log.start_clock()
            for t in range(self.start_iter, cfg.iters):
                loaded = [next(s) for s in streams]
                lr = poly_lr(self.optimizer, cfg, t)
                self.iteration(t, loaded)
                done = t + 1
                evaluated = done % cfg.eval_every == 0 or done == cfg.iters
                logged = evaluated or done % cfg.log_every == 0
                checkpointed = done % cfg.checkpoint_every == 0 and done < cfg.iters
                if logged or checkpointed:
                    self._read_step_results()  # the only host reads of the steps since the last
                if evaluated:
                    with log.untimed():
                        log.add_eval(self.validate(), done)
                if done in self.probe_points and self.replicas.is_main:
                    with log.untimed():
                        log.selection_probes.append(self.probe_selection(done))
                if logged:  # val_miou at the iteration it was measured
                    log.charge_time()
                    self._log(done, lr)
                    losses = {k.removeprefix("loss_") or k: f"{v:.3f}" for k, v in log.curves[-1].items() if k.startswith("loss")}
                    bar.set_postfix(**losses, val_miou=f"{log.last_val:.3f}")
                if checkpointed:
                    with log.untimed():
                        self._checkpoint(done)
                bar.update(1)
            self._read_step_results()
            log.charge_time()
            self._finish()
            failed = False
        except BaseException as exc:
            cause = self._deferred_failure() if isinstance(exc, Exception) and self.replicas.world == 1 else None
            reported = cause or exc
            self.record.update(status="failed", error=failure(reported, getattr(reported, "iteration", t + 1)), updated=_now())
            self.record["traceback"] = traceback.format_exc(limit=-8)
            self._write_record()
            if cause is not None:
                raise cause from exc
            raise
        finally:
            bar.close()
            self.tracker.finish(failed=failed)
        return read_record(self.out)  # the file is the source of truth (NaN stored as null)

    def iteration(self, t: int, loaded: list[dict]) -> None:
        """Training step t on the device: no host read, so on a GPU the CPU queues the next
        step while this one runs. Checks and numbers are read by `_read_step_results`."""
        batch, gt = split_truth(*(_to(b, self.device) for b in loaded))  # truth kept apart
        self.checks.iteration = t + 1
        with deferred_value_checks(self.checks):
            out = self.train_step(t, batch)
        if out.selection is not None:
            self.log.meter.update(out.selection, gt, ignore_index=IGNORE, valid=out.valid)
        self.log.add_step(t + 1, {"loss": out.loss, **out.parts})

    def _read_step_results(self) -> None:
        """Read what the steps left on the device: a diverged or misused step stops the run
        here, before its weights are evaluated or checkpointed, naming its iteration."""
        if self.select is not None:
            self.select.charge()
        problems = []
        bad_loss = self.log.first_nonfinite_loss()
        if bad_loss is not None:
            done, losses = bad_loss
            bad = {k: v for k, v in losses.items() if not math.isfinite(v)}
            shown = ", ".join(f"{k}={'NaN' if math.isnan(v) else v}" for k, v in bad.items())
            kind = "NaN" if any(map(math.isnan, bad.values())) else "infinite"
            problems.append((done, 1, DivergedError(f"loss is {kind} at iteration {done} ({shown})", done)))
        for f in self.checks.failures():
            if f.diverged:
                message = f"model output is NaN or infinite at iteration {f.iteration}: training diverged (try a lower lr)"
                problems.append((f.iteration, 0, DivergedError(message, f.iteration)))
            else:
                problems.append((f.iteration, 2, SelectorInputError(f"selector '{f.selector}': {f.message} (at iteration {f.iteration})", f.iteration)))
        # Data-parallel workers stop together: a worker left waiting in the next all_reduce
        # for one that raised would wait for ever.
        failed_workers = int(self.replicas.sum(torch.tensor([float(bool(problems))]))) if self.replicas.world > 1 else 0
        if problems:
            raise min(problems, key=lambda p: p[:2])[2]
        if failed_workers:
            raise RuntimeError(f"{failed_workers} other data-parallel worker(s) stopped (their error is in their log and the record)")

    def _deferred_failure(self) -> BaseException | None:
        """A divergence or misuse the device recorded before `exc` (a NaN step can make a
        later op fail first): the cause worth reporting, or None."""
        try:
            self._read_step_results()
        except (DivergedError, SelectorInputError) as found:
            return found
        except Exception:  # the device itself may be unusable after the failure
            return None
        return None

    # ------------------------------------------------------------------------------------
    # Data, evaluation
    # ------------------------------------------------------------------------------------
    def autocast(self):
        if self.device.type == "cuda" and self.config.amp:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _loaders(self):
        cfg = self.config
        scale = (cfg.scale_min, cfg.scale_max)
        seed = cfg.seed + RANK_SEED_STRIDE * self.replicas.rank  # each worker its own batches
        args = dict(iters=cfg.iters, seed=seed, start=self.start_iter, workers=cfg.workers, pin_memory=self.device.type == "cuda")
        norm = self.model.normalization
        lab = LabeledSet(self.source, self.split.labeled, cfg.crop, scale, cfg.seed, norm)
        loaders = [iteration_loader(lab, cfg.batch_size, stream=1, **args)]
        if self.framework.semi_supervised:
            unl = UnlabeledSet(self.source, self.split.unlabeled, cfg.crop, scale, cfg.seed, UNLABELED, cfg.csl_mask_view, cfg.blur_sigma, norm)
            mix = UnlabeledSet(self.source, self.split.unlabeled, cfg.crop, scale, cfg.seed, MIX, blur_sigma=cfg.blur_sigma, normalize=norm)
            loaders += [iteration_loader(unl, cfg.u_batch_size, stream=UNLABELED, **args), iteration_loader(mix, cfg.u_batch_size, stream=MIX, **args)]
        return loaders

    def _eval_loader(self, entries=None):
        entries = self.split.val if entries is None else entries
        return torch.utils.data.DataLoader(
            EvalSet(self.source, entries, self.model.normalization), batch_size=self.config.eval_batch_size, collate_fn=eval_collate, num_workers=self.config.workers, generator=torch.Generator()
        )

    @property
    def eval_model(self):
        """The model that is evaluated and reported: the EMA teacher when there is one."""
        return self.ema if self.ema is not None else self.model

    def validate(self, entries=None) -> dict:
        """mIoU on val (the curves, best-val), or on the given entries (the held-out test)."""
        cfg = self.config
        loader = self._eval_loader(entries)
        return evaluate(self.eval_model, loader, self.num_classes, cfg.eval_mode, cfg.eval_crop or cfg.crop, cfg.eval_stride, self.device, self.autocast)

    @property
    def probe_points(self) -> set[int]:
        """Iterations of the selection probes: evenly spaced, the last at the end."""
        n, iters = self.config.selection_probes, self.config.iters
        return {round(iters * k / n) for k in range(1, n + 1)} if n and self.framework.semi_supervised else set()

    def probe_selection(self, done: int) -> dict:
        """Every registered selector on the teacher's current predictions for the same
        unlabeled images, with the teacher's calibration: is confidence failing as
        self-training goes on? Its random draws (stochastic passes) leave training's alone."""
        from bench.analysis import calibration, predict, select_eval

        model = self.eval_model
        was_training = model.training
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.config.seed * 1_000_003 + done)
            model.eval()
            try:
                with self.autocast():  # the model as in training; selectors in fp32 (outside autocast)
                    preds = predict(model, self.source, self.split, self.device, self.config.selection_probe_images)
            finally:
                model.train(was_training)
            rows = select_eval(preds, bootstrap=500, seed=done)
        keep = ("coverage", "precision", "matched_threshold_precision", "precision_gain", "gain_ci", "auroc")
        probe = {
            "iter": done,
            "images": len(preds.probs),
            **calibration(preds),
            "selectors": {r["name"]: {k: r[k] for k in keep if k in r} for r in rows},
        }
        return json.loads(json.dumps(probe, default=float))  # plain floats: checkpoints load with weights_only

    def probe_unlabeled(self) -> dict | None:
        """Max-confidence AUROC for correctness on (up to probe_images) unlabeled images."""
        cfg = self.config
        if not cfg.probe_images or not self.split.unlabeled:
            return None
        loader = self._eval_loader(self.split.unlabeled[: cfg.probe_images])
        return confidence_probe(self.eval_model, loader, self.num_classes, self.device, self.autocast, cfg.probe_images)

    # ------------------------------------------------------------------------------------
    # Record, checkpoint, resume
    # ------------------------------------------------------------------------------------
    def _log(self, done: int, lr: float) -> None:
        point = self.log.log_point(done, lr)
        self.record.update(status="running", iteration=done, curves=self.log.curves, updated=_now(), cost=self.log.cost_summary(done, self.device))
        if self.log.selection_probes:
            self.record["selection_over_training"] = self.log.selection_probes
        self._write_record()
        self.tracker.log(point, step=done)
        if self.on_log is not None:
            self.on_log(point, done)

    def _finish(self) -> None:
        cfg, log = self.config, self.log
        final = log.last_eval if cfg.eval_split == "val" else self.validate(self.split.test)
        self.record.update(
            status="complete",
            iteration=cfg.iters,
            updated=_now(),
            final={
                "eval_split": cfg.eval_split,  # miou, per_class_iou and pixel_accuracy are on it
                "miou": final["miou"],
                "miou_last_val": log.last_eval["miou"],
                "miou_best_val": log.best_val[0],
                "best_val_iter": log.best_val[1],
                "best_val_note": BEST_VAL_NOTE,
                "per_class_iou": final["per_class_iou"],
                "pixel_accuracy": final["pixel_accuracy"],
                "unlabeled_probe": self.probe_unlabeled(),
            },
            selection=log.global_meter().compute() if log.meter is not None else None,
            selection_over_training=log.selection_probes or None,
            cost=log.cost_summary(cfg.iters, self.device),
        )
        self._checkpoint(cfg.iters)  # durable before the record says complete
        self._write_record()
        self.tracker.summary({"final_miou": final["miou"], "miou_best_val": log.best_val[0], **{f"selection_{k}": v for k, v in (self.record["selection"] or {}).items()}})

    def _new_record(self) -> dict:
        cfg, split = self.config, self.split
        return {
            "status": "running",
            "error": None,
            "name": self.out.name,
            "config": cfg.to_dict(),
            "config_hash": cfg.hash(),
            "splits": {
                "origin": split.origin,
                "sha256": split.sha256,
                "sizes": {"labeled": len(split.labeled), "unlabeled": len(split.unlabeled), "val": len(split.val), "test": len(split.test)},
            },
            "git_sha": git_sha(),
            "versions": library_versions(),
            "device": f"cuda: {torch.cuda.get_device_name(self.device)}" if self.device.type == "cuda" else f"cpu: {torch.get_num_threads()} threads",
            "determinism": self.determinism,
            "model": {**self.model.describe(), "peak_lr": {"backbone": cfg.lr, "head": cfg.lr * cfg.head_lr_mult}},
            "started": _now(),
            "updated": _now(),
            "iteration": 0,
            "curves": [],
            "final": None,
            "selection": None,
            "cost": None,
        }

    def _write_record(self) -> None:
        if self.replicas.is_main:
            write_record(self.out, self.record)

    def _checkpoint(self, done: int) -> None:
        state = {
            "iteration": done,
            "config_hash": self.config.hash(),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "selector": self.selector.state_dict() if self.selector is not None else None,
            "log": self.log.state_dict(),
            "rng": rng_state(),
        }  # built on every worker (the run log sums their counts), written by rank 0
        if self.replicas.is_main:
            save_checkpoint(self.out, state)

    def _resume(self) -> None:
        """Continue from the checkpoint. A record without one (failed early, skipped, or
        corrupt) holds no progress and is replaced; a complete one is kept as it is."""
        previous = read_record_or_none(self.out)  # a corrupt record is rebuilt from the checkpoint
        if previous is not None and previous.get("status") == "complete" and previous.get("config_hash") != self.config.hash():
            raise ResumeError(
                f"{self.out} holds a run with another config (hash {previous.get('config_hash')} vs "
                f"{self.config.hash()}); resume with the same config or choose another out="
            )
        state = load_checkpoint(self.out)
        if state is None:
            if previous is not None and previous.get("status") == "complete":
                self.record = previous
            return  # nothing saved yet: start from the beginning
        if state["config_hash"] != self.config.hash():
            raise ResumeError(
                f"checkpoint in {self.out} was written with another config (hash {state['config_hash']} vs "
                f"{self.config.hash()}); use the same config or another out="
            )
        if "log" not in state:
            raise ResumeError(f"checkpoint in {self.out} was written by an older cslbench (no run log); rerun it without --resume")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        if self.selector is not None:
            self.selector.load_state_dict(state["selector"])
        self.log.load_state_dict(state["log"])
        set_rng_state(state["rng"])
        self.start_iter = state["iteration"]
        if previous is not None:
            self.record.update(started=previous.get("started", self.record["started"]), wandb_id=previous.get("wandb_id"))
            if previous.get("status") == "complete" and self.start_iter >= self.config.iters:
                self.record = previous
        self.record["resumed_from"] = self.start_iter


def train(config: TrainConfig, resume: bool = False, show_progress: bool = True) -> dict:
    """One run: in this process, or on `config.replicas` data-parallel Ray Train workers."""
    if config.replicas > 1 and Replicas.current().world == 1:
        from bench.distributed import train_data_parallel

        return train_data_parallel(config, resume=resume)
    return Trainer(config, resume=resume, show_progress=show_progress).run()
