"""Trials bigger than one GPU: data-parallel training through Ray Train.

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

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

# Rank r draws its batches with seed + r * RANK_SEED_STRIDE (rank 0: the single-process stream).
RANK_SEED_STRIDE = 1_000_003


@dataclass(frozen=True)
class Replicas:
    """This process's place among the data-parallel workers (rank 0 of 1 when alone)."""

    rank: int = 0
    world: int = 1

    @staticmethod
    def current() -> "Replicas":
        if dist.is_available() and dist.is_initialized():
            return Replicas(dist.get_rank(), dist.get_world_size())
        return Replicas()

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The sum over workers (every worker gets it); the tensor itself when alone."""
        if self.world == 1:
            return tensor
        on_gpu = dist.get_backend() == "nccl"  # NCCL reduces CUDA tensors only
        total = tensor.to("cuda" if on_gpu else "cpu", copy=True)
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        return total.to(tensor.device)


def train_data_parallel(config, resume: bool = False, use_gpu: bool | None = None) -> dict:
    """Train `config` on `config.replicas` Ray Train workers; the run's record."""
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from bench.records import read_record

    started_ray = not ray.is_initialized()  # fit() starts a local Ray; leave none behind
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
    from bench.config import TrainConfig
    from bench.train import Trainer

    config = TrainConfig(**loop_config["config"])
    torch.set_num_threads(1)  # one core per CPU worker (Ray gives each one CPU)
    Trainer(config, resume=loop_config["resume"], show_progress=Replicas.current().is_main).run()
