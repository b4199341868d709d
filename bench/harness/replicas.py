"""This process's place among a run's data-parallel workers (rank 0 of 1 when alone)."""

from __future__ import annotations

from dataclasses import dataclass

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
