"""Precision where it matters: under bf16 autocast the model's logits and every selector
stay in fp32 (tested with CPU autocast; CUDA autocast takes the same code path)."""

import pytest
import torch

from bench.config import load_config
from bench.models import build_model
from bench.selection import available_selectors, build_context, get_selector

BF16 = dict(device_type="cpu", dtype=torch.bfloat16)


def test_logits_leave_the_model_in_fp32_under_autocast():
    cfg = load_config(overrides=["backbone=test_resnet", "head_channels=16", "aspp_dilations=[1,2]", "wandb_mode=disabled"])
    model = build_model(cfg, 5).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.autocast(**BF16):
        plain = model(x)
        clean, perturbed = model(x, need_fp=True)
        stochastic = model(x, stochastic=True)
        encoder_out = model.encoder(x)[-1]
    assert encoder_out.dtype == torch.bfloat16  # autocast is really on for the backbone
    assert {t.dtype for t in (plain, clean, perturbed, stochastic)} == {torch.float32}


@pytest.mark.parametrize("name", available_selectors())
def test_every_selector_gives_its_fp32_output_inside_bf16_autocast(name):
    g = torch.Generator().manual_seed(0)
    probs = (torch.randn(2, 6, 24, 24, generator=g) * 3).softmax(1)
    valid = torch.rand(2, 24, 24, generator=g) > 0.1
    labeled = (torch.randn(2, 6, 24, 24, generator=g) * 3).softmax(1)
    noise = torch.randn(4, 2, 6, 24, 24, generator=g)
    available = {
        "progress": 0.4,
        "labeled_probs": labeled,
        "labeled_target": labeled.argmax(1),
        "mc_logits": lambda passes: probs.log() + 0.05 * noise[:passes],
    }
    outs = []
    for autocast in (False, True):
        sel = get_selector(name, num_classes=6, **({"passes": 4} if get_selector(name, num_classes=6).mc_passes else {}))
        with torch.autocast(**BF16, enabled=autocast):
            for _ in range(2):  # a second call sees the state the first left
                out = sel.select(probs, valid, **build_context(sel, available))
        outs.append(out)
    fp32, bf16 = outs
    assert torch.equal(fp32.label, bf16.label) and torch.equal(fp32.reliable, bf16.reliable)
    assert bf16.weight.dtype == torch.float32 and torch.equal(fp32.weight, bf16.weight)
