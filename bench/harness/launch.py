"""Where a run runs: in this process, or on data-parallel Ray Train workers.

Trials bigger than one GPU:

`train_data_parallel(config, replicas)` starts `config.replicas` workers with Ray Train's
`TorchTrainer` (NCCL on GPUs, gloo on CPUs); each runs the ordinary `Trainer`, which sees
the process group and then wraps its model in DistributedDataParallel, draws its own
stream of batches (rank 0 the single-process stream), and sums what it measured across
workers at log steps and checkpoints: the selection-quality counts and losses in the
record are those of the global batch, identical on every worker. Only rank 0 writes the
record, checkpoints and W&B. `batch_size` stays per worker: the recipes' global batch of
16 on 4 GPUs is `batch_size=4 replicas=4`.

Not shared across workers: a stateful selector's state (FreeMatch's EMAs, FlexMatch's
counts, DAW's Gaussians) is updated from each worker's own batch, and a resumed run
continues every worker from rank 0's selector state and random state.
"""

from __future__ import annotations

from pathlib import Path

import torch

from bench.harness.config import TrainConfig
from bench.harness.replicas import Replicas
from bench.harness.train import Trainer
from bench.results.record import RunRecord, read_record


def train(config: TrainConfig, resume: bool = False, show_progress: bool = True) -> RunRecord:
    """One run: in this process, or on `config.replicas` data-parallel Ray Train workers."""
    if config.replicas > 1 and Replicas.current().world == 1:
        return train_data_parallel(config, resume=resume)
    return Trainer(config, resume=resume, show_progress=show_progress).run()


def train_data_parallel(config: TrainConfig, resume: bool = False, use_gpu: bool | None = None) -> RunRecord:
    """Train `config` on `config.replicas` Ray Train workers; the run's record."""
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    started_ray = not ray.is_initialized()  # leave none behind
    if started_ray:  # a private Ray: fit()'s own ray.init() would join whatever cluster /tmp/ray last named, even a dead one
        ray.init(address="local", include_dashboard=False, configure_logging=False)
    if use_gpu is None:
        use_gpu = config.device.startswith("cuda") or (config.device == "auto" and torch.cuda.is_available())
    config.device = "cuda" if use_gpu else "cpu"
    trainer = TorchTrainer(
        _worker,
        train_loop_config={"config": config.to_dict(), "resume": resume},
        scaling_config=ScalingConfig(num_workers=config.replicas, use_gpu=use_gpu, resources_per_worker={"CPU": 1, **({"GPU": 1} if use_gpu else {})}),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=RunConfig(name=f"ddp-{config.hash()}", storage_path=str(_ray_storage(config))),
    )
    try:
        result = trainer.fit()
    finally:
        if started_ray:
            ray.shutdown()
    if result.error is not None:
        raise result.error
    return read_record(config.out)


def _ray_storage(config) -> Path:
    """Ray Train's own bookkeeping, beside the run folder (the run's files are our records)."""
    return Path(config.out).resolve().parent / ".ray-train"


def _worker(loop_config: dict) -> None:
    config = TrainConfig(**loop_config["config"])
    torch.set_num_threads(1)  # one core per CPU worker (Ray gives each one CPU)
    Trainer(config, resume=loop_config["resume"], show_progress=Replicas.current().is_main).run()
