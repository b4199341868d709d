"""Sweeps: a YAML grid of config overrides, run as Ray Tune trials.

A sweep file names its protocol, a `base` of config overrides shared by every trial, a
list of `methods` (each a named set of overrides), a `grid` of keys whose lists multiply
(seeds, label counts, ...), the per-trial `resources`, and optionally a `warm_start`
(one supervised run per seed that every trial then starts from, or with `seed:` one run
shared by every trial) and a `search` block
(ASHA at reduced budget, for hyper-parameter search only). Every key is checked before
anything runs; an unknown key names the closest valid one.

Each trial is an ordinary `cslbench train` run in `<storage>/<sweep>/trials/<trial>` (warm
starts in `<storage>/<sweep>/warmup/`): its record.json is the source of truth. Trial
folders are named by their overrides, so `--resume` skips every trial whose record is
complete and continues the others from their checkpoints; a finished trial whose config no
longer matches the sweep file is an error (`--rerun-stale` moves it to `stale/` and reruns
it). Relative paths in a sweep file resolve against the folder the command runs in, and the
data of every trial is checked before Ray starts. A failed trial leaves a record saying why;
a failed warm start skips the trials that need it; the command exits non-zero when anything
failed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import itertools
import json
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.harness.config import ConfigError, TrainConfig, apply, config_differences, read_yaml_mapping
from bench.harness.checkpoint import CHECKPOINT, PREVIOUS_CHECKPOINT
from bench.results.record import RunRecord, describe_error, failure, read_record_or_none, write_record
from bench.contract import available_selectors, check_selector
from bench.suggest import did_you_mean
from bench.orchestration.cluster import check_fits, check_shared_storage, connect_ray, lost_worker

PROTOCOLS = ("synthetic", "classic", "blended", "u2pl", "cityscapes", "coco", "camvid", "ablation")


class StoppedBySearch(Exception):
    """The search's scheduler (ASHA) ended this sample early: a result of the search, not a
    failure. Tune stops a function trial by `sys.exit(0)` inside `tune.report`."""

    record_status = "stopped"  # what the trainer's record says when this ends a run


class SweepError(ValueError):
    pass


@dataclass
class Resources:
    cpu: float = 1.0
    gpu: float = 0.0


@dataclass
class WarmStart:
    iters: int = 600  # supervised iterations before every trial
    # None: one warm start per seed (seeds vary the whole run). A number: one warm start,
    # with that seed, shared by every trial; seeds then vary only what follows it, so the
    # comparison is conditional on that one model (cheaper, and less spread).
    seed: int | None = None
    cpu: float | None = None  # CPUs (threads) per warm-start trial; default: resources.cpu
    # Config keys for the warm start only (e.g. its own lr when the trials fine-tune at a lower one).
    overrides: dict[str, Any] = field(default_factory=dict)

    def seeds(self, trial_seeds: list) -> list:
        return list(trial_seeds) if self.seed is None else [self.seed]

    def label(self, trial_seed) -> str:
        return f"warmup-seed={trial_seed if self.seed is None else self.seed}"


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
    # times Ray Tune starts a trial again after its process or node was lost (each time from
    # the trial's last checkpoint); a trial that fails on its own error is never retried
    retries: int = 3

    def trials(self) -> list["Trial"]:
        """Every (grid point x method) as a named trial, grid point by grid point, so that a
        sweep stopped early holds every method of the seeds it reached (complete pairs)."""
        keys = list(self.grid)
        points = list(itertools.product(*(self.grid[k] for k in keys))) or [()]
        out = []
        for point in points:
            for method in self.methods:
                name = method.get("name")
                overrides = {k: v for k, v in method.items() if k != "name"}
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
        seeds = self.warm_start.seeds(self.grid.get("seed", [self.base.get("seed", 0)]))
        base = {**self.base, **self.warm_start.overrides, "framework": "supervised", "iters": self.warm_start.iters, "eval_every": self.warm_start.iters}
        return [Trial(self.warm_start.label(s), "warmup", {**base, "seed": s}) for s in seeds]


@dataclass
class Trial:
    label: str
    method: str
    overrides: dict[str, Any]

    def config(self, out: Path, sweep: str, init_from: str | None = None) -> TrainConfig:
        """The trial's config; relative paths resolve against the current folder."""
        values = {**self.overrides, "out": str(out / self.label), "wandb_group": sweep}
        if init_from:
            values["init_from"] = init_from
        return apply(TrainConfig(), values, f"trial {self.label}").absolute().validate()


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


EVERY_SELECTOR = "every_selector"


def _expand_methods(methods: Any, path: Path) -> list[dict[str, Any]]:
    """The methods as listed, with the entry `every_selector` replaced by one method per
    registered selector (named after it) that the file does not list itself: a new selector,
    built in or from a plugin, enters the sweep without editing the file."""
    if not isinstance(methods, list) or not all((isinstance(m, dict) and "name" in m) or m == EVERY_SELECTOR for m in methods):
        raise SweepError(f"{path}: methods must be a list of mappings, each with a 'name' (or the entry '{EVERY_SELECTOR}')")
    listed = {m["name"] for m in methods if isinstance(m, dict)}
    out = []
    for m in methods:
        if m == EVERY_SELECTOR:
            out += [{"name": n, "selector": n} for n in available_selectors() if n not in listed]
        else:
            out.append(m)
    return out


def load_sweep(path: str | Path) -> Sweep:
    path = Path(path)
    data = read_yaml_mapping(path, SweepError, "sweep file")
    _check_keys(data, Sweep, str(path))
    for key in ("name", "protocol", "methods"):
        if key not in data:
            raise SweepError(f"{path}: '{key}' is required")
    if not isinstance(data.get("retries", 0), int) or isinstance(data.get("retries"), bool) or data.get("retries", 0) < 0:
        raise SweepError(f"{path}: retries must be a whole number >= 0 (restarts of a trial whose node or process was lost), got {data['retries']!r}")
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
    methods = _expand_methods(data["methods"], path)
    names = [m["name"] for m in methods]
    if len(set(names)) != len(names):
        raise SweepError(f"{path}: method names must be unique, got {names}")
    sweep = Sweep(
        name=data["name"], protocol=data["protocol"], description=data.get("description", ""),
        base=dict(data.get("base") or {}), methods=methods, grid=grid, **sub, **({"retries": data["retries"]} if "retries" in data else {}),
    )
    sweep.base.setdefault("protocol", sweep.protocol)
    if sweep.search is not None:
        for key, spec in sweep.search.space.items():
            _distribution(key, spec, str(path))
            if not key.startswith("selector.") and key not in {f.name for f in dataclasses.fields(TrainConfig)}:
                raise SweepError(f"{path}: search space key '{key}' is not a config key")
        searched = {k.split(".", 1)[1]: None for k in sweep.search.space if k.startswith("selector.")}
        names = sweep.search.space.get("selector", {}).get("choice")
        for trial in sweep.trials():
            for name in names or [trial.config(Path("/tmp/cslbench-check"), sweep.name).selector]:
                try:
                    check_selector(name, {**trial.config(Path("/tmp/cslbench-check"), sweep.name).selector_params, **searched})
                except ValueError as exc:
                    raise SweepError(f"{path}: search space of trial {trial.label}: {exc}") from None
        if sweep.search.mode not in ("max", "min"):
            raise SweepError(f"{path}: search mode must be max or min, got {sweep.search.mode!r}")
    for trial in sweep.trials() + sweep.warm_start_trials():  # every config valid before anything runs
        try:
            trial.config(Path("/tmp/cslbench-check"), sweep.name)
        except (ConfigError, ValueError) as exc:
            raise SweepError(f"{path}: {exc}") from exc
    return sweep


# --------------------------------------------------------------------------------------
# Before anything runs: paths, data, stale trials, the storage lock
# --------------------------------------------------------------------------------------
def trial_state(out: Path) -> str:
    """complete | partial (has a checkpoint) | new"""
    record = read_record_or_none(out)
    if record is not None and record.status == "complete":
        return "complete"
    return "partial" if any((out / name).is_file() for name in (CHECKPOINT, PREVIOUS_CHECKPOINT)) else "new"


def check_inputs(configs: dict[str, TrainConfig], warm_starts: set[str] = frozenset()) -> None:
    """Every data root, split and file a trial will read exists: one error listing what
    is missing and which trials need it, before any trial is scheduled."""
    from bench.data.sources import DataError, get_source
    from bench.data.splits import load_split
    from bench.harness.pretrained import WeightsError, check_weights

    problems: dict[str, list[str]] = {}
    seen: dict[tuple, str | None] = {}
    for label, cfg in configs.items():
        key = (cfg.dataset, cfg.root, cfg.split_dir, cfg.split, cfg.labeled, cfg.eval_split)
        if key not in seen:
            try:
                split = load_split(get_source(cfg.dataset, cfg.root), cfg.split_dir, cfg.split, cfg.labeled, cfg.eval_split)
                seen[key] = None
                if split.origin.startswith("generated"):  # say so: a missing split folder is easy to miss
                    print(f"note: no split files in {Path(cfg.split_dir) / cfg.dataset / cfg.split}; {cfg.dataset} split {split.origin}", flush=True)
            except DataError as exc:
                seen[key] = str(exc)
        if seen[key]:
            problems.setdefault(seen[key], []).append(label)
        if cfg.pretrained is not None:
            try:
                check_weights(cfg.backbone, cfg.pretrained)
            except WeightsError as exc:
                problems.setdefault(str(exc), []).append(label)
        if cfg.init_from and cfg.init_from not in warm_starts and not Path(cfg.init_from).exists():
            problems.setdefault(f"init_from={cfg.init_from} does not exist", []).append(label)
    if problems:
        lines = [f"{message}\n  (needed by {len(labels)} trials: {', '.join(labels[:4])}{', ...' if len(labels) > 4 else ''})" for message, labels in problems.items()]
        raise SweepError("the sweep cannot start; nothing was run:\n" + "\n".join(lines))


def stale_trials(trials: list[tuple[Trial, TrainConfig]]) -> dict[str, dict[str, tuple]]:
    """Trials holding results or progress (complete, or a checkpoint) under another config
    than the sweep file's: {label: {key: (stored, now)}}. A failed or skipped trial with no
    checkpoint holds neither and simply runs again."""
    stale = {}
    for trial, cfg in trials:
        record = read_record_or_none(Path(cfg.out))
        if record is None or trial_state(Path(cfg.out)) == "new":
            continue
        diff = config_differences(record.config, cfg.to_dict())
        if diff:
            stale[trial.label] = diff
    return stale


def _describe_stale(stale: dict[str, dict[str, tuple]]) -> str:
    lines = []
    for label, diff in stale.items():
        shown = ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in diff.items())
        lines.append(f"  {label}: {shown}")
    return "\n".join(lines)


@contextlib.contextmanager
def storage_lock(folder: Path):
    """One sweep at a time per storage folder. flock is released by the kernel when its
    holder dies, so a crashed sweep never leaves the folder locked."""
    import fcntl

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / ".sweep.lock"
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise SweepError(
                f"{folder} is in use by another `cslbench sweep` ({holder}); wait for it to finish, "
                "or use another --storage"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}")
        handle.flush()
        try:
            yield
        finally:
            handle.seek(0)
            handle.truncate()
            fcntl.flock(handle, fcntl.LOCK_UN)


# --------------------------------------------------------------------------------------
# Running on Ray Tune
# --------------------------------------------------------------------------------------
@dataclass
class Outcome:
    """What a sweep ran: where its trials are, and what failed or was skipped and why."""

    trials_dir: Path
    failed: dict[str, str] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.failed and not self.skipped

    def summary(self) -> str:
        lines = []
        if self.failed:
            lines.append(f"{len(self.failed)} trials FAILED:")
            lines += [f"  {label}: {why}" for label, why in self.failed.items()]
        if self.skipped:
            lines.append(f"{len(self.skipped)} trials skipped:")
            lines += [f"  {label}: {why}" for label, why in self.skipped.items()]
        return "\n".join(lines)


def _trainable(params: dict, search: dict | None = None) -> None:
    """One Ray Tune trial: an ordinary training run, resumed if it has a checkpoint.
    `search` holds the values an ASHA search sampled for this trial. A trial that fails on
    its own error (divergence, bad config) ends here with a record saying why, and Tune
    sees it finish: retrying would fail the same way. A lost node or process goes back to
    Tune, which starts the trial again from its checkpoint, up to the sweep's `retries`."""
    import torch
    from ray import tune

    from bench.harness.config import from_dict
    from bench.harness.runtime import keep_freed_memory
    from bench.harness.train import Trainer

    keep_freed_memory()
    torch.set_num_threads(max(1, int(params["threads"])))
    config = from_dict(params["config"])
    if search:
        apply(config, dict(search), "the search space")
        tag = hashlib.sha256(json.dumps(search, sort_keys=True).encode()).hexdigest()[:8]
        config.out = f"{config.out}-{tag}"
        config.validate()

    last: list[dict] = []  # the evaluation at the budget, reported once the record is complete

    def report(point: dict, step: int) -> None:
        if "val_miou" not in point:  # report at evaluations: what schedulers compare
            return
        metrics = {k: v for k, v in point.items() if isinstance(v, (int, float))} | {"iter": step}
        if step >= config.iters:  # a scheduler stopping the trial here would cut its final evaluation short
            last.append(metrics)
            return
        try:
            tune.report(metrics)
        except SystemExit:  # Tune's stop: in a search, its scheduler pruned this sample
            if not search:
                raise
            stop = StoppedBySearch(f"the search's scheduler stopped this sample at iteration {step}")
            mark_stopped(Path(config.out), stop)  # first: Tune may end this process at any moment now
            raise stop from None

    try:
        if config.replicas > 1:  # a trial bigger than one GPU: its own Ray Train workers
            from bench.harness.launch import train_data_parallel

            train_data_parallel(config, resume=True)
        else:
            Trainer(config, resume=True, show_progress=False, on_log=report).run()
            with contextlib.suppress(SystemExit):  # stopped at its budget: nothing left to cut short
                for metrics in last:
                    tune.report(metrics)
    except StoppedBySearch:  # recorded `stopped` already: by `report`, then by the trainer's `fail`
        pass
    except BaseException as exc:
        if lost_worker(exc):  # a node or process went away: Tune starts the trial again (FailureConfig)
            mark_lost(Path(config.out), exc)
            raise
        record = read_record_or_none(Path(config.out))
        if record is None or record.status != "failed":  # the trainer records its own failures
            write_failed_record(Path(config.out), config.to_dict(), exc)
        if not isinstance(exc, Exception):  # an interrupt: let it through (the record says failed)
            raise


def mark_stopped(out: Path, exc: StoppedBySearch) -> None:
    """The record of a sample the search pruned says so (`stopped`), written the moment
    Tune's stop arrives, before the trainer's own record of it."""
    record = read_record_or_none(out)
    if record is not None and record.status != "complete":
        record.status, record.error, record.traceback = "stopped", failure(exc, record.iteration), None
        write_record(out, record)


def mark_lost(out: Path, exc: BaseException) -> None:
    """The record of a trial that lost a worker (a data-parallel peer's node died): it says
    so (`error.lost`), in place of what the surviving workers saw (a closed connection)."""
    record = read_record_or_none(out)
    if record is not None and record.status != "complete":
        record.status, record.error = "failed", {**failure(exc, record.iteration), "lost": True}
        write_record(out, record)


def write_failed_record(out: Path, config: dict, exc: BaseException | str, iteration: int | None = None) -> None:
    """Mark `out` failed, keeping what its record already holds (curves, config)."""
    record = read_record_or_none(out) or RunRecord(name=out.name, status="failed", config=config)
    if record.status == "complete":
        return
    error = failure(exc, iteration if iteration is not None else record.iteration) if isinstance(exc, BaseException) else {
        "type": "TrialError", "message": exc, "iteration": record.iteration}
    record.status, record.error = "failed", error
    write_record(out, record)


def run_sweep(
    sweep: Sweep,
    storage: str | Path,
    resume: bool = False,
    address: str | None = None,
    max_concurrent: int | None = None,
    verbose: int = 1,
    rerun_stale: bool = False,
) -> Outcome:
    """Run every trial not yet complete; report what failed."""
    root = Path(storage).expanduser().resolve() / sweep.name
    with storage_lock(root):
        return _run_locked(sweep, root, resume, address, max_concurrent, verbose, rerun_stale)


def _run_locked(sweep, root: Path, resume, address, max_concurrent, verbose, rerun_stale) -> Outcome:
    from ray import tune

    trials_dir, warm_dir = root / "trials", root / "warmup"
    warm = [(t, t.config(warm_dir, sweep.name)) for t in sweep.warm_start_trials()]
    init = {t.label: str(warm_dir / t.label) for t, _ in warm}

    def warm_label(t: Trial) -> str | None:  # the warm start a trial continues from
        return sweep.warm_start.label(t.overrides.get("seed", 0)) if warm else None

    main = [(t, t.config(trials_dir, sweep.name, init.get(warm_label(t)))) for t in sweep.trials()]
    for _, c in warm + main:  # Ray shows a trial the GPUs it asked for and no others
        if c.device == "auto":
            c.device = "cuda" if sweep.resources.gpu > 0 else "cpu"
    warm_hash = {t.label: c.hash() for t, c in warm}
    for t, c in main:  # the warm start each trial continues from, by identity: another one makes the trial stale
        if warm:
            c.init_from_hash = warm_hash[warm_label(t)]
    check_inputs({t.label: c for t, c in warm + main}, set(init.values()))

    if sweep.search is not None:
        return _search(sweep, root, resume, address, max_concurrent, verbose)
    existing = [t.label for t, c in warm + main if trial_state(Path(c.out)) != "new"]
    if existing and not resume:
        raise SweepError(
            f"{root} already holds {len(existing)} trials of this sweep; pass --resume to continue it "
            "(finished trials are kept) or choose another --storage"
        )
    stale = stale_trials(warm + main)
    stale_warm = {t.label for t, _ in warm if t.label in stale}
    for t, c in main:  # a changed warm start makes every trial that continues from it stale
        if warm_label(t) in stale_warm and t.label not in stale and trial_state(Path(c.out)) != "new":
            stale[t.label] = {"warm start": ("stale", "rerun")}
    if stale:
        if not rerun_stale:
            raise SweepError(
                f"{len(stale)} trials in {root} were run with another config than the sweep file now gives:\n"
                f"{_describe_stale(stale)}\npass --rerun-stale to move them to {root / 'stale'} and run them again, "
                "or restore the sweep file"
            )
        stamp = time.strftime("%Y%m%d-%H%M%S")
        for t, c in warm + main:
            if t.label in stale:
                target = root / "stale" / stamp / Path(c.out).parent.name / t.label
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(c.out, target)
        print(f"moved {len(stale)} stale trials to {root / 'stale' / stamp}; running them again", flush=True)

    outcome = Outcome(trials_dir)
    ray_address = address or os.environ.get("RAY_ADDRESS")
    checked = []

    def stage(trials: list[tuple[Trial, TrainConfig]], tag: str, cpu: float) -> None:
        todo = [(t, c) for t, c in trials if trial_state(Path(c.out)) != "complete"]
        if not todo:
            return
        connect_ray(ray_address, verbose)  # only when there is work
        if not ray_address:  # a private Ray never grows: a trial bigger than it would wait forever
            replicas = max(c.replicas for _, c in todo)
            check_fits(cpu, sweep.resources.gpu, tag, replicas, any(c.device.startswith("cuda") for _, c in todo))
        elif not checked:  # a cluster: every node must write where this driver reads
            checked.append(check_shared_storage(root))
        print(f"{sweep.name} {tag}: {len(todo)} trials to run ({len(trials) - len(todo)} already complete)", flush=True)
        trainable = tune.with_resources(lambda p: _trainable(p["trial"], p.get("search")), {"cpu": cpu, "gpu": sweep.resources.gpu})
        configs = [{"config": c.to_dict(), "threads": max(1, int(cpu)), "label": t.label} for t, c in todo]
        grid = tune.Tuner(
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
                failure_config=tune.FailureConfig(max_failures=sweep.retries),  # lost nodes only: own errors end the trial (_trainable)
                callbacks=[Progress(len(todo), tag)] if verbose < 2 else [],
            ),
        ).fit()
        errors = {r.config["trial"]["label"]: r.error for r in grid if r.error is not None}
        for t, c in todo:
            out = Path(c.out)
            if trial_state(out) == "complete":
                continue
            record = read_record_or_none(out)
            if record is None or record.status != "failed":  # died without a word (killed, out of memory)
                why = errors.get(t.label)
                write_failed_record(out, c.to_dict(), str(why).strip().splitlines()[-1] if why else "the trial ended without finishing (no error reported)")
                record = read_record_or_none(out)
            outcome.failed[t.label] = describe_error(record.error if record is not None else None)

    if warm:
        stage(warm, "warmup", sweep.warm_start.cpu or sweep.resources.cpu)
    runnable = []
    for t, c in main:
        if warm_label(t) in outcome.failed and trial_state(Path(c.out)) != "complete":
            why = f"warm start {warm_label(t)} failed ({outcome.failed[warm_label(t)]})"
            outcome.skipped[t.label] = why
            write_record(Path(c.out), RunRecord(name=t.label, status="skipped", config=c.to_dict(), error={"type": "Skipped", "message": why, "iteration": None}))
        else:
            runnable.append((t, c))
    if outcome.skipped:
        print(f"{sweep.name}: skipping {len(outcome.skipped)} trials whose warm start failed", flush=True)
    stage(runnable, "main", sweep.resources.cpu)
    return outcome


def _progress_class():
    from ray import tune

    class Progress(tune.Callback):
        """One line per finished trial (Ray's own tables with --verbose)."""

        def __init__(self, total: int, tag: str):
            self.total, self.tag, self.done = total, tag, 0

        def _line(self, trial, text: str) -> None:
            self.done += 1
            print(f"[{self.tag} {self.done}/{self.total}] {trial.config['trial']['label']} {text}", flush=True)

        def on_trial_complete(self, iteration, trials, trial, **info):
            record = read_record_or_none(Path(trial.config["trial"]["config"]["out"]))
            if record is not None and record.status == "failed":  # its own error, recorded by the trial
                self._line(trial, f"FAILED: {describe_error(record.error)}")
                return
            miou = ((record.final if record is not None else None) or {}).get("miou")
            lost = [r for r in (record.restarts if record is not None else []) if r["cause"] in ("died", "lost")]
            again = f" (went on {len(lost)}x from its checkpoint, {sum(r['recomputed'] for r in lost)} iterations recomputed)" if lost else ""
            self._line(trial, "done" + (f", mIoU {100 * miou:.1f}" if isinstance(miou, (int, float)) else "") + again)

        def on_trial_recover(self, iteration, trials, trial, **info):
            print(f"[{self.tag}] {trial.config['trial']['label']} lost its process or node; Tune starts it again from its checkpoint", flush=True)

        def on_trial_error(self, iteration, trials, trial, **info):
            record = read_record_or_none(Path(trial.config["trial"]["config"]["out"]))
            self._line(trial, f"FAILED: {describe_error(record.error if record is not None else None) or 'see Ray output (--verbose)'}")

    return Progress


def Progress(total: int, tag: str):  # noqa: N802 - built lazily: ray is imported only to run
    return _progress_class()(total, tag)


def _search(sweep: Sweep, root: Path, resume: bool, address, max_concurrent, verbose: int) -> Outcome:
    """ASHA at reduced budget: for choosing hyper-parameters, never for reporting. One Tune
    experiment per trial of the grid; `--resume` restores unfinished experiments."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    s = sweep.search
    folder = root / "search"
    space = {k: _distribution(k, v, sweep.name) for k, v in s.space.items()}
    names = {trial.label: f"{sweep.name}-search-{trial.label}" for trial in sweep.trials()}
    started = [label for label, name in names.items() if (root / "ray" / name).exists()]
    if started and not resume:
        raise SweepError(f"{root} already holds search experiments of this sweep ({', '.join(started)}); pass --resume or choose another --storage")
    connect_ray(address or os.environ.get("RAY_ADDRESS"), verbose)
    trainable = tune.with_resources(lambda p: _trainable(p["trial"], p.get("search")), {"cpu": sweep.resources.cpu, "gpu": sweep.resources.gpu})
    threads = max(1, int(sweep.resources.cpu))
    outcome = Outcome(folder)
    for trial in sweep.trials():
        config = trial.config(folder, sweep.name).to_dict()
        path = root / "ray" / names[trial.label]
        if resume and tune.Tuner.can_restore(str(path)):
            tuner = tune.Tuner.restore(str(path), trainable=trainable, resume_errored=True)
        else:
            scheduler = ASHAScheduler(
                time_attr="iter", metric=s.metric, mode=s.mode, max_t=config["iters"],
                grace_period=s.grace_period, reduction_factor=s.reduction_factor,
            )
            tuner = tune.Tuner(
                trainable,
                param_space={"trial": {"config": config, "threads": threads, "label": trial.label}, "search": space},
                tune_config=tune.TuneConfig(num_samples=s.num_samples, scheduler=scheduler, max_concurrent_trials=max_concurrent),
                run_config=tune.RunConfig(
                    name=names[trial.label], storage_path=str(root / "ray"), verbose=max(verbose, 1),
                    failure_config=tune.FailureConfig(max_failures=sweep.retries),  # as in _run: lost nodes only
                ),
            )
        for result in tuner.fit():
            if result.error is not None:
                outcome.failed[f"{trial.label} {result.path}"] = str(result.error).strip().splitlines()[-1]
    return outcome
