"""Evaluation on the validation split: whole image, sliding window or centre crop, one
confusion matrix summed over the dataset."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from bench.contract.metrics import IoUMeter, SelectionQualityMeter
from bench.contract import Selection


def _positions(size: int, window: int, stride: int) -> list[int]:
    if size <= window:
        return [0]
    steps = math.ceil((size - window) / stride)
    return sorted({min(i * stride, size - window) for i in range(steps + 1)})


@torch.no_grad()
def sliding_window_probs(model, image: Tensor, num_classes: int, window: int, stride: int) -> Tensor:
    """Softmax averaged over overlapping windows, each pixel divided by its window count."""
    b, _, h, w = image.shape
    ph, pw = max(window - h, 0), max(window - w, 0)
    padded = F.pad(image, (0, pw, 0, ph)) if ph or pw else image
    hh, ww = padded.shape[-2:]
    total = torch.zeros(b, num_classes, hh, ww, device=image.device)
    count = torch.zeros(1, 1, hh, ww, device=image.device)
    for y in _positions(hh, window, stride):
        for x in _positions(ww, window, stride):
            tile = padded[:, :, y : y + window, x : x + window]
            total[:, :, y : y + window, x : x + window] += model(tile).float().softmax(dim=1)
            count[:, :, y : y + window, x : x + window] += 1
    return (total / count)[:, :, :h, :w]


def center_crop(image: Tensor, mask: Tensor, size: int) -> tuple[Tensor, Tensor]:
    h, w = image.shape[-2:]
    y, x = max((h - size) // 2, 0), max((w - size) // 2, 0)
    return image[..., y : y + size, x : x + size], mask[..., y : y + size, x : x + size]


def _batches(loader):
    """A loader's batches, its sub-batches of same-sized images (`eval_collate`) one by one."""
    for batch in loader:
        yield from batch if isinstance(batch, list) else [batch]


@torch.no_grad()
def evaluate(model, loader, num_classes: int, mode: str, crop: int, stride_fraction: float, device, autocast) -> dict:
    was_training = model.training
    model.eval()
    meter = IoUMeter(num_classes)
    for batch in _batches(loader):
        image, mask = batch["image"].to(device), batch["mask"].to(device)
        with autocast():
            if mode == "sliding":
                pred = sliding_window_probs(model, image, num_classes, crop, max(1, int(crop * stride_fraction))).argmax(1)
            else:
                if mode == "center":
                    image, mask = center_crop(image, mask, crop)
                pred = model(image).argmax(1)
        meter.update(pred, mask)
    model.train(was_training)
    return meter.compute()


@torch.no_grad()
def confidence_probe(model, loader, num_classes: int, device, autocast, limit: int) -> dict:
    """How well max confidence separates right from wrong predictions on unlabeled images
    (whole image, last model): the overlap that selection is about. The hidden truth goes
    to the selection-quality meter only."""
    was_training = model.training
    model.eval()
    meter = SelectionQualityMeter(num_classes, device=device)
    seen = 0
    for batch in _batches(loader):
        if seen >= limit:
            break
        image, gt = batch["image"][: limit - seen].to(device), batch["mask"][: limit - seen].to(device)
        with autocast():
            conf, label = model(image).float().softmax(1).max(1)
        meter.update(Selection(label=label, weight=conf, reliable=conf >= 0.95), gt)
        seen += image.shape[0]
    model.train(was_training)
    result = meter.compute()
    return {
        "confidence_auroc": result["auroc"],
        "accuracy": result["label_accuracy"],
        "precision_at_0.95": result["precision"],
        "coverage_at_0.95": result["coverage"],
        "images": seen,
    }
