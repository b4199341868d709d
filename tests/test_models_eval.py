import time

import pytest
import torch

from bench.harness.evaluate import center_crop, sliding_window_probs
from bench.harness.models import DeepLabV3Plus, WeightsError


def test_outputs_and_feature_perturbation():
    torch.manual_seed(0)
    m = DeepLabV3Plus("test_resnet", num_classes=5, head_channels=16, aspp_dilations=[1, 2])
    x = torch.randn(2, 3, 40, 48)
    assert m(x).shape == (2, 5, 40, 48)
    m.train()
    clean, perturbed = m(x, need_fp=True)
    assert clean.shape == perturbed.shape == (2, 5, 40, 48) and not torch.allclose(clean, perturbed)
    m.eval()
    a, b = m(x, stochastic=True), m(x, stochastic=True)
    assert not torch.equal(a, b)  # UPS passes differ even in eval mode
    assert torch.equal(m(x), m(x))  # ordinary eval passes do not
    head = {id(p) for p in m.head_parameters()}
    assert head.isdisjoint({id(p) for p in m.backbone_parameters()})
    assert len(head) + len(m.backbone_parameters()) == len(list(m.parameters()))


def test_mc_logits_are_the_stochastic_passes_for_one_encoding():
    from bench.harness.frameworks import mc_logits

    torch.manual_seed(0)
    m = DeepLabV3Plus("test_resnet", num_classes=5, head_channels=16, aspp_dilations=[1, 2]).eval()
    x = torch.randn(2, 3, 40, 48)
    torch.manual_seed(7)
    one_by_one = torch.stack([m(x, stochastic=True) for _ in range(4)])  # the definition: whole passes
    torch.manual_seed(7)
    shared = m.mc_logits(x, 4)
    assert shared.shape == (4, 2, 5, 40, 48) and torch.allclose(shared, one_by_one, atol=1e-6)
    assert not torch.allclose(shared[0], shared[1])  # the draws differ
    m.train()
    torch.manual_seed(7)
    through = mc_logits(m, x, 4)  # the frameworks' entry: eval mode for the passes, then back
    assert m.training and torch.allclose(through, one_by_one, atol=1e-6)

    class Wrapped(torch.nn.Module):  # data parallelism wraps the model as .module
        def __init__(self, module):
            super().__init__()
            self.module = module

    torch.manual_seed(7)
    assert torch.allclose(mc_logits(Wrapped(m), x, 4), one_by_one, atol=1e-6)


def test_pretrained_weights_from_a_local_file(tmp_path):
    torch.manual_seed(1)
    source = DeepLabV3Plus("test_resnet", num_classes=3, head_channels=16)
    path = tmp_path / "backbone.pth"
    torch.save({"state_dict": {f"backbone.{k}": v for k, v in source.encoder.state_dict().items()}}, path)
    torch.manual_seed(2)
    loaded = DeepLabV3Plus("test_resnet", num_classes=3, head_channels=16, pretrained=str(path))
    for k, v in source.encoder.state_dict().items():
        assert torch.equal(loaded.encoder.state_dict()[k], v)
    with pytest.raises(WeightsError, match="is not a file"):
        DeepLabV3Plus("test_resnet", num_classes=3, pretrained=str(tmp_path / "nope.pth"))
    assert loaded.weights.tensors_loaded == len(source.encoder.state_dict()) == loaded.weights.tensors_in_file
    torch.save({"unrelated.weight": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(WeightsError, match=rf"does not fit the encoder: missing {len(source.encoder.state_dict())} "):
        DeepLabV3Plus("test_resnet", num_classes=3, pretrained=str(tmp_path / "bad.pth"))


def test_timm_weights_missing_from_cache_fail_fast(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache" / "hub"))
    start = time.perf_counter()
    with pytest.raises(WeightsError, match="no cached pretrained weights for 'resnet18'.*pretrained=/path"):
        DeepLabV3Plus("resnet18", num_classes=3, pretrained="timm")
    assert time.perf_counter() - start < 20  # no hub lookup (those hang ~50 s offline)


class Pointwise(torch.nn.Module):
    """A per-pixel model: its prediction at a pixel cannot depend on the window around it."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 1)

    def forward(self, x):
        return self.conv(x)


@pytest.mark.parametrize("size", [(37, 53), (20, 20), (64, 40)])
def test_sliding_window_equals_whole_image_for_a_pointwise_model(size):
    torch.manual_seed(0)
    model = Pointwise().eval()
    image = torch.randn(2, 3, *size)
    whole = model(image).softmax(1)
    slid = sliding_window_probs(model, image, 4, window=24, stride=16)
    assert slid.shape == whole.shape and torch.allclose(slid, whole, atol=1e-6)


def test_center_crop():
    image = torch.arange(100.0).view(1, 1, 10, 10)
    mask = torch.arange(100).view(1, 10, 10)
    ci, cm = center_crop(image, mask, 4)
    assert ci[0, 0, 0, 0] == 33 and cm[0, 0, 0] == 33 and ci.shape[-2:] == (4, 4)


def test_batched_evaluation_matches_one_image_at_a_time():
    import contextlib

    import numpy as np

    from bench.data.loaders import eval_collate
    from bench.harness.evaluate import confidence_probe, evaluate

    torch.manual_seed(0)
    m = DeepLabV3Plus("test_resnet", num_classes=4, head_channels=16, aspp_dilations=[1, 2]).eval()
    g = torch.Generator().manual_seed(1)
    shapes = [(32, 40), (32, 40), (24, 24), (32, 40), (32, 40), (32, 40), (24, 24)]  # sizes mixed, as in VOC
    items = []
    for h, w in shapes:
        mask = torch.randint(0, 4, (h, w), generator=g)
        mask[:3] = 255  # ignored pixels stay out
        items.append({"image": torch.randn(3, h, w, generator=g), "mask": mask})
    confusion = np.zeros((4, 4))
    for it in items:  # the reference: one image per forward, the confusion summed by hand
        pred = m(it["image"][None]).argmax(1)[0]
        keep = it["mask"] != 255
        np.add.at(confusion, (it["mask"][keep].numpy(), pred[keep].numpy()), 1)
    iou = confusion.diagonal() / (confusion.sum(0) + confusion.sum(1) - confusion.diagonal())
    loader = torch.utils.data.DataLoader(items, batch_size=3, collate_fn=eval_collate)
    assert [len(b) for b in loader] == [2, 1, 1]  # [A A B] -> 2 sub-batches; [A A A]; [B]
    result = evaluate(m, loader, 4, "whole", 32, 2 / 3, torch.device("cpu"), contextlib.nullcontext)
    assert result["pixels"] == confusion.sum() and abs(result["miou"] - np.nanmean(iou)) < 1e-9
    probe = confidence_probe(m, loader, 4, torch.device("cpu"), contextlib.nullcontext, limit=2)
    assert probe["images"] == 2  # the limit cuts inside a batch of 3
