"""Sweep files: schema, expansion, every shipped file valid; kill + --resume on Ray."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.sweeps import SweepError, load_sweep

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
    if sweep.search is None:  # benchmark sweeps: every cell is mean ± std over 3 seeds
        assert sweep.grid.get("seed") == [0, 1, 2]


def test_default_sweep_has_every_method_and_one_budget():
    sweep = load_sweep(SWEEPS / "default.yaml")
    assert [m["name"] for m in sweep.methods] == ["supervised", "all", "fixed", "softmatch", "freematch", "ups", "covar", "csl", "csl+mask"]
    configs = [t.config(Path("/tmp/x"), "default") for t in sweep.trials()]
    assert {c.iters for c in configs} == {150} and len(configs) == 27
    assert {c.protocol for c in configs} == {"synthetic"}


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


def test_killed_sweep_resumes_without_losing_or_rerunning_trials(tmp_path):
    path = write(tmp_path, TINY)
    storage = tmp_path / "store"
    env = {**os.environ, "WANDB_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    cmd = [sys.executable, "-m", "bench.cli", "sweep", str(path), "--storage", str(storage)]
    trials = storage / "tiny" / "trials"
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)

    def complete():
        done = {}
        for rec in trials.glob("*/record.json"):
            try:
                data = json.loads(rec.read_text())
            except json.JSONDecodeError:
                continue
            if data["status"] == "complete":
                done[rec.parent.name] = (rec.stat().st_mtime_ns, data["updated"])
        return done

    deadline = time.time() + 240
    while time.time() < deadline and len(complete()) < 2:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and its Ray workers
    proc.wait()
    subprocess.run([str(Path(sys.executable).with_name("ray")), "stop", "--force"], capture_output=True, env=env)
    before = complete()
    assert 2 <= len(before) < 6, before

    again = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert again.returncode != 0 and "--resume" in again.stderr  # refuses to start over silently
    resumed = subprocess.run(cmd + ["--resume"], env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    after = complete()
    assert len(after) == 6
    for name, stamp in before.items():
        assert after[name] == stamp  # finished trials kept as they were, not rerun
    assert "| csl (alpha=8.0) |" in resumed.stdout  # and the leaderboard is printed


def test_search_space_is_checked(tmp_path):
    text = TINY + "search:\n  num_samples: 2\n  space:\n    lr: {lognormal: [0.1, 1]}\n"
    with pytest.raises(SweepError, match="search space 'lr' must be one of"):
        load_sweep(write(tmp_path, text))
    text = TINY + "search:\n  space:\n    lrate: {uniform: [0.1, 1]}\n"
    with pytest.raises(SweepError, match="'lrate' is not a config key"):
        load_sweep(write(tmp_path, text))


def test_asha_search_runs_sampled_trials(tmp_path):
    from bench.sweeps import run_sweep

    text = TINY.replace("  seed: [0, 1]", "  seed: [0]").replace(
        "  - {name: supervised, framework: supervised}\n  - {name: fixed, selector: fixed}\n", ""
    ) + "search:\n  num_samples: 3\n  grace_period: 2\n  reduction_factor: 2\n  space:\n    lr: {loguniform: [0.001, 0.1]}\n    selector.alpha: {choice: [2.0, 8.0]}\n"
    sweep = load_sweep(write(tmp_path, text))
    import ray

    try:
        folder = run_sweep(sweep, tmp_path / "store", verbose=0)
    finally:
        ray.shutdown()
    runs = sorted(folder.glob("csl-seed=0-*/record.json"))
    assert len(runs) == 3
    configs = [json.loads(r.read_text())["config"] for r in runs]
    assert all(0.001 <= c["lr"] <= 0.1 and c["selector_params"]["alpha"] in (2.0, 8.0) for c in configs)
    assert len({c["lr"] for c in configs}) == 3
