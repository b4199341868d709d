"""Sweep files: schema, expansion, every shipped file valid; kill + --resume on Ray."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.orchestration.sweeps import SweepError, load_sweep

SWEEPS = Path(__file__).resolve().parents[1] / "sweeps"
TINY = """
name: tiny
protocol: synthetic
base:
  backbone: test_resnet
  crop: 32
  batch_size: 2
  iters: 4
  eval_every: 4
  log_every: 2
  checkpoint_every: 2
  probe_images: 2
  head_channels: 16
  aspp_dilations: [1, 2]
  wandb_mode: disabled
grid:
  seed: [0, 1]
methods:
  - {name: supervised, framework: supervised}
  - {name: fixed, selector: fixed}
  - {name: csl, selector: csl, selector.alpha: 8.0}
resources: {cpu: 1}
"""


def write(tmp_path, text):
    path = tmp_path / "sweep.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("path", sorted(SWEEPS.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_sweep_file_is_valid(path):
    sweep = load_sweep(path)
    assert sweep.trials() and len({t.label for t in sweep.trials()}) == len(sweep.trials())
    if sweep.search is None and not sweep.name.endswith("smoke"):  # benchmarks: mean ± std over 3 or more seeds
        assert sweep.grid.get("seed")[:3] == [0, 1, 2]


def test_full_sweep_has_every_selector_and_one_budget():
    from bench.contract import available_selectors

    sweep = load_sweep(SWEEPS / "full.yaml")
    configs = [t.config(Path("/tmp/x"), "full") for t in sweep.trials()]
    semi = {c.selector for c in configs if c.framework != "supervised"}
    assert semi == set(available_selectors())  # "every selector" stays true when one is added
    assert {c.framework for c in configs} == {"supervised", "unimatch"} and any(c.csl_mask_view for c in configs)
    assert {c.iters for c in configs} == {300} and len(configs) == 5 * (len(available_selectors()) + 2)
    assert {c.protocol for c in configs} == {"synthetic"} and {c.eval_split for c in configs} == {"test"}


def test_default_sweep_is_the_named_subset_of_the_full_one():
    default, full = load_sweep(SWEEPS / "default.yaml"), load_sweep(SWEEPS / "full.yaml")
    assert [m["name"] for m in default.methods] == ["supervised", "fixed", "csl"]
    assert default.base == full.base and default.warm_start == full.warm_start  # the same protocol
    assert {m["name"] for m in default.methods} < {m["name"] for m in full.methods}


def test_a_new_selector_enters_the_default_sweep_without_editing_it(monkeypatch, scoped_registry):
    import bench.contract as selection

    class Newcomer(selection.Selector):
        def _select(self, probs, valid, moments, **context):
            return selection.hard_selection(moments.label, moments.confidence > 0.5, valid)
    selection.register_selector("newcomer")(Newcomer)
    sweep = load_sweep(SWEEPS / "full.yaml")
    assert [t.label for t in sweep.trials() if t.method == "newcomer"] == [f"newcomer-seed={s}" for s in range(5)]
    names = [m["name"] for m in sweep.methods]
    assert names.count("csl") == 1 and names[0] == "supervised" and names[-1] == "csl+mask"


def test_expansion_and_named_settings(tmp_path):
    text = TINY.replace("grid:\n  seed: [0, 1]", 'grid:\n  setting:\n    - {split: "92", iters: 7}\n    - {split: "183", iters: 9}\n  seed: [0, 1]')
    sweep = load_sweep(write(tmp_path, text))
    labels = [t.label for t in sweep.trials()]
    assert len(labels) == 3 * 2 * 2 and "csl-split=92-seed=1" in labels
    cfg = next(t for t in sweep.trials() if t.label == "csl-split=183-seed=0").config(tmp_path, "tiny")
    assert cfg.split == "183" and cfg.iters == 9 and cfg.selector_params == {"alpha": 8.0} and cfg.wandb_group == "tiny"


@pytest.mark.parametrize(
    "change,message",
    [
        (("resources: {cpu: 1}", "resource: {cpu: 1}"), "unknown key 'resource'.*did you mean 'resources'"),
        (("resources: {cpu: 1}", "resources: {cpus: 1}"), "unknown key 'cpus'.*'cpu'"),
        (("protocol: synthetic", "protocol: weird"), "protocol 'weird' is not one of"),
        (("  iters: 4", "  itres: 4"), "unknown config key 'itres'.*'iters'"),
        (("  seed: [0, 1]", "  seed: 3"), "grid 'seed' must be a non-empty list"),
        (("name: tiny\n", ""), "'name' is required"),
    ],
)
def test_bad_sweep_files_name_the_problem(tmp_path, change, message):
    with pytest.raises(SweepError, match=message):
        load_sweep(write(tmp_path, TINY.replace(*change)))


REPO = Path(__file__).resolve().parents[1]
CAMVID = REPO / ".." / "shared" / "data" / "camvid"
needs_camvid = pytest.mark.skipif(not CAMVID.is_dir(), reason="../shared/data/camvid not present")
ENV = {**os.environ, "WANDB_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
CLI = [sys.executable, "-m", "bench.orchestration.cli", "sweep"]
# CamVid at a tiny budget: the real data path end to end in about a minute.
TINY_CAMVID = """
name: tinycv
protocol: camvid
base:
  dataset: camvid
  root: {root}
  labeled: 46
  backbone: test_resnet
  crop: 32
  batch_size: 2
  iters: 4
  eval_every: 4
  log_every: 2
  checkpoint_every: 2
  probe_images: 2
  head_channels: 16
  aspp_dilations: [1, 2]
  wandb_mode: disabled
warm_start: {{iters: 2}}
grid:
  seed: {seeds}
methods:
{methods}
resources: {{cpu: 1}}
"""


def camvid_sweep(root: str, methods: list[str], seeds="[0]") -> str:
    return TINY_CAMVID.format(root=root, seeds=seeds, methods="".join(f"  - {m}\n" for m in methods))


def records(folder: Path) -> dict[str, dict]:
    out = {}
    for rec in folder.glob("*/record.json"):
        try:
            out[rec.parent.name] = json.loads(rec.read_text())
        except json.JSONDecodeError:
            continue
    return out


def complete(folder: Path) -> dict[str, tuple]:
    return {k: (r["updated"], (folder / k / "record.json").stat().st_mtime_ns) for k, r in records(folder).items() if r["status"] == "complete"}


def linked_copy(src: Path, dst: Path, corrupt: str) -> None:
    """The dataset as symlinks (the usual way datasets are kept), one image cut short."""
    dst.mkdir()
    for item in src.iterdir():
        if item.name == Path(corrupt).parts[0]:
            (dst / item.name).mkdir()
            for f in item.iterdir():
                (dst / item.name / f.name).symlink_to(f.resolve())
        else:
            (dst / item.name).symlink_to(item.resolve(), target_is_directory=item.is_dir())
    bad = dst / corrupt
    data = bad.read_bytes()
    bad.unlink()
    bad.write_bytes(data[: len(data) // 3])


@needs_camvid
def test_real_data_sweep_from_another_folder_reports_every_failure(tmp_path):
    """Relative paths resolve against the launch folder; a diverging trial and one with a
    corrupt image fail with records saying why; the rest complete; the exit code is 1."""
    corrupt = "val/0016E5_07959.png"
    linked_copy(CAMVID, tmp_path / "linked", corrupt)
    work = tmp_path / "work"
    work.mkdir()
    rel = os.path.relpath(CAMVID, work)
    (work / "cv.yaml").write_text(camvid_sweep(rel, [
        "{name: supervised, framework: supervised}", "{name: fixed, selector: fixed}",
        "{name: nan, selector: fixed, lr: 1.0e+12}", "{name: corrupt, selector: fixed, root: ../linked}",
    ]))
    run = subprocess.run(CLI + ["cv.yaml", "--storage", "st"], cwd=work, env=ENV, capture_output=True, text=True, timeout=600)
    assert run.returncode == 1, run.stderr[-3000:]
    trials = work / "st" / "tinycv" / "trials"
    recs = records(trials)
    assert {k: r["status"] for k, r in recs.items()} == {
        "supervised-seed=0": "complete", "fixed-seed=0": "complete", "nan-seed=0": "failed", "corrupt-seed=0": "failed"}
    assert recs["fixed-seed=0"]["config"]["root"] == os.path.abspath(work / rel)
    assert recs["fixed-seed=0"]["splits"]["sizes"] == {"labeled": 46, "unlabeled": 321, "val": 101, "test": 0}
    nan, bad = recs["nan-seed=0"]["error"], recs["corrupt-seed=0"]["error"]
    assert nan["type"] == "DivergedError" and "NaN" in nan["message"] and nan["iteration"] >= 1
    assert bad["type"] == "DataError" and f"cannot read image {tmp_path / 'linked' / corrupt}" in bad["message"] and bad["iteration"] == 4
    assert "| supervised |" in run.stdout and "| fixed |" in run.stdout  # the leaderboard of what finished
    assert "nan-seed=0: failed (DivergedError at iteration" in run.stdout
    assert "corrupt-seed=0: failed (DataError at iteration 4: cannot read image" in run.stdout
    assert "2 trials FAILED" in run.stderr and "nan-seed=0: DivergedError" in run.stderr and "2 failed, 0 skipped" in run.stderr


@pytest.mark.slow
@needs_camvid
def test_killed_real_data_sweep_resumes_without_losing_or_rerunning_trials(tmp_path):
    """From the repository root with the sweep file's own relative root. While it runs a
    second sweep on the same storage is refused; kill -9 of the whole process group, then
    a rerun is refused without --resume and completes with it, finished trials untouched."""
    path = tmp_path / "cv.yaml"
    path.write_text(camvid_sweep("../shared/data/camvid", [
        "{name: supervised, framework: supervised}", "{name: fixed, selector: fixed}", "{name: csl, selector: csl, selector.alpha: 8.0}",
    ], seeds="[0, 1]"))
    storage = tmp_path / "store"
    cmd = CLI + [str(path), "--storage", str(storage)]
    trials = storage / "tinycv" / "trials"
    proc = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and not (storage / "tinycv" / ".sweep.lock").exists():
        time.sleep(0.1)
    second = subprocess.run(cmd + ["--resume"], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=120)
    assert second.returncode != 0 and "in use by another `cslbench sweep` (pid" in second.stderr
    while time.time() < deadline and len(complete(trials)) < 2:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and its Ray workers
    proc.wait()
    before = complete(trials)
    assert 2 <= len(before) < 6, before

    again = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True)
    assert again.returncode != 0 and "--resume" in again.stderr  # refuses to start over silently
    resumed = subprocess.run(cmd + ["--resume"], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    after = complete(trials)
    assert len(after) == 6
    for name, stamp in before.items():
        assert after[name] == stamp  # finished trials kept as they were, not rerun
    assert "| csl (alpha=8.0) |" in resumed.stdout  # and the leaderboard is printed


@pytest.mark.slow  # two whole sweeps (about 100 s on 2 cores): CI runs it with -m slow
def test_a_failed_warm_start_skips_the_trials_that_need_it(tmp_path):
    text = TINY.replace("  wandb_mode: disabled", "  wandb_mode: disabled\n  lr: 1.0e+12") + "warm_start: {iters: 3}\n"
    run = subprocess.run(CLI + [str(write(tmp_path, text)), "--storage", str(tmp_path / "st")], env=ENV, capture_output=True, text=True, timeout=600)
    assert run.returncode == 1
    warm = records(tmp_path / "st" / "tiny" / "warmup")
    main = records(tmp_path / "st" / "tiny" / "trials")
    assert {r["status"] for r in warm.values()} == {"failed"} and len(warm) == 2
    assert len(main) == 6 and {r["status"] for r in main.values()} == {"skipped"}
    assert main["csl-seed=1"]["error"]["message"].startswith("warm start warmup-seed=1 failed (DivergedError")
    assert not any((tmp_path / "st" / "tiny" / "trials" / name / "checkpoint.pt").exists() for name in main)  # never ran
    assert "6 trials skipped" in run.stderr and "2 trials FAILED" in run.stderr
    # fixed (the lr put back), the failed and skipped trials run again on --resume
    fixed = subprocess.run(CLI + [str(write(tmp_path, text.replace("  lr: 1.0e+12\n", ""))), "--storage", str(tmp_path / "st"), "--resume", "--rerun-stale"],
                           env=ENV, capture_output=True, text=True, timeout=600)
    assert fixed.returncode == 0, fixed.stderr[-2000:]
    assert {r["status"] for r in records(tmp_path / "st" / "tiny" / "trials").values()} == {"complete"}


def test_trials_run_seed_by_seed_and_a_shared_warm_start_is_one_run(tmp_path):
    sweep = load_sweep(write(tmp_path, TINY + "warm_start: {iters: 3, seed: 7, cpu: 2, overrides: {lr: 0.05}}\n"))
    # seed-major: a sweep stopped early holds every method of the seeds it reached
    assert [t.label for t in sweep.trials()] == [
        "supervised-seed=0", "fixed-seed=0", "csl-seed=0", "supervised-seed=1", "fixed-seed=1", "csl-seed=1"]
    (warm,) = sweep.warm_start_trials()
    assert warm.label == "warmup-seed=7" and warm.overrides["seed"] == 7 and warm.overrides["iters"] == 3
    assert warm.config(tmp_path, "tiny").lr == 0.05 and {t.config(tmp_path, "tiny").lr for t in sweep.trials()} == {0.01}
    with pytest.raises(SweepError, match="unknown config key 'lrr'"):
        load_sweep(write(tmp_path, TINY + "warm_start: {iters: 3, overrides: {lrr: 0.05}}\n"))
    assert {sweep.warm_start.label(t.overrides["seed"]) for t in sweep.trials()} == {"warmup-seed=7"}
    per_seed = load_sweep(write(tmp_path, TINY + "warm_start: {iters: 3}\n"))
    assert [t.label for t in per_seed.warm_start_trials()] == ["warmup-seed=0", "warmup-seed=1"]


@pytest.mark.slow  # one tiny sweep on Ray (about 40 s on 2 cores)
def test_a_shared_warm_start_starts_every_trial_and_its_seeds_still_pair(tmp_path):
    text = TINY + "warm_start: {iters: 2, seed: 7}\n"
    too_big = subprocess.run(CLI + [str(write(tmp_path, text.replace("seed: 7}", "seed: 7, cpu: 999}"))), "--storage", str(tmp_path / "big")],
                             env=ENV, capture_output=True, text=True, timeout=600)
    assert too_big.returncode != 0 and "warmup trials ask for 999 CPUs but this machine's Ray has" in too_big.stderr
    run = subprocess.run(CLI + [str(write(tmp_path, text)), "--storage", str(tmp_path / "st")], env=ENV, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    warm = records(tmp_path / "st" / "tiny" / "warmup")
    assert list(warm) == ["warmup-seed=7"] and warm["warmup-seed=7"]["config"]["seed"] == 7
    main = records(tmp_path / "st" / "tiny" / "trials")
    assert len(main) == 6 and {r["status"] for r in main.values()} == {"complete"}
    assert {r["config"]["init_from"] for r in main.values()} == {str(tmp_path / "st" / "tiny" / "warmup" / "warmup-seed=7")}
    assert len({r["config"]["init_from_hash"] for r in main.values()}) == 1
    assert {r["config"]["seed"] for r in main.values()} == {0, 1}
    for method in ("supervised", "csl (alpha=8.0)"):  # both seeds pair with fixed: "Δ [CI] at L% (2 pairs)"
        (line,) = [ln for ln in run.stdout.splitlines() if ln.startswith(f"| {method} |")]
        assert re.search(r"\] at [0-9.]+% \(2 pairs\) \|", line), line


def test_data_problems_stop_the_sweep_before_ray_starts(tmp_path, monkeypatch):
    import ray

    from bench.orchestration.sweeps import run_sweep

    monkeypatch.chdir(tmp_path)
    text = TINY.replace("protocol: synthetic\nbase:\n", "protocol: camvid\nbase:\n  dataset: camvid\n  root: no/such/camvid\n")
    with pytest.raises(SweepError, match=f"(?s)nothing was run.*root {tmp_path / 'no' / 'such' / 'camvid'} is not a folder.*needed by 6 trials"):
        run_sweep(load_sweep(write(tmp_path, text)), tmp_path / "st")
    text = TINY.replace("  seed: [0, 1]", "  seed: [0]\n  split: ['92']")
    with pytest.raises(SweepError, match=r"no split files in .*splits/synthetic/92"):
        run_sweep(load_sweep(write(tmp_path, text)), tmp_path / "st")
    assert not ray.is_initialized()


def test_relative_paths_in_a_sweep_file_follow_the_launch_folder(tmp_path, monkeypatch):
    text = TINY.replace("base:\n", "base:\n  root: data/x\n  split_dir: my_splits\n")
    path = write(tmp_path, text)
    for cwd in (tmp_path, tmp_path / "sub"):
        cwd.mkdir(exist_ok=True)
        monkeypatch.chdir(cwd)
        cfg = load_sweep(path).trials()[0].config(Path("store"), "tiny")
        assert (cfg.root, cfg.split_dir, cfg.out) == (str(cwd / "data" / "x"), str(cwd / "my_splits"), str(cwd / "store" / "supervised-seed=0"))


@pytest.mark.parametrize(
    "change,message",
    [
        (("selector: fixed}", "selector: fxed}"), "unknown selector 'fxed'.*did you mean 'fixed'"),
        (("selector.alpha: 8.0", "selector.alpah: 8.0"), "selector 'csl' has no parameter 'alpah'.*did you mean 'alpha'"),
    ],
)
def test_selector_names_and_parameters_are_checked_when_the_file_loads(tmp_path, change, message):
    with pytest.raises(SweepError, match=message):
        load_sweep(write(tmp_path, TINY.replace(*change)))


def test_resume_refuses_trials_run_with_another_config(tmp_path):
    from bench.orchestration.sweeps import run_sweep

    sweep = load_sweep(write(tmp_path, TINY))
    trial = sweep.trials()[1]
    old = trial.config(tmp_path / "st" / "tiny" / "trials", "tiny").to_dict()
    (tmp_path / "st" / "tiny" / "trials" / trial.label).mkdir(parents=True)
    (tmp_path / "st" / "tiny" / "trials" / trial.label / "record.json").write_text(json.dumps({"schema_version": 2, "name": trial.label, "status": "complete", "config": {**old, "iters": 3, "device": "cpu"}}))
    with pytest.raises(SweepError, match=rf"(?s)1 trials .* another config.*{trial.label}: iters: 3 -> 4.*--rerun-stale"):
        run_sweep(sweep, tmp_path / "st", resume=True)


def test_a_trial_from_another_warm_start_is_stale(tmp_path):
    from bench.orchestration.sweeps import run_sweep

    per_seed = load_sweep(write(tmp_path, TINY + "warm_start: {iters: 3}\n"))
    root = tmp_path / "st" / "tiny"
    warm1 = next(t for t in per_seed.warm_start_trials() if t.label == "warmup-seed=1").config(root / "warmup", "tiny")
    warm1.device = "cpu"
    trial = next(t for t in per_seed.trials() if t.label == "fixed-seed=1")
    old = trial.config(root / "trials", "tiny", str(root / "warmup" / "warmup-seed=1"))
    old.device, old.init_from_hash = "cpu", warm1.hash()
    (root / "trials" / trial.label).mkdir(parents=True)
    (root / "trials" / trial.label / "record.json").write_text(json.dumps({"schema_version": 2, "name": trial.label, "status": "complete", "config": old.to_dict()}))
    shared = load_sweep(write(tmp_path, TINY + "warm_start: {iters: 3, seed: 0}\n"))  # now every trial starts from seed 0's
    with pytest.raises(SweepError, match=rf"(?s)1 trials .* another config.*fixed-seed=1: init_from_hash: '{warm1.hash()}' -> '"):
        run_sweep(shared, tmp_path / "st", resume=True)


def test_one_sweep_per_storage_and_a_dead_holder_leaves_no_lock(tmp_path):
    from bench.orchestration.sweeps import storage_lock

    holder = subprocess.Popen(
        [sys.executable, "-c", f"import time; from bench.orchestration.sweeps import storage_lock\nwith storage_lock(__import__('pathlib').Path({str(tmp_path)!r})):\n print('held', flush=True); time.sleep(120)"],
        stdout=subprocess.PIPE, text=True,
    )
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(SweepError, match=f"in use by another `cslbench sweep` \\(pid {holder.pid} "):
        with storage_lock(tmp_path):
            pass
    holder.kill()
    holder.wait()
    with storage_lock(tmp_path):  # the kernel released the dead holder's lock
        pass


def test_an_unreachable_ray_address_fails_fast_and_names_it():
    from bench.orchestration.cluster import ClusterError, connect_ray

    start = time.time()
    with pytest.raises(ClusterError, match=r"Ray cluster at --address 127.0.0.1:9 \(127.0.0.1:9\) cannot be reached"):
        connect_ray("127.0.0.1:9", verbose=0)
    assert time.time() - start < 15


def test_search_space_is_checked(tmp_path):
    text = TINY + "search:\n  num_samples: 2\n  space:\n    lr: {lognormal: [0.1, 1]}\n"
    with pytest.raises(SweepError, match="search space 'lr' must be one of"):
        load_sweep(write(tmp_path, text))
    text = TINY + "search:\n  space:\n    lrate: {uniform: [0.1, 1]}\n"
    with pytest.raises(SweepError, match="'lrate' is not a config key"):
        load_sweep(write(tmp_path, text))
    only_csl = TINY.replace("  - {name: supervised, framework: supervised}\n  - {name: fixed, selector: fixed}\n", "")
    text = only_csl + "search:\n  space:\n    selector.alpah: {uniform: [1, 9]}\n"
    with pytest.raises(SweepError, match="trial csl-seed=0: selector 'csl' has no parameter 'alpah'.*did you mean 'alpha'"):
        load_sweep(write(tmp_path, text))
    text = only_csl + "search:\n  space:\n    selector: {choice: [csl, covr]}\n"
    with pytest.raises(SweepError, match="unknown selector 'covr'.*did you mean 'covar'"):
        load_sweep(write(tmp_path, text))


def test_asha_search_runs_sampled_trials(tmp_path):
    from bench.orchestration.sweeps import run_sweep

    text = TINY.replace("  seed: [0, 1]", "  seed: [0]").replace(
        "  - {name: supervised, framework: supervised}\n  - {name: fixed, selector: fixed}\n", ""
    ) + "search:\n  num_samples: 3\n  grace_period: 2\n  reduction_factor: 2\n  space:\n    lr: {loguniform: [0.001, 0.1]}\n    selector.alpha: {choice: [2.0, 8.0]}\n"
    sweep = load_sweep(write(tmp_path, text))
    import ray

    try:
        folder = run_sweep(sweep, tmp_path / "store", verbose=0).trials_dir
    finally:
        ray.shutdown()
    runs = sorted(folder.glob("csl-seed=0-*/record.json"))
    assert len(runs) == 3
    configs = [json.loads(r.read_text())["config"] for r in runs]
    assert all(0.001 <= c["lr"] <= 0.1 and c["selector_params"]["alpha"] in (2.0, 8.0) for c in configs)
    assert len({c["lr"] for c in configs}) == 3
    # evaluated only at the budget, no sample is pruned: every one completes its run
    assert [json.loads(r.read_text())["status"] for r in runs] == ["complete"] * 3


def test_samples_a_real_scheduler_prunes_are_recorded_stopped(tmp_path, monkeypatch):
    """Through real Ray Tune: a scheduler that stops every sample at its first evaluation
    (iteration 2 of 4) in place of ASHA, whose choice depends on the sampled values. Every
    record says `stopped` at 2, with no traceback, and the search has no failures."""
    import ray
    from ray.tune import schedulers

    from bench.orchestration.sweeps import run_sweep

    class StopAtFirstResult(schedulers.FIFOScheduler):
        def __init__(self, **asha_arguments):
            super().__init__()

        def on_trial_result(self, tune_controller, trial, result):
            return schedulers.TrialScheduler.STOP

    monkeypatch.setattr(schedulers, "ASHAScheduler", StopAtFirstResult)
    text = TINY.replace("  seed: [0, 1]", "  seed: [0]").replace("  eval_every: 4\n", "  eval_every: 2\n").replace(
        "  - {name: supervised, framework: supervised}\n  - {name: fixed, selector: fixed}\n", ""
    ) + "search:\n  num_samples: 2\n  space:\n    lr: {loguniform: [0.001, 0.1]}\n"
    try:
        outcome = run_sweep(load_sweep(write(tmp_path, text)), tmp_path / "store", verbose=0)
    finally:
        ray.shutdown()
    assert outcome.failed == {}
    records = [json.loads(r.read_text()) for r in sorted(outcome.trials_dir.glob("csl-seed=0-*/record.json"))]
    assert len(records) == 2
    for record in records:
        assert (record["status"], record["iteration"], record["error"]["type"], record["traceback"]) == ("stopped", 2, "StoppedBySearch", None)


@pytest.mark.parametrize("stop_at", [2, 4])
def test_a_sample_the_search_stops_is_recorded_stopped_and_one_at_its_budget_completes(tmp_path, monkeypatch, stop_at):
    """Tune stops a function trial by sys.exit(0) inside tune.report. Pruned at a rung
    (iteration 2 of 4), the sample's record says `stopped`, with the iteration; asked to
    stop at its budget (ASHA's max_t), the run still finishes its final evaluation and its
    record says `complete`. Without Ray: tune.report is replaced by Tune's stop."""
    from ray import tune

    from bench.orchestration.sweeps import _trainable

    reported = []

    def stop_at_rung(metrics):
        reported.append(metrics["iter"])
        if metrics["iter"] >= stop_at:
            raise SystemExit(0)

    monkeypatch.setattr(tune, "report", stop_at_rung)
    sweep = load_sweep(write(tmp_path, TINY.replace("  eval_every: 4\n", "  eval_every: 2\n")))
    [trial] = [t for t in sweep.trials() if t.label == "csl-seed=0"]
    config = trial.config(tmp_path / "search", sweep.name).to_dict()
    _trainable({"config": config, "threads": 1, "label": trial.label}, {"lr": 0.01})
    [path] = (tmp_path / "search").glob("csl-seed=0-*/record.json")
    record = json.loads(path.read_text())
    assert reported == [2, 4][: [2, 4].index(stop_at) + 1]
    if stop_at == 2:
        assert record["status"] == "stopped" and record["iteration"] == 2
        assert record["error"]["type"] == "StoppedBySearch" and "stopped this sample at iteration 2" in record["error"]["message"]
    else:
        assert record["status"] == "complete" and record["iteration"] == 4 and record["final"]["miou"] is not None


# --------------------------------------------------------------------------------------
# Slow: kill -9 at several points, moved storage, stale trials rerun (pytest -m slow)
# --------------------------------------------------------------------------------------
KILLABLE = TINY.replace("  iters: 4\n", "  iters: 6\n") + "warm_start: {iters: 8}\n"
RESULT_COLUMNS = ("method", "column", "mean", "std", "n", "difference", "p", "p_holm", "miou_best_val", "precision", "recall", "coverage")


def leaderboard_numbers(trials: Path):
    from bench.results.leaderboard import build_tables, load_rows

    frame, others = load_rows(trials)
    assert others.is_empty(), others
    return [t.numeric.select(RESULT_COLUMNS).sort("method", "column").rows() for t in build_tables(frame)]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    folder = tmp_path_factory.mktemp("whole")
    path = write(folder, KILLABLE)
    run = subprocess.run(CLI + [str(path), "--storage", str(folder / "st")], env=ENV, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-2000:]
    return folder / "st" / "tiny"


def running_record(folder: Path, at_least: int) -> bool:
    return any(r["status"] == "running" and r["iteration"] >= at_least for r in records(folder).values())


@pytest.mark.slow
@pytest.mark.parametrize("point", ["warm-up", "mid-main"])
def test_kill_9_at_several_points_then_resume_gives_the_uninterrupted_leaderboard(tmp_path, uninterrupted, point):
    path = write(tmp_path, KILLABLE)
    storage = tmp_path / "st"
    proc = subprocess.Popen(CLI + [str(path), "--storage", str(storage)], env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    root = storage / "tiny"
    deadline = time.time() + 600
    if point == "warm-up":
        reached = lambda: running_record(root / "warmup", 2)  # noqa: E731
    else:
        reached = lambda: len(complete(root / "trials")) >= 1 and running_record(root / "trials", 2)  # noqa: E731
    while time.time() < deadline and not reached():
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert time.time() < deadline, f"never reached {point}"
    assert len(complete(root / "trials")) < 6  # cut short: work left for the resume
    if point == "mid-main":  # and the storage folder moves before the resume
        os.replace(storage, tmp_path / "moved")
        storage = tmp_path / "moved"
    resumed = subprocess.run(CLI + [str(path), "--storage", str(storage), "--resume"], env=ENV, capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert leaderboard_numbers(storage / "tiny" / "trials") == leaderboard_numbers(uninterrupted / "trials")
    whole, cut = records(uninterrupted / "trials"), records(storage / "tiny" / "trials")
    for name, record in whole.items():
        assert cut[name]["final"] == record["final"] and cut[name]["curves"] == record["curves"], name


@pytest.mark.slow
def test_stale_trials_are_refused_then_rerun_on_request(tmp_path, uninterrupted):
    shutil.copytree(uninterrupted.parent, tmp_path / "st")
    path = write(tmp_path, KILLABLE.replace("  - {name: fixed, selector: fixed}", "  - {name: fixed, selector: fixed, iters: 5}"))
    cmd = CLI + [str(path), "--storage", str(tmp_path / "st"), "--resume"]
    refused = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert refused.returncode != 0 and "2 trials" in refused.stderr and "fixed-seed=0: iters: 6 -> 5" in refused.stderr
    rerun = subprocess.run(cmd + ["--rerun-stale"], env=ENV, capture_output=True, text=True, timeout=900)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    now = records(tmp_path / "st" / "tiny" / "trials")
    assert now["fixed-seed=0"]["config"]["iters"] == 5 and now["csl-seed=0"]["config"]["iters"] == 6
    moved = list((tmp_path / "st" / "tiny" / "stale").glob("*/trials/fixed-seed=*/record.json"))
    assert len(moved) == 2 and all(json.loads(m.read_text())["config"]["iters"] == 6 for m in moved)


@pytest.mark.slow
def test_search_is_refused_without_resume_and_restored_with_it(tmp_path):
    text = TINY.replace("  seed: [0, 1]", "  seed: [0]").replace(
        "  - {name: supervised, framework: supervised}\n  - {name: fixed, selector: fixed}\n", ""
    ) + "search:\n  num_samples: 2\n  grace_period: 2\n  reduction_factor: 2\n  space:\n    lr: {loguniform: [0.001, 0.1]}\n"
    cmd = CLI + [str(write(tmp_path, text)), "--storage", str(tmp_path / "st")]
    first = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-2000:]
    runs = sorted((tmp_path / "st" / "tiny" / "search").glob("*/record.json"))
    stamps = [r.stat().st_mtime_ns for r in runs]
    again = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)
    assert again.returncode != 0 and "pass --resume" in again.stderr
    resumed = subprocess.run(cmd + ["--resume"], env=ENV, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert [r.stat().st_mtime_ns for r in sorted((tmp_path / "st" / "tiny" / "search").glob("*/record.json"))] == stamps


def test_lost_workers_are_told_from_a_trials_own_errors():
    """What Tune retries: Ray's errors for a process or node that went away, also inside a
    Ray Train worker group's failures or an exception's chain; never the run's own error."""
    from ray.exceptions import ActorDiedError, NodeDiedError
    from ray.train import WorkerGroupError
    from ray.train.v2._internal.exceptions import WorkerHealthCheckFailedError

    from bench.harness.failures import DivergedError
    from bench.orchestration.cluster import lost_worker

    peer_died = WorkerGroupError("rank 1 died", {0: RuntimeError("gloo: Connection closed by peer"), 1: WorkerHealthCheckFailedError("health check", ActorDiedError())})
    assert lost_worker(peer_died)
    assert lost_worker(NodeDiedError("node 1 lost"))
    try:
        try:
            raise ActorDiedError()
        except ActorDiedError as inner:
            raise RuntimeError("the step could not go on") from inner
    except RuntimeError as chained:
        assert lost_worker(chained)
    assert not lost_worker(DivergedError("loss is NaN", 3))
    assert not lost_worker(WorkerGroupError("rank 0 diverged", {0: DivergedError("NaN", 3), 1: RuntimeError("gloo: Connection closed by peer")}))
    assert not lost_worker(KeyboardInterrupt())


def test_a_data_parallel_trial_bigger_than_the_private_ray_is_an_error(monkeypatch):
    """A trial's own CPU plus one per Ray Train worker: on a private Ray that can never
    hold them the trial would wait for ever."""
    import ray

    from bench.orchestration.cluster import ClusterError, check_fits

    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0})
    check_fits(1, 0, "main")  # fits
    check_fits(1, 0, "main", replicas=1)
    with pytest.raises(ClusterError, match=r"main trials ask for 3 CPUs \(2 of them for its data-parallel workers, replicas=2\) but this machine's Ray has 2: lower resources or replicas"):
        check_fits(1, 0, "main", replicas=2)
