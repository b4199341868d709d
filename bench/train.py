"""The training harness: one semi-supervised loop in which only the selector changes.

`Trainer.train_step` is the whole algorithm and reads top to bottom: predictions on the
weak views, selection, CutMix, strong views (and CSL's masking view), losses. Everything
else here is bookkeeping: data streams, evaluation, the run record, checkpoints, W&B.
"""

from __future__ import annotations

import contextlib
import copy
import math
import resource
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch import Tensor
from tqdm import tqdm

from bench.config import TrainConfig
from bench.data.loaders import MIX, UNLABELED, EvalSet, LabeledSet, UnlabeledSet, iteration_loader
from bench.data.sources import get_source
from bench.data.splits import load_split
from bench.evaluate import confidence_probe, evaluate
from bench.losses import PseudoTargets, pseudo_label_loss, supervised_loss
from bench.metrics import SelectionQualityMeter
from bench.models import build_model
from bench.records import (
    CHECKPOINT,
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
from bench.selection import get_selector
from bench.tracking import Tracker, start_tracking
from csl.masking import hide_pixels, reliable_block_mask

IGNORE = 255
BEST_VAL_NOTE = "best validation mIoU over all evaluations: model selection on val, not a held-out result"


class ResumeError(RuntimeError):
    pass


class DivergedError(RuntimeError):
    """The loss stopped being a number: training on would only produce noise."""


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


def _warm_start(path: str, expected_hash: str | None) -> tuple[dict, str | None]:
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


def _paste(images: Tensor, source: Tensor, box: Tensor) -> Tensor:
    return torch.where(box.unsqueeze(1), source, images)


class Trainer:
    def __init__(
        self,
        config: TrainConfig,
        resume: bool = False,
        tracker: Tracker | None = None,
        show_progress: bool = True,
        on_log=None,
    ):
        self.config = config.validate()
        self.out = Path(config.out)
        self.device = resolve_device(config.device)
        if config.device == "auto":  # the record says what ran (and the hash: CUDA means bf16)
            config.device = self.device.type
        self.show_progress = show_progress
        self.on_log = on_log  # called with each logged point (Ray Tune reports through it)
        cfg = config

        torch.manual_seed(cfg.seed)
        self.source = get_source(cfg.dataset, cfg.root)
        self.num_classes = self.source.num_classes
        self.split = load_split(self.source, cfg.split_dir, cfg.split, cfg.labeled)
        self.model = build_model(cfg, self.num_classes).to(self.device)
        if cfg.init_from:
            weights, cfg.init_from_hash = _warm_start(cfg.init_from, cfg.init_from_hash)
            self.model.load_state_dict(weights)
        self.ema = copy.deepcopy(self.model).eval().requires_grad_(False) if cfg.ema_teacher else None
        self.optimizer = torch.optim.SGD(
            [
                {"params": self.model.backbone_parameters(), "lr": cfg.lr},
                {"params": self.model.head_parameters(), "lr": cfg.lr * cfg.head_lr_mult},
            ],
            lr=cfg.lr,
            momentum=cfg.momentum,
            weight_decay=cfg.weight_decay,
        )
        self.semi = cfg.framework != "supervised"
        if self.semi and not self.split.unlabeled:
            raise ValueError(f"framework={cfg.framework} needs unlabeled images, but split {self.split.origin} has none")
        self.selector = get_selector(cfg.selector, num_classes=self.num_classes, **cfg.selector_params) if self.semi else None
        self.meter = SelectionQualityMeter(self.num_classes)  # over all of training
        self.meter_at_log = self.meter.state_dict()  # the meter at the last log step
        self.start_iter = 0
        self.curves: list[dict] = []
        self.best_val = (math.nan, -1)
        self.cost = {"wall_s": 0.0, "selector_s": 0.0, "extra_forward_passes": 0}
        self.pending_losses: dict[str, float] = {}
        self.pending_steps = 0
        self.last_val = math.nan
        self.pending_eval: dict = {}
        self.iteration = 0
        self.record = self._new_record()
        if resume:
            self._resume()
        self.tracker = tracker if tracker is not None else start_tracking(
            self.record["config"], self.out.name, self.out, cfg.wandb_project, cfg.wandb_group, cfg.wandb_mode,
            run_id=self.record.get("wandb_id"),
        )
        if self.tracker.run_id:  # a resumed run continues the same W&B run
            self.record["wandb_id"] = self.tracker.run_id

    # ------------------------------------------------------------------------------------
    # The algorithm
    # ------------------------------------------------------------------------------------
    def train_step(self, t: int, lab: dict, unl: dict | None, mix: dict | None) -> dict[str, float]:
        cfg, model = self.config, self.model
        x, y = lab["image"], lab["mask"]
        with self.autocast():
            if not self.semi:
                loss_x = supervised_loss(model(x), y)
                self._backward(loss_x)
                return {"loss": loss_x.item(), "loss_x": loss_x.item()}

            # 1. Predictions on the labelled batch and the weak unlabeled views.
            bx, bu = x.shape[0], unl["weak"].shape[0]
            student_in = torch.cat([x, unl["weak"]])
            if cfg.framework == "unimatch":
                pred, pred_fp = model(student_in, need_fp=True)
                pred_fp = pred_fp[bx:]
            else:
                pred = model(student_in)
            pred_x = pred[:bx]
            weak_logits = self.teacher_logits(unl["weak"], mix["weak"], pred[bx:].detach())

            # 2. Selection on both weak batches (the mix source gets its own).
            valid = torch.cat([unl["valid"], mix["valid"]])
            selection = self.select(weak_logits.float().softmax(1), valid, pred_x.detach(), y, unl, mix, t)
            target_u, target_mix = PseudoTargets.from_selection(selection, valid).split([bu, bu])

            # 3. Strong views: CutMix pastes the mix batch's image and everything it was
            #    selected with; CSL's masking view (no CutMix) replaces the second view.
            views = [_paste(unl["strong1"], mix["strong1"], unl["box1"])]
            targets = [target_u.paste(target_mix, unl["box1"])]
            if cfg.framework == "unimatch":
                if cfg.csl_mask_view:
                    views.append(self.masking_view(unl, target_u, selection.reliable[:bu], t))
                    targets.append(target_u)
                else:
                    views.append(_paste(unl["strong2"], mix["strong2"], unl["box2"]))
                    targets.append(target_u.paste(target_mix, unl["box2"]))
            preds_strong = model(torch.cat(views)).split(bu)

            # 4. Losses.
            losses = {"loss_x": supervised_loss(pred_x, y)}
            strong = [pseudo_label_loss(p, tg, cfg.normaliser) for p, tg in zip(preds_strong, targets)]
            if cfg.framework == "fixmatch":
                losses["loss_s"] = strong[0]
                loss = (losses["loss_x"] + losses["loss_s"]) / 2
            else:
                losses["loss_fp"] = pseudo_label_loss(pred_fp, target_u, cfg.normaliser)
                losses["loss_s"] = strong[0]
                losses["loss_mask" if cfg.csl_mask_view else "loss_s2"] = strong[1]
                loss = (losses["loss_x"] + 0.25 * strong[0] + 0.25 * strong[1] + 0.5 * losses["loss_fp"]) / 2
        self._backward(loss)
        return {"loss": loss.item(), **{k: v.item() for k, v in losses.items()}}

    @torch.no_grad()
    def teacher_logits(self, weak: Tensor, weak_mix: Tensor, student_weak: Tensor) -> Tensor:
        """Logits that the pseudo-labels come from: the EMA teacher on both weak batches, or
        (UniMatch) the student's own prediction on the weak view plus an eval-mode pass on
        the mix batch."""
        if self.ema is not None:
            return self.ema(torch.cat([weak, weak_mix]))
        self.model.eval()
        mix_logits = self.model(weak_mix)
        self.model.train()
        return torch.cat([student_weak, mix_logits])

    def select(self, probs, valid, labeled_logits, labeled_target, unl, mix, t):
        """Run the selector with the context it declares, time it, and score it against
        the hidden truth; the truth goes to the meter only."""
        sel = self.selector
        context = {"progress": t / self.config.iters}
        if "labeled_probs" in sel.context_keys:
            context.update(labeled_probs=labeled_logits.float().softmax(1), labeled_target=labeled_target)
        if sel.mc_passes:
            context["mc_logits"] = self.mc_logits(torch.cat([unl["weak"], mix["weak"]]), sel.mc_passes)
            self.cost["extra_forward_passes"] += sel.mc_passes
        context = {k: v for k, v in context.items() if k in sel.context_keys}
        if not torch.isfinite(probs).all():  # weights went non-finite on the last step
            raise DivergedError(f"model output is NaN or infinite at iteration {t + 1}: training diverged (try a lower lr)")
        self._sync()
        start = time.perf_counter()
        selection = sel.select(probs, valid, **context)
        self._sync()
        self.cost["selector_s"] += time.perf_counter() - start
        gt = torch.cat([unl["gt"], mix["gt"]])
        self.meter.update(selection, gt, ignore_index=IGNORE, valid=valid)
        return selection

    @torch.no_grad()
    def mc_logits(self, weak: Tensor, passes: int) -> Tensor:
        teacher = self.ema if self.ema is not None else self.model
        was_training = teacher.training
        teacher.eval()
        out = torch.stack([teacher(weak, stochastic=True).float() for _ in range(passes)])
        teacher.train(was_training)
        return out

    def masking_view(self, unl: dict, target: PseudoTargets, reliable: Tensor, t: int) -> Tensor:
        """CSL: hide reliable pixels inside random 32x32 blocks of the images drawn for
        hiding (mild jitter); the others keep an ordinary strong view."""
        g = torch.Generator(device="cpu").manual_seed(self.config.seed * 1_000_003 + t)
        hidden = reliable_block_mask(reliable, self.config.mask_block, self.config.mask_ratio, generator=g)
        hidden &= unl["hide"].view(-1, 1, 1)
        return hide_pixels(unl["masked"], hidden)

    def _backward(self, loss: Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        if self.ema is not None:
            self._update_ema()

    @torch.no_grad()
    def _update_ema(self) -> None:
        steps = self.iteration + 1
        m = min(1 - 1 / (steps + 1), self.config.ema_momentum)
        for e, p in zip(self.ema.parameters(), self.model.parameters()):
            e.lerp_(p, 1 - m)
        for e, b in zip(self.ema.buffers(), self.model.buffers()):
            e.copy_(b)

    # ------------------------------------------------------------------------------------
    # The loop and its bookkeeping
    # ------------------------------------------------------------------------------------
    def autocast(self):
        if self.device.type == "cuda" and self.config.amp:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _set_lr(self, t: int) -> float:
        cfg = self.config
        lr = cfg.lr * (1 - t / cfg.iters) ** cfg.poly_power
        self.optimizer.param_groups[0]["lr"] = lr
        self.optimizer.param_groups[1]["lr"] = lr * cfg.head_lr_mult
        return lr

    def _loaders(self):
        cfg = self.config
        scale = (cfg.scale_min, cfg.scale_max)
        args = dict(iters=cfg.iters, seed=cfg.seed, start=self.start_iter, workers=cfg.workers)
        lab = LabeledSet(self.source, self.split.labeled, cfg.crop, scale, cfg.seed)
        loaders = [iteration_loader(lab, cfg.batch_size, stream=1, **args)]
        if self.semi:
            unl = UnlabeledSet(self.source, self.split.unlabeled, cfg.crop, scale, cfg.seed, UNLABELED, cfg.csl_mask_view)
            mix = UnlabeledSet(self.source, self.split.unlabeled, cfg.crop, scale, cfg.seed, MIX)
            loaders += [iteration_loader(unl, cfg.u_batch_size, stream=UNLABELED, **args), iteration_loader(mix, cfg.u_batch_size, stream=MIX, **args)]
        return loaders

    def _eval_loader(self, entries=None):
        entries = self.split.val if entries is None else entries
        return torch.utils.data.DataLoader(
            EvalSet(self.source, entries), batch_size=1, num_workers=self.config.workers, generator=torch.Generator()
        )

    def probe_unlabeled(self) -> dict | None:
        """Max-confidence AUROC for correctness on (up to probe_images) unlabeled images."""
        cfg = self.config
        if not cfg.probe_images or not self.split.unlabeled:
            return None
        model = self.ema if self.ema is not None else self.model
        loader = self._eval_loader(self.split.unlabeled[: cfg.probe_images])
        return confidence_probe(model, loader, self.num_classes, self.device, self.autocast, cfg.probe_images)

    def evaluate(self) -> dict:
        cfg = self.config
        crop = cfg.eval_crop or cfg.crop
        model = self.ema if self.ema is not None else self.model
        return evaluate(model, self._eval_loader(), self.num_classes, cfg.eval_mode, crop, cfg.eval_stride, self.device, self.autocast)

    def run(self) -> dict:
        cfg = self.config
        if self.record["status"] == "complete":
            print(f"{self.out}: already complete; nothing to do")
            return self.record
        self.record["status"] = "running"
        write_record(self.out, self.record)
        self.model.train()
        bar = tqdm(total=cfg.iters, initial=self.start_iter, desc=self.out.name, unit="it", disable=not self.show_progress, dynamic_ncols=True)
        self.iteration = self.start_iter
        failed = True
        try:
            streams = [iter(loader) for loader in self._loaders()]
            t_mark = time.perf_counter()
            for t in range(self.start_iter, cfg.iters):
                self.iteration = t
                lr = self._set_lr(t)
                batches = [_to(next(s), self.device) for s in streams]
                lab, unl, mix = (batches + [None, None])[:3]
                losses = self.train_step(t, lab, unl, mix)
                done = t + 1
                bad = {k: v for k, v in losses.items() if not math.isfinite(v)}
                if bad:
                    shown = ", ".join(f"{k}={'NaN' if math.isnan(v) else v}" for k, v in bad.items())
                    raise DivergedError(f"loss is {'NaN' if any(map(math.isnan, bad.values())) else 'infinite'} at iteration {done} ({shown})")
                self._accumulate(losses)
                evaluated = done % cfg.eval_every == 0 or done == cfg.iters
                if evaluated:  # evaluation time is not training time
                    self.cost["wall_s"] += time.perf_counter() - t_mark
                    self._record_eval(done)
                    t_mark = time.perf_counter()
                if evaluated or done % cfg.log_every == 0:  # val_miou at the iteration it was measured
                    now = time.perf_counter()
                    self.cost["wall_s"] += now - t_mark
                    t_mark = now
                    self._log(done, lr)
                    if self.on_log is not None:
                        self.on_log(self.curves[-1], done)
                    last = self.curves[-1]
                    shown = {k.removeprefix("loss_") or k: f"{v:.3f}" for k, v in last.items() if k.startswith("loss")}
                    bar.set_postfix(**shown, val_miou=f"{self.last_val:.3f}")
                if done % cfg.checkpoint_every == 0 and done < cfg.iters:  # not training time either
                    self.cost["wall_s"] += time.perf_counter() - t_mark
                    self._checkpoint(done)
                    t_mark = time.perf_counter()
                bar.update(1)
            self.cost["wall_s"] += time.perf_counter() - t_mark
            self._finish()
            failed = False
        except BaseException as exc:
            self.record.update(status="failed", error=failure(exc, self.iteration + 1), updated=_now())
            self.record["traceback"] = traceback.format_exc(limit=-8)
            write_record(self.out, self.record)
            raise
        finally:
            bar.close()
            self.tracker.finish(failed=failed)
        return read_record(self.out)  # the file is the source of truth (NaN stored as null)

    def _accumulate(self, losses: dict[str, float]) -> None:
        for k, v in losses.items():
            self.pending_losses[k] = self.pending_losses.get(k, 0.0) + v
        self.pending_steps += 1

    def _record_eval(self, done: int) -> None:
        result = self.evaluate()
        self.last_val = result["miou"]
        self.last_eval = result
        if not (self.best_val[0] >= result["miou"]):  # NaN-safe: first evaluation wins
            self.best_val = (result["miou"], done)
        self.pending_eval = {"val_miou": result["miou"]}

    def _log(self, done: int, lr: float) -> None:
        point = {"iter": done, "lr": lr}
        point.update({k: v / max(self.pending_steps, 1) for k, v in self.pending_losses.items()})
        if self.semi:
            q = self.meter.since(self.meter_at_log)
            point.update(sel_precision=q["precision"], sel_recall=q["recall"], sel_coverage=q["coverage"], sel_weighted_precision=q["weighted_precision"])
            self.meter_at_log = self.meter.state_dict()
        point.update(self.pending_eval)
        self.pending_eval = {}
        self.pending_losses, self.pending_steps = {}, 0
        self.curves.append(point)
        self.record.update(status="running", iteration=done, curves=self.curves, updated=_now(), cost=self._cost(done))
        write_record(self.out, self.record)
        self.tracker.log(point, step=done)

    def _cost(self, done: int) -> dict:
        trained = max(done, 1)
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device) / 2**20
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
        return {
            "wall_s": self.cost["wall_s"],
            "iters": done,
            "it_per_s": trained / self.cost["wall_s"] if self.cost["wall_s"] else math.nan,
            "selector_ms_per_iter": 1e3 * self.cost["selector_s"] / trained,
            "extra_forward_passes": self.cost["extra_forward_passes"],
            "peak_mem_mb": peak,
            "peak_mem_kind": "cuda max_memory_allocated" if self.device.type == "cuda" else "process max RSS",
        }

    def _finish(self) -> None:
        cfg = self.config
        final = self.last_eval
        self.record.update(
            status="complete",
            iteration=cfg.iters,
            updated=_now(),
            final={
                "miou": final["miou"],
                "miou_best_val": self.best_val[0],
                "best_val_iter": self.best_val[1],
                "best_val_note": BEST_VAL_NOTE,
                "per_class_iou": final["per_class_iou"],
                "pixel_accuracy": final["pixel_accuracy"],
                "unlabeled_probe": self.probe_unlabeled(),
            },
            selection=self.meter.compute() if self.semi else None,
            cost=self._cost(cfg.iters),
        )
        self._checkpoint(cfg.iters)  # durable before the record says complete
        write_record(self.out, self.record)
        self.tracker.summary({"final_miou": final["miou"], "miou_best_val": self.best_val[0], **{f"selection_{k}": v for k, v in (self.record["selection"] or {}).items()}})

    # ------------------------------------------------------------------------------------
    # Record, checkpoint, resume
    # ------------------------------------------------------------------------------------
    def _new_record(self) -> dict:
        cfg = self.config
        return {
            "status": "running",
            "error": None,
            "name": self.out.name,
            "config": cfg.to_dict(),
            "config_hash": cfg.hash(),
            "splits": {
                "origin": self.split.origin,
                "sha256": self.split.sha256,
                "sizes": {"labeled": len(self.split.labeled), "unlabeled": len(self.split.unlabeled), "val": len(self.split.val)},
            },
            "git_sha": git_sha(),
            "versions": library_versions(),
            "device": self._device_name(),
            "started": _now(),
            "updated": _now(),
            "iteration": 0,
            "curves": [],
            "final": None,
            "selection": None,
            "cost": None,
        }

    def _device_name(self) -> str:
        if self.device.type == "cuda":
            return f"cuda: {torch.cuda.get_device_name(self.device)}"
        return f"cpu: {torch.get_num_threads()} threads"

    def _checkpoint(self, done: int) -> None:
        state = {
            "iteration": done,
            "config_hash": self.config.hash(),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "selector": self.selector.state_dict() if self.selector is not None else None,
            "rng": rng_state(),
            "meter": self.meter.state_dict(),
            "meter_at_log": self.meter_at_log,
            "curves": self.curves,
            "best_val": list(self.best_val),
            "last_eval": getattr(self, "last_eval", None),
            "cost": dict(self.cost),
            "pending": {"losses": self.pending_losses, "steps": self.pending_steps, "eval": self.pending_eval},
        }
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
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        if self.selector is not None:
            self.selector.load_state_dict(state["selector"])
        self.meter.load_state_dict(state["meter"])
        self.meter_at_log = {k: v.clone() for k, v in state["meter_at_log"].items()}
        set_rng_state(state["rng"])
        self.start_iter = state["iteration"]
        self.curves = state["curves"]
        self.best_val = tuple(state["best_val"])
        if state["last_eval"] is not None:
            self.last_eval = state["last_eval"]
            self.last_val = state["last_eval"]["miou"]
        self.cost = state["cost"]
        self.pending_losses = state["pending"]["losses"]
        self.pending_steps = state["pending"]["steps"]
        self.pending_eval = state["pending"]["eval"]
        if previous is not None:
            self.record.update(started=previous.get("started", self.record["started"]), wandb_id=previous.get("wandb_id"))
            if previous.get("status") == "complete" and self.start_iter >= self.config.iters:
                self.record = previous
        self.record["resumed_from"] = self.start_iter


def train(config: TrainConfig, resume: bool = False, show_progress: bool = True) -> dict:
    return Trainer(config, resume=resume, show_progress=show_progress).run()
