"""A run on two data-parallel workers (Ray Train, gloo on the CPU): one record, written by
rank 0, whose selection counts are those of both workers' batches."""

import json

import pytest

from bench.harness.config import load_config
from bench.harness.launch import train
from bench.harness.train import Trainer

TINY = [
    "backbone=test_resnet", "crop=32", "batch_size=2", "iters=4", "eval_every=4", "log_every=2", "checkpoint_every=2",
    "probe_images=0", "head_channels=16", "aspp_dilations=[1,2]", "wandb_mode=disabled", "selector=fixed", "workers=0",
    "device=cpu", "scale_min=1.0", "scale_max=1.0",
]


def test_two_gloo_workers_train_one_run_and_sum_their_selection_counts(tmp_path, monkeypatch):
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    cfg = load_config(overrides=TINY + [f"out={tmp_path / 'two'}", "replicas=2"])
    record = train(cfg, show_progress=False)
    on_disk = json.loads((tmp_path / "two" / "record.json").read_text())
    assert on_disk["status"] == record.status == "complete" and on_disk["config"]["replicas"] == 2
    # every pixel of a 32 px crop of the synthetic images is labelled and inside the image:
    # 2 workers x 4 steps x (2 unlabelled + 2 mix images) x 32 x 32
    assert on_disk["selection"]["pixels"] == 2 * 4 * (2 + 2) * 32 * 32
    single = train(load_config(overrides=TINY + [f"out={tmp_path / 'one'}"]), show_progress=False)
    assert single.selection["pixels"] == 4 * (2 + 2) * 32 * 32
    assert [c["iter"] for c in on_disk["curves"]] == [2, 4] and all(c["loss"] == c["loss"] for c in on_disk["curves"])
    assert (tmp_path / "two" / "checkpoint.pt").is_file()
    import ray

    assert not ray.is_initialized()  # the local Ray it started is gone


def test_replicas_need_the_data_parallel_launcher(tmp_path):
    cfg = load_config(overrides=TINY + [f"out={tmp_path / 'run'}", "replicas=2"])
    with pytest.raises(ValueError, match="replicas=2 but this process is one of 1 workers.*train_data_parallel"):
        Trainer(cfg, show_progress=False)


def test_replicas_enter_the_config_hash_only_when_set():
    base = load_config(overrides=TINY)
    assert base.hash() == load_config(overrides=TINY + ["replicas=1"]).hash()
    assert base.hash() != load_config(overrides=TINY + ["replicas=2"]).hash()
    assert base.hash() == load_config(overrides=TINY + ["deterministic=true"]).hash()
