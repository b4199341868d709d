"""CUDA-only checks of the GPU path (skipped without a CUDA device; `make gpu-check` runs
them): kill-and-resume gives the uninterrupted record with deterministic kernels, and the
fused kernels agree with the definitions on the device."""

import json

import pytest
import torch

from bench.harness.config import load_config
from bench.harness.train import Trainer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

TINY = [
    "backbone=test_resnet", "crop=64", "batch_size=2", "iters=6", "eval_every=3", "log_every=1",
    "checkpoint_every=2", "probe_images=4", "head_channels=16", "aspp_dilations=[1,2]", "wandb_mode=disabled",
    "device=cuda", "deterministic=true", "selector=csl", "csl_mask_view=true",
]


class Stop(Exception):
    pass


def _record(out):
    record = json.loads((out / "record.json").read_text())
    return {k: record[k] for k in ("curves", "final", "selection")}


def test_kill_and_resume_with_deterministic_kernels_repeats_the_record_on_cuda(tmp_path):
    whole = Trainer(load_config(overrides=TINY + [f"out={tmp_path / 'whole'}"]), show_progress=False)
    whole.run()
    assert whole.books.record.determinism["enabled"] and whole.books.record.determinism["cudnn_deterministic"]

    cut = Trainer(load_config(overrides=TINY + [f"out={tmp_path / 'cut'}"]), show_progress=False)
    step = cut.optimise
    cut.optimise = lambda t, batch: (_ for _ in ()).throw(Stop()) if t + 1 == 5 else step(t, batch)
    with pytest.raises(Stop):
        cut.run()
    Trainer(load_config(overrides=TINY + [f"out={tmp_path / 'cut'}"]), resume=True, show_progress=False).run()
    assert _record(tmp_path / "cut") == _record(tmp_path / "whole")


def _reference(probs):
    p = probs.double()
    conf = p.amax(1, keepdim=True)
    below = torch.where(p < conf, p, 0.0)
    return conf.squeeze(1), (below.sum(1), (below * below).sum(1))


@pytest.mark.parametrize("shape", [(2, 21, 65, 97), (1, 2, 8, 8), (3, 19, 1, 1)])
def test_triton_and_compiled_moments_on_cuda_match_the_definitions(shape, monkeypatch):
    from bench.contract.confidence import ClassMoments, _reduced_moments
    from bench.contract.triton_moments import triton_class_moments

    g = torch.Generator().manual_seed(0)
    probs = (torch.randn(*shape, generator=g) * 3).softmax(1).cuda()
    conf, sums = _reference(probs)
    monkeypatch.setenv("CSLBENCH_KERNELS", "compile")
    for moments in (triton_class_moments(probs), ClassMoments(*_reduced_moments(probs))):
        torch.testing.assert_close(moments.confidence.double(), conf)
        torch.testing.assert_close(moments.below_sum.double(), sums[0], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(moments.below_sq.double(), sums[1], atol=1e-6, rtol=1e-5)
        assert torch.equal(moments.label, probs.double().argmax(1))


@pytest.mark.parametrize("mode", ["eager", "compile", "triton"])
def test_every_selector_on_cuda_matches_its_cpu_output(mode, monkeypatch):
    from bench.tools.kernels import available_context
    from bench.contract import available_selectors, build_context, get_selector

    g = torch.Generator().manual_seed(1)
    probs = (torch.randn(2, 5, 24, 24, generator=g) * 3).softmax(1)
    valid = torch.rand(2, 24, 24, generator=g) > 0.2
    for name in available_selectors():
        if name == "ups":  # its passes are random draws, on another generator on the GPU
            continue
        monkeypatch.setenv("CSLBENCH_KERNELS", "eager")
        cpu_sel = get_selector(name, num_classes=5)
        cpu = cpu_sel.select(probs, valid, **build_context(cpu_sel, available_context(probs)))
        monkeypatch.setenv("CSLBENCH_KERNELS", mode)
        sel = get_selector(name, num_classes=5)
        gpu = sel.select(probs.cuda(), valid.cuda(), **build_context(sel, available_context(probs.cuda())))
        torch.testing.assert_close(gpu.weight.cpu(), cpu.weight, atol=1e-5, rtol=0, msg=name)
        assert torch.equal(gpu.label.cpu(), cpu.label), name
