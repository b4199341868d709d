"""Everything a run is made of, built from its config: data, model, teacher, optimiser,
the selector seam and the run log, plus how to feed and evaluate them.

`build_run(config)` is the only place these are wired together; the loop, the checkpoint
and the evaluator read them from the `RunParts` it returns.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from bench.contract import get_selector
from bench.contract.metrics import SelectionQualityMeter
from bench.data.loaders import MIX, UNLABELED, EvalSet, LabeledSet, UnlabeledSet, eval_collate, iteration_loader
from bench.data.sources import Source, get_source
from bench.data.splits import Split, load_split
from bench.harness.banking import BankRecorder
from bench.harness.checkpoint import warm_start_weights
from bench.harness.config import TrainConfig
from bench.harness.device import resolve_device
from bench.harness.frameworks import FRAMEWORKS, Batch, Framework, UnlabeledView
from bench.harness.models import DeepLabV3Plus, build_model
from bench.harness.replicas import RANK_SEED_STRIDE, Replicas
from bench.harness.runlog import RunLog
from bench.harness.runtime import use_deterministic_kernels
from bench.harness.seam import SelectorSeam, StateFollowers, runs_with_defaults


@dataclass
class RunParts:
    config: TrainConfig
    out: Path
    device: torch.device
    determinism: dict
    replicas: Replicas
    framework: Framework
    source: Source
    split: Split
    model: DeepLabV3Plus
    ema: DeepLabV3Plus | None  # the mean teacher, when the config asks for one
    net: nn.Module  # what the step calls: the model, or its DistributedDataParallel wrapper
    optimizer: torch.optim.SGD
    seam: SelectorSeam | None  # semi-supervised runs
    log: RunLog
    bank: BankRecorder | None = None  # bank_points > 0: the teacher's predictions kept in out/bank

    @property
    def num_classes(self) -> int:
        return self.source.num_classes

    @property
    def eval_model(self) -> DeepLabV3Plus:
        """The model that is evaluated and reported: the EMA teacher when there is one."""
        return self.ema if self.ema is not None else self.model

    def autocast(self):
        if self.device.type == "cuda" and self.config.amp:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def train_loaders(self, start: int) -> list:
        """The labelled stream and (semi-supervised) the two unlabelled ones, from iteration `start`."""
        cfg = self.config
        scale = (cfg.scale_min, cfg.scale_max)
        seed = cfg.seed + RANK_SEED_STRIDE * self.replicas.rank  # each worker its own batches
        args = dict(iters=cfg.iters, seed=seed, start=start, workers=cfg.workers, pin_memory=self.device.type == "cuda")
        norm = self.model.normalization
        lab = LabeledSet(self.source, self.split.labeled, cfg.crop, scale, cfg.seed, norm)
        loaders = [iteration_loader(lab, cfg.batch_size, stream=1, **args)]
        if self.framework.semi_supervised:
            unl = UnlabeledSet(self.source, self.split.unlabeled, cfg.crop, scale, cfg.seed, UNLABELED, cfg.csl_mask_view, cfg.blur_sigma, norm)
            mix = UnlabeledSet(self.source, self.split.unlabeled, cfg.crop, scale, cfg.seed, MIX, blur_sigma=cfg.blur_sigma, normalize=norm)
            loaders += [iteration_loader(unl, cfg.u_batch_size, stream=UNLABELED, **args), iteration_loader(mix, cfg.u_batch_size, stream=MIX, **args)]
        return loaders

    def eval_loader(self, entries=None):
        """Whole images of `entries` (default: val), in order."""
        entries = self.split.val if entries is None else entries
        return torch.utils.data.DataLoader(
            EvalSet(self.source, entries, self.model.normalization), batch_size=self.config.eval_batch_size, collate_fn=eval_collate,
            num_workers=self.config.workers, generator=torch.Generator(),
        )


def build_run(config: TrainConfig) -> RunParts:
    cfg = config.validate()
    replicas = Replicas.current()
    if cfg.replicas != replicas.world:
        raise ValueError(
            f"replicas={cfg.replicas} but this process is one of {replicas.world} workers; "
            "data-parallel runs start through bench.harness.launch.train_data_parallel (cslbench train replicas=N)"
        )
    device = resolve_device(cfg.device)
    if cfg.device == "auto":  # the record says what ran (and the hash: CUDA means bf16)
        cfg.device = device.type
    framework = FRAMEWORKS[cfg.framework]
    determinism = use_deterministic_kernels(cfg.deterministic)  # before the first CUDA op
    torch.manual_seed(cfg.seed)
    source = get_source(cfg.dataset, cfg.root, cfg.resize)
    split = load_split(source, cfg.split_dir, cfg.split, cfg.labeled, cfg.eval_split)
    model = build_model(cfg, source.num_classes).to(device)
    if cfg.init_from:
        weights, cfg.init_from_hash = warm_start_weights(cfg.init_from, cfg.init_from_hash)
        model.load_state_dict(weights)
    ema = copy.deepcopy(model).eval().requires_grad_(False) if cfg.ema_teacher else None
    semi = framework.semi_supervised
    if semi and not split.unlabeled:
        raise ValueError(f"framework={cfg.framework} needs unlabeled images, but split {split.origin} has none")
    seam = None
    if semi:
        selector = get_selector(cfg.selector, num_classes=source.num_classes, **cfg.selector_params)
        skip = selector.name if runs_with_defaults(selector) else None  # its own state is the one a bank stores
        followers = StateFollowers(source.num_classes, skip) if cfg.bank_points else None  # their states go into the bank
        seam = SelectorSeam(selector, device, followers)
    meter = SelectionQualityMeter(source.num_classes, device=device) if semi else None
    return RunParts(
        cfg, Path(cfg.out), device, determinism, replicas, framework, source, split, model, ema,
        net=DistributedDataParallel(model) if replicas.world > 1 else model,
        optimizer=build_optimizer(model, cfg), seam=seam, log=RunLog(meter, _replicas=replicas),
        bank=BankRecorder(Path(cfg.out) / "bank", cfg, source, split, cfg.bank_images) if semi and cfg.bank_points else None,
    )


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


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if isinstance(v, Tensor) else v for k, v in batch.items()}


def split_truth(lab: dict, unl: dict | None = None, mix: dict | None = None) -> tuple[Batch, Tensor | None]:
    """The step's batch, and apart from it the unlabelled ground truth (for the meter only)."""
    if unl is None:
        return Batch(lab["image"], lab["mask"]), None
    unl, mix = dict(unl), dict(mix)
    gt = torch.cat([unl.pop("gt"), mix.pop("gt")])
    return Batch(lab["image"], lab["mask"], UnlabeledView(**unl), UnlabeledView(**mix)), gt
