"""Pretrained encoders offline: the packaged ImageNet weights are right (not just loaded),
loads are strict, the input scale follows the weights, a warm-started head is not sped up,
and the ASPP is told when its dilations miss the feature map."""

import hashlib
import os
import warnings
from collections import defaultdict

import matplotlib
import matplotlib.image
import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F

from bench.harness.config import load_config
from bench.harness.models import ASPPFitWarning, DeepLabV3Plus, WeightsError, aspp_reach, build_model
from bench.harness.pretrained import PACKAGED, lite_to_timm, load_strict, packaged_file

skimage_data = pytest.importorskip("skimage.data")


def _photo(array) -> torch.Tensor:
    """An (H, W, 3) uint8 photo as the ImageNet classifier sees it: 224x224, scaled to
    [-1, 1] (EfficientNet-Lite's mean = std = 0.5)."""
    x = torch.from_numpy(np.array(array, dtype=np.uint8)).permute(2, 0, 1).float()[None] / 255
    x = F.interpolate(x, size=(224, 224), mode="bilinear", antialias=True, align_corners=False)
    return (x - 0.5) / 0.5


PHOTOS = {  # ImageNet-1k classes: 281-285 domestic cats, 967 espresso, 652 military uniform
    "cat (skimage chelsea)": (lambda: skimage_data.chelsea(), set(range(281, 286))),
    "espresso (skimage coffee)": (lambda: skimage_data.coffee(), {967}),
    "Grace Hopper in uniform (matplotlib sample)": (
        lambda: matplotlib.image.imread(os.path.join(matplotlib.get_data_path(), "sample_data", "grace_hopper.jpg")),
        {652},
    ),
}


def _top1(model, photos) -> dict[str, int]:
    with torch.no_grad():
        return {name: int(model(_photo(load())).argmax()) for name, (load, _) in photos.items()}


def _classifier(name: str, state_map) -> torch.nn.Module:
    model = timm.create_model(PACKAGED[name][1], pretrained=False).eval()
    state = state_map(torch.load(packaged_file(name), map_location="cpu", weights_only=True), model)
    load_strict(model, state, name, "-")
    return model


@pytest.mark.parametrize("name", sorted(PACKAGED))
def test_packaged_imagenet_weights_classify_natural_photos(name):
    top1 = _top1(_classifier(name, lite_to_timm), PHOTOS)
    for photo, (_, classes) in PHOTOS.items():
        assert top1[photo] in classes, f"{name} puts the {photo} at class {top1[photo]}"


def test_the_same_check_fails_with_the_keys_mapped_out_of_order():
    """Pair the checkpoint's tensors with timm's in order within each shape, shifted by one:
    every shape still matches, so only the classification can tell."""

    def shifted(state, model):
        target = lite_to_timm(state, model)
        by_shape = defaultdict(list)
        for key, value in target.items():
            by_shape[tuple(value.shape)].append(key)
        out = dict(target)
        for keys in by_shape.values():
            for a, b in zip(keys, keys[1:] + keys[:1]):
                out[a] = target[b]
        return out

    top1 = _top1(_classifier("efficientnet_lite0", shifted), PHOTOS)
    assert sum(top1[photo] in classes for photo, (_, classes) in PHOTOS.items()) == 0, top1


def test_segmentation_encoder_loads_every_tensor_and_records_the_file():
    model = DeepLabV3Plus("tf_efficientnet_lite0", 11, head_channels=32, aspp_dilations=[1, 2], pretrained="efficientnet_lite0", output_stride=16)
    path = packaged_file("efficientnet_lite0")
    described = model.describe()
    assert described["weights"]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert described["weights"]["tensors_loaded"] == len(model.encoder.state_dict()) == 288
    assert described["weights"]["tensors_in_file"] == 296  # + conv_head, its batch norm, the classifier
    assert described["input_normalization"] == {"mean": [0.5] * 3, "std": [0.5] * 3}
    assert described["output_stride"] == 16
    classifier = _classifier("efficientnet_lite0", lite_to_timm)
    for key, value in model.encoder.state_dict().items():  # the encoder is the classifier's trunk
        assert torch.equal(value, classifier.state_dict()[key]), key
    # without its file (a checkpoint follows): same architecture and input scale, no weights
    bare = DeepLabV3Plus("tf_efficientnet_lite0", 11, head_channels=32, aspp_dilations=[1, 2], pretrained="efficientnet_lite0", output_stride=16, load_weights=False)
    assert bare.weights is None and bare.normalization == model.normalization


def test_pretrained_loads_are_strict_for_the_encoder(tmp_path):
    encoder_keys = DeepLabV3Plus("test_resnet", 3, head_channels=16).encoder.state_dict()
    state = dict(encoder_keys)
    first = next(iter(state))
    del state[first]
    conv = next(k for k, v in encoder_keys.items() if v.ndim == 4 and k != first)
    state[conv] = torch.zeros(1, 1, 1, 1)
    torch.save(state, tmp_path / "partial.pth")
    with pytest.raises(WeightsError, match=rf"missing 1 \({first}\), mis-shaped 1 \({conv} \(1, 1, 1, 1\)"):
        DeepLabV3Plus("test_resnet", 3, head_channels=16, pretrained=str(tmp_path / "partial.pth"))
    with pytest.raises(WeightsError, match="backbone=tf_efficientnet_lite0, not backbone=resnet18; set backbone=tf_efficientnet_lite0"):
        DeepLabV3Plus("resnet18", 3, pretrained="efficientnet_lite0")
    lite = timm.create_model("tf_efficientnet_lite0", features_only=True)
    with pytest.raises(WeightsError, match="'_blocks.0._se_reduce.weight' has no place"):
        lite_to_timm({"_blocks.0._se_reduce.weight": torch.zeros(1)}, lite)


def test_training_feeds_the_encoder_inputs_at_its_weights_scale(tmp_path):
    from bench.harness.train import Trainer

    cfg = load_config(overrides=[
        "backbone=tf_efficientnet_lite0", "pretrained=efficientnet_lite0", "output_stride=16", "crop=32", "batch_size=2",
        "iters=2", "eval_every=2", "log_every=1", "probe_images=2", "head_channels=16", "aspp_dilations=[1]",
        "framework=supervised", "wandb_mode=disabled", f"out={tmp_path / 'run'}",
    ])
    trainer = Trainer(cfg, show_progress=False)
    raw = trainer.parts.source.load(trainer.parts.split.val[0])[0]
    expected = torch.from_numpy(raw).permute(2, 0, 1).float() / 255 * 2 - 1  # (x - 0.5) / 0.5
    assert torch.allclose(trainer.parts.eval_loader().dataset[0]["image"], expected, atol=1e-6)
    batch = next(iter(trainer.parts.train_loaders(0)[0]))["image"]
    assert batch.min() >= -1 - 1e-6 and batch.max() <= 1 + 1e-6 and batch.min() < -0.5  # ImageNet's scale reaches -2.1
    record = trainer.run()
    assert record.model["weights"]["tensors_loaded"] == 288
    assert record.model["input_normalization"]["mean"] == [0.5, 0.5, 0.5]


def test_the_head_multiplier_is_for_a_fresh_head_only(tmp_path):
    from bench.harness.train import Trainer

    base = ["backbone=test_resnet", "crop=64", "batch_size=2", "iters=2", "eval_every=2", "probe_images=2", "head_channels=16",
            "aspp_dilations=[1]", "framework=supervised", "lr=0.01", "wandb_mode=disabled"]
    first = Trainer(load_config(overrides=base + [f"out={tmp_path / 'warm'}"]), show_progress=False)
    assert first.config.head_lr_mult == 10.0 and [g["lr"] for g in first.parts.optimizer.param_groups] == [0.01, pytest.approx(0.1)]
    first.run()
    warm = Trainer(load_config(overrides=base + [f"out={tmp_path / 'next'}", f"init_from={tmp_path / 'warm'}"]), show_progress=False)
    assert warm.config.head_lr_mult == 1.0 and [g["lr"] for g in warm.parts.optimizer.param_groups] == [0.01, 0.01]
    assert warm.run().model["peak_lr"] == {"backbone": 0.01, "head": 0.01}
    asked = load_config(overrides=base + [f"out={tmp_path / 'x'}", f"init_from={tmp_path / 'warm'}", "head_lr_mult=5"])
    assert asked.head_lr_mult == 5.0  # an explicit value is the user's
    assert asked.hash() != load_config(overrides=base + [f"out={tmp_path / 'x'}", f"init_from={tmp_path / 'warm'}"]).hash()


@pytest.mark.parametrize(
    "crop, stride, dilations, side, outside",
    [(128, 32, [6, 12, 18], 4, [6, 12, 18]), (176, 16, [2, 4, 6], 11, []), (176, 16, [6, 12, 18], 11, [12, 18]), (64, 8, [7, 8], 8, [8])],
)
def test_aspp_reach(crop, stride, dilations, side, outside):
    assert aspp_reach(crop, stride, dilations) == (side, outside)


def test_a_model_whose_aspp_misses_its_map_is_flagged(tmp_path):
    cfg = load_config(overrides=["backbone=test_resnet", "crop=64", "aspp_dilations=[6,12,18]", f"out={tmp_path}"])
    with pytest.warns(ASPPFitWarning, match=r"every dilation of \[6, 12, 18\] reaches past the last feature map \(2x2 at crop 64, output stride 32\)"):
        build_model(cfg, 3)
    fits = load_config(overrides=["backbone=test_resnet", "crop=64", "aspp_dilations=[1]", f"out={tmp_path}"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        build_model(fits, 3)


def test_a_sweep_whose_weights_are_not_here_stops_before_anything_runs(tmp_path, monkeypatch):
    from bench.orchestration.sweeps import SweepError, check_inputs

    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache" / "hub"))
    configs = {
        "timm": load_config(overrides=["backbone=resnet18", "pretrained=timm", f"out={tmp_path / 'a'}"]),
        "lite": load_config(overrides=["backbone=resnet18", "pretrained=efficientnet_lite0", f"out={tmp_path / 'b'}"]),
        "fine": load_config(overrides=["backbone=tf_efficientnet_lite0", "pretrained=efficientnet_lite0", f"out={tmp_path / 'c'}"]),
    }
    with pytest.raises(SweepError) as caught:
        check_inputs(configs)
    message = str(caught.value)
    assert "no cached pretrained weights for 'resnet18'" in message and "pretrained=/path/to/weights.pth" in message
    assert "set backbone=tf_efficientnet_lite0" in message and "needed by 1 trials: lite" in message
    assert "needed by 1 trials: fine" not in message
