"""Precision where it matters: under bf16 autocast the model's logits and every selector
stay in fp32 (tested with CPU autocast; CUDA autocast takes the same code path)."""

import pytest
import torch

from bench.harness.config import load_config
from bench.harness.models import build_model
from bench.tools.check_selector import check_precision

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


@pytest.mark.every_selector("name")
def test_every_selector_gives_its_fp32_output_inside_bf16_autocast(name):
    """And bf16 probabilities select as their fp32 values do (bench/tools/check_selector.py)."""
    check_precision(name)
