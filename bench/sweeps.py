"""Sweeps: a YAML grid of config overrides, run as Ray Tune trials.

A sweep file names its protocol, a `base` of config overrides shared by every trial, a
list of `methods` (each a named set of overrides), a `grid` of keys whose lists multiply
(seeds, label counts, ...), the per-trial `resources`, and optionally a `warm_start`
(one supervised run per seed that every trial then starts from) and a `search` block
(ASHA at reduced budget, for hyper-parameter search only). Every key is checked before
anything runs; an unknown key names the closest valid one.

Each trial is an ordinary `cslbench train` run in `<storage>/<sweep>/trials/<trial>` (warm
starts in `<storage>/<sweep>/warmup/`): its record.json is the source of truth. Trial folders are named by their overrides, so
`--resume` skips every trial whose record is complete and continues the others from
their checkpoints.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.config import ConfigError, TrainConfig, apply
from bench.suggest import did_you_mean, read_yaml_mapping

PROTOCOLS = ("synthetic", "classic", "blended", "u2pl", "cityscapes", "coco", "camvid", "ablation")


class SweepError(ValueError):
    pass


@dataclass
class Resources:
    cpu: float = 1.0
    gpu: float = 0.0


@dataclass
class WarmStart:
    iters: int = 600  # supervised iterations per seed before every trial


@dataclass
class Search:
    metric: str = "val_miou"
    mode: str = "max"
    num_samples: int = 8
    grace_period: int = 100  # iterations before ASHA may stop a trial
    reduction_factor: int = 3
    space: dict[str, Any] = field(default_factory=dict)  # key: {uniform|loguniform|choice: [...]}


@dataclass
class Sweep:
    name: str
    protocol: str
    description: str = ""
    base: dict[str, Any] = field(default_factory=dict)
    methods: list[dict[str, Any]] = field(default_factory=list)
    grid: dict[str, list] = field(default_factory=dict)
    resources: Resources = field(default_factory=Resources)
    warm_start: WarmStart | None = None
    search: Search | None = None

    def trials(self) -> list["Trial"]:
        """Every (method x grid point) as a named trial."""
        keys = list(self.grid)
        points = list(itertools.product(*(self.grid[k] for k in keys))) or [()]
        out = []
        for method in self.methods:
            name = method.get("name")
            overrides = {k: v for k, v in method.items() if k != "name"}
            for point in points:
                values = {**self.base, **overrides}
                parts = [name]
                for key, value in zip(keys, point):
                    if isinstance(value, dict):  # a named setting: several keys that go together
                        values.update(value)
                        parts.append(",".join(f"{k}={v}" for k, v in value.items() if k != "iters"))
                    else:
                        values[key] = value
                        parts.append(f"{key}={value}")
                out.append(Trial("-".join(parts), name, values))
        return out

    def warm_start_trials(self) -> list["Trial"]:
        if self.warm_start is None:
            return []
        seeds = self.grid.get("seed", [self.base.get("seed", 0)])
        base = {**self.base, "framework": "supervised", "iters": self.warm_start.iters, "eval_every": self.warm_start.iters}
        return [Trial(f"warmup-seed={s}", "warmup", {**base, "seed": s}) for s in seeds]


@dataclass
class Trial:
    label: str
    method: str
    overrides: dict[str, Any]

    def config(self, out: Path, sweep: str, init_from: str | None = None) -> TrainConfig:
        values = {**self.overrides, "out": str(out / self.label), "wandb_group": sweep}
        if init_from:
            values["init_from"] = init_from
        return apply(TrainConfig(), values, f"trial {self.label}").validate()


DISTRIBUTIONS = ("uniform", "loguniform", "choice", "randint")


def _distribution(key: str, spec: Any, where: str):
    from ray import tune

    if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in DISTRIBUTIONS:
        raise SweepError(f"{where}: search space '{key}' must be one of {{{' | '.join(DISTRIBUTIONS)}: [...]}}, got {spec!r}")
    (kind, args), = spec.items()
    return tune.choice(list(args)) if kind == "choice" else getattr(tune, kind)(*args)


def _check_keys(data: dict, cls, where: str) -> None:
    valid = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in valid:
            raise SweepError(f"{where}: unknown key '{key}'{did_you_mean(key, valid)}; valid keys: {', '.join(valid)}")


def load_sweep(path: str | Path) -> Sweep:
    path = Path(path)
    data = read_yaml_mapping(path, SweepError, "sweep file")
    _check_keys(data, Sweep, str(path))
    for key in ("name", "protocol", "methods"):
        if key not in data:
            raise SweepError(f"{path}: '{key}' is required")
    if data["protocol"] not in PROTOCOLS:
        raise SweepError(f"{path}: protocol '{data['protocol']}' is not one of {list(PROTOCOLS)}")
    sub = {}
    for key, cls in (("resources", Resources), ("warm_start", WarmStart), ("search", Search)):
        if data.get(key) is not None:
            if not isinstance(data[key], dict):
                raise SweepError(f"{path}: '{key}' must be a mapping")
            _check_keys(data[key], cls, f"{path} {key}")
            sub[key] = cls(**data[key])
    grid = data.get("grid") or {}
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise SweepError(f"{path}: grid '{key}' must be a non-empty list")
    methods = data["methods"]
    if not isinstance(methods, list) or not all(isinstance(m, dict) and "name" in m for m in methods):
        raise SweepError(f"{path}: methods must be a list of mappings, each with a 'name'")
    names = [m["name"] for m in methods]
    if len(set(names)) != len(names):
        raise SweepError(f"{path}: method names must be unique, got {names}")
    sweep = Sweep(
        name=data["name"], protocol=data["protocol"], description=data.get("description", ""),
        base=dict(data.get("base") or {}), methods=methods, grid=grid, **sub,
    )
    sweep.base.setdefault("protocol", sweep.protocol)
    if sweep.search is not None:
        for key, spec in sweep.search.space.items():
            _distribution(key, spec, str(path))
            if not key.startswith("selector.") and key not in {f.name for f in dataclasses.fields(TrainConfig)}:
                raise SweepError(f"{path}: search space key '{key}' is not a config key")
        if sweep.search.mode not in ("max", "min"):
            raise SweepError(f"{path}: search mode must be max or min, got {sweep.search.mode!r}")
    for trial in sweep.trials() + sweep.warm_start_trials():  # every config valid before anything runs
        try:
            trial.config(Path("/tmp/cslbench-check"), sweep.name)
        except (ConfigError, ValueError) as exc:
            raise SweepError(f"{path}: {exc}") from exc
    return sweep


# --------------------------------------------------------------------------------------
# Running on Ray Tune
# --------------------------------------------------------------------------------------
def trial_state(out: Path) -> str:
    """complete | partial (has a checkpoint) | new"""
    record = out / "record.json"
    if record.is_file():
        try:
            if json.loads(record.read_text()).get("status") == "complete":
                return "complete"
        except json.JSONDecodeError:
            pass
    return "partial" if (out / "checkpoint.pt").is_file() else "new"


def _trainable(params: dict, search: dict | None = None) -> None:
    """One Ray Tune trial: an ordinary training run, resumed if it has a checkpoint.
    `search` holds the values an ASHA search sampled for this trial."""
    import torch
    from ray import tune

    from bench.config import from_dict
    from bench.runtime import keep_freed_memory
    from bench.train import Trainer

    keep_freed_memory()
    torch.set_num_threads(max(1, int(params["threads"])))
    config = from_dict(params["config"])
    if search:
        apply(config, dict(search), "the search space")
        tag = hashlib.sha256(json.dumps(search, sort_keys=True).encode()).hexdigest()[:8]
        config.out = f"{config.out}-{tag}"
        config.validate()

    class Report:
        mode = "ray"

        def __init__(self, inner):
            self.inner = inner

        def log(self, metrics, step):
            self.inner.log(metrics, step)
            if "val_miou" in metrics:  # report at evaluations: what schedulers compare
                tune.report({k: v for k, v in metrics.items() if isinstance(v, (int, float))} | {"iter": step})

        def summary(self, values):
            self.inner.summary(values)

        def finish(self, failed=False):
            self.inner.finish(failed)

    from bench.tracking import start_tracking

    inner = start_tracking(config.to_dict(), Path(config.out).name, Path(config.out), config.wandb_project, config.wandb_group, config.wandb_mode)
    Trainer(config, resume=True, tracker=Report(inner), show_progress=False).run()


def run_sweep(
    sweep: Sweep,
    storage: str | Path,
    resume: bool = False,
    address: str | None = None,
    max_concurrent: int | None = None,
    verbose: int = 1,
) -> Path:
    """Run every trial not yet complete; return the folder holding the trials."""
    import ray
    from ray import tune

    root = Path(storage).expanduser().resolve() / sweep.name
    trials_dir = root / "trials"
    warm_dir = root / "warmup"
    existing = [t for t in sweep.trials() if trial_state(trials_dir / t.label) != "new"]
    existing += [t for t in sweep.warm_start_trials() if trial_state(warm_dir / t.label) != "new"]
    if existing and not resume:
        raise SweepError(
            f"{trials_dir} already holds {len(existing)} trials of this sweep; pass --resume to continue it "
            "(finished trials are kept) or choose another --storage"
        )
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    address = address or os.environ.get("RAY_ADDRESS")
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=verbose > 1, configure_logging=False) if address else ray.init(
            include_dashboard=False, log_to_driver=verbose > 1, configure_logging=False
        )
    class Progress(tune.Callback):
        """One line per finished trial (Ray's own tables with --verbose)."""

        def __init__(self, total: int, tag: str):
            self.total, self.tag, self.done = total, tag, 0

        def on_trial_complete(self, iteration, trials, trial, **info):
            self.done += 1
            result = trial.last_result or {}
            miou = result.get("val_miou")
            shown = f"val mIoU {100 * miou:.1f}" if isinstance(miou, float) else ""
            print(f"[{self.tag} {self.done}/{self.total}] {trial.config['trial']['label']} done {shown}", flush=True)

        def on_trial_error(self, iteration, trials, trial, **info):
            self.done += 1
            print(f"[{self.tag} {self.done}/{self.total}] {trial.config['trial']['label']} FAILED (see its record.json)", flush=True)

    trainable = tune.with_resources(lambda p: _trainable(p["trial"], p.get("search")), {"cpu": sweep.resources.cpu, "gpu": sweep.resources.gpu})
    threads = max(1, int(sweep.resources.cpu))

    def stage(trials: list[Trial], folder: Path, tag: str, init: dict[int, str] | None = None) -> None:
        todo = [t for t in trials if trial_state(folder / t.label) != "complete"]
        if not todo:
            return
        print(f"{sweep.name} {tag}: {len(todo)} trials to run ({len(trials) - len(todo)} already complete)", flush=True)
        configs = [
            {
                "config": t.config(folder, sweep.name, (init or {}).get(t.overrides.get("seed", 0))).to_dict(),
                "threads": threads,
                "label": t.label,
            }
            for t in todo
        ]
        tune.Tuner(
            trainable,
            param_space={"trial": tune.grid_search(configs)},
            tune_config=tune.TuneConfig(
                max_concurrent_trials=max_concurrent,
                trial_dirname_creator=lambda tr: tr.config["trial"]["label"],
                trial_name_creator=lambda tr: tr.config["trial"]["label"],
            ),
            run_config=tune.RunConfig(
                name=f"{sweep.name}-{tag}",
                storage_path=str(root / "ray"),
                verbose=verbose,
                failure_config=tune.FailureConfig(max_failures=0),
                callbacks=[Progress(len(todo), tag)] if verbose < 2 else [],
            ),
        ).fit()

    if sweep.search is not None:
        return _search(sweep, trainable, root / "search", threads, max_concurrent, verbose)
    warm = sweep.warm_start_trials()
    stage(warm, warm_dir, "warmup")
    init = {t.overrides.get("seed", 0): str(warm_dir / t.label) for t in warm}
    stage(sweep.trials(), trials_dir, "main", init if warm else None)
    return trials_dir


def _search(sweep: Sweep, trainable, folder: Path, threads: int, max_concurrent, verbose: int) -> Path:
    """ASHA at reduced budget: for choosing hyper-parameters, never for reporting."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    s = sweep.search
    space = {k: _distribution(k, v, sweep.name) for k, v in s.space.items()}
    for trial in sweep.trials():
        config = trial.config(folder, sweep.name).to_dict()
        scheduler = ASHAScheduler(
            time_attr="iter", metric=s.metric, mode=s.mode, max_t=config["iters"],
            grace_period=s.grace_period, reduction_factor=s.reduction_factor,
        )
        tune.Tuner(
            trainable,
            param_space={"trial": {"config": config, "threads": threads, "label": trial.label}, "search": space},
            tune_config=tune.TuneConfig(num_samples=s.num_samples, scheduler=scheduler, max_concurrent_trials=max_concurrent),
            run_config=tune.RunConfig(name=f"{sweep.name}-search", storage_path=str(folder.parent / "ray"), verbose=max(verbose, 1)),
        ).fit()
    return folder
