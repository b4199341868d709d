"""A training step reads nothing on the host (on a GPU: never waits for the device).

On the CPU, `no_host_reads` raises on every call that would synchronise a GPU; on a CUDA
machine the same steps run under `torch.cuda.set_sync_debug_mode("error")`."""

import contextlib

import pytest
import torch

from bench.harness.config import load_config
from bench.tools.host_reads import HostReadError, cuda_sync_errors, no_host_reads
from bench.harness.train import Trainer

TINY = [
    "backbone=test_resnet", "crop=32", "batch_size=2", "iters=4", "eval_every=4", "log_every=2",
    "checkpoint_every=4", "probe_images=0", "head_channels=16", "aspp_dilations=[1,2]", "wandb_mode=disabled",
]
FRAMEWORKS = {
    "fixmatch": ["framework=fixmatch"],
    "unimatch": ["framework=unimatch"],
    "unimatch-mask-ema": ["framework=unimatch", "csl_mask_view=true", "ema_teacher=true"],
}


@pytest.mark.parametrize(
    "call",
    [
        lambda x: x.sum().item(),
        lambda x: bool((x > 0).any()),
        lambda x: float(x.max()),
        lambda x: x[x > 0.5],
        lambda x: x.nonzero(),
        lambda x: torch.bincount((x * 3).long().flatten(), minlength=3),
        lambda x: x.cpu(),
        lambda x: x.tolist(),
        lambda x: x.flatten().repeat_interleave(torch.tensor([1, 2, 1, 2])),
        lambda x: torch.masked_select(x, x > 0),
    ],
    ids=["item", "bool", "float", "bool-index", "nonzero", "bincount", "cpu", "tolist", "tensor-repeats", "masked_select"],
)
def test_every_kind_of_host_read_is_caught(call):
    x = torch.rand(2, 2)
    with pytest.raises(HostReadError, match="reads a tensor on the host"):
        with no_host_reads():
            call(x)


def test_device_side_work_passes():
    x = torch.rand(2, 3, 4)
    with no_host_reads():
        y = torch.where(x > 0.5, x, 0.0).sum(1).softmax(-1)
        y = y[:, torch.tensor([0, 1])].repeat_interleave(2, dim=1)  # integer index, int repeats
        torch.zeros(5, dtype=torch.int64).index_add_(0, (x * 4).long().flatten(), torch.ones((), dtype=torch.int64).expand(24))
    assert y.shape == (2, 4)


def _steps_without_host_reads(tmp_path, device, extra, guard):
    cfg = load_config(overrides=TINY + [f"out={tmp_path / 'run'}", f"device={device}", *extra])
    trainer = Trainer(cfg, show_progress=False)
    trainer.parts.model.train()
    streams = [iter(loader) for loader in trainer.parts.train_loaders(0)]
    for t in range(3):
        loaded = [next(s) for s in streams]  # loading is host work, outside the region
        # On CUDA the first step moves CPU-created selector state to the device (once per
        # run or resume); every step after it must not wait for the GPU.
        first_on_cuda = t == 0 and device == "cuda"
        with contextlib.nullcontext() if first_on_cuda else guard():
            trainer.step(t, loaded)
    trainer.read_steps()  # and what was deferred is still read and checked
    return trainer


@pytest.mark.parametrize("framework", list(FRAMEWORKS))
@pytest.mark.every_selector("selector")
def test_a_training_step_reads_nothing_on_the_host(tmp_path, framework, selector):
    trainer = _steps_without_host_reads(tmp_path, "cpu", FRAMEWORKS[framework] + [f"selector={selector}"], no_host_reads)
    assert trainer.parts.log.pending_steps == 3
    assert trainer.parts.log.meter.compute()["pixels"] > 0


def test_a_supervised_step_reads_nothing_on_the_host(tmp_path):
    trainer = _steps_without_host_reads(tmp_path, "cpu", ["framework=supervised"], no_host_reads)
    assert trainer.parts.log.pending_steps == 3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("framework", list(FRAMEWORKS))
@pytest.mark.every_selector("selector")
def test_a_cuda_step_never_synchronises(tmp_path, framework, selector):
    device = torch.device("cuda")
    trainer = _steps_without_host_reads(tmp_path, "cuda", FRAMEWORKS[framework] + [f"selector={selector}"], lambda: cuda_sync_errors(device))
    assert trainer.parts.log.meter.compute()["pixels"] > 0
