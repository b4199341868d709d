"""One harness training step against the bare UniMatch step (bench/tools/bare_step.py)
doing the same forward/backward passes on the same batch. Claim, asserted here: the
harness (framework step, selector seam, selection meter, loss bookkeeping) costs less
than 10% more than the bare step.

    pytest benchmarks/test_train_step.py        (CSLBENCH_QUICK=1: fewer rounds, for CI)
"""

import copy
import os
import time

import torch

from bench.harness.build import split_truth, to_device
from bench.harness.config import load_config
from bench.harness.train import Trainer
from bench.tools.bare_step import bare_unimatch_step

OVERRIDES = ["device=cpu", "wandb_mode=disabled", "selector=fixed", "framework=unimatch"]
QUICK = os.environ.get("CSLBENCH_QUICK") == "1"


def harness_step(trainer, t, loaded):
    """What the training loop does per step besides data loading and logging."""
    return trainer.step(t, loaded).loss.detach()


def test_harness_step_vs_bare_step(benchmark, ratio_log, tmp_path):
    trainer = Trainer(load_config(overrides=OVERRIDES + [f"out={tmp_path / 'run'}"]), show_progress=False)
    loaded = [next(iter(loader)) for loader in trainer.parts.train_loaders(0)]
    lab, unl, mix = (to_device(b, trainer.parts.device) for b in loaded)
    split_truth(lab, unl, mix)  # the bare step gets the same tensors (truth unused)
    model = copy.deepcopy(trainer.parts.model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.001, momentum=0.9)
    trainer.parts.model.train()
    model.train()
    trainer.parts.optimizer = torch.optim.SGD(trainer.parts.model.parameters(), lr=0.001, momentum=0.9)
    torch.manual_seed(0)  # the same feature-perturbation draw on both sides
    bare_loss = bare_unimatch_step(model, optimizer, lab, unl, mix)
    torch.manual_seed(0)
    assert harness_step(trainer, 0, loaded).item() == bare_loss.item()  # the same computation, from the same weights
    bare_times, harness_times = [], []
    for _ in range(1 if QUICK else 3):  # warm-up both
        bare_unimatch_step(model, optimizer, lab, unl, mix)
        harness_step(trainer, 0, loaded)
    for i in range(5 if QUICK else 15):  # interleaved, so drift in machine speed hits both alike
        t0 = time.perf_counter()
        bare_unimatch_step(model, optimizer, *(to_device(b, trainer.parts.device) for b in loaded)).item()
        bare_times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        harness_step(trainer, i, loaded).item()
        harness_times.append(time.perf_counter() - t0)
    trainer.read_steps()
    benchmark.pedantic(harness_step, args=(trainer, 0, loaded), rounds=2 if QUICK else 5, warmup_rounds=1)
    bare = sorted(bare_times)[len(bare_times) // 2] * 1e3
    harness = sorted(harness_times)[len(harness_times) // 2] * 1e3
    ratio = harness / bare
    benchmark.extra_info.update(bare_ms=round(bare, 2), harness_ms=round(harness, 2), ratio=round(ratio, 3))
    ratio_log.append(f"unimatch step  harness {harness:8.1f} ms  bare step {bare:8.1f} ms  ratio {ratio:5.3f}")
    assert ratio < 1.10, f"the harness step costs {ratio:.3f}x the bare step (claim: < 1.10x)"
