"""Augmentations, with every random draw taken from a generator the caller seeds.

The caller derives that seed from (run seed, iteration, sample slot), so a sample's
augmentation never depends on how many loader workers there are or on where a resumed run
restarted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from torch import Tensor

from bench.labels import IGNORE

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def sample_generator(*keys: int) -> torch.Generator:
    """A generator seeded from integer keys (run seed, stream, iteration, slot, ...)."""
    h = 0x9E3779B97F4A7C15
    for k in keys:
        h = (h ^ (int(k) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return torch.Generator().manual_seed(h & 0x7FFFFFFFFFFFFFFF)


def uniform(g: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=g))


def chance(g: torch.Generator, p: float) -> bool:
    return float(torch.rand((), generator=g)) < p


def to_tensor(image_uint8, mask_uint8) -> tuple[Tensor, Tensor]:
    """(H, W, 3) uint8 and (H, W) uint8 arrays -> float (3, H, W) in [0, 1] and int64 (H, W)."""
    image = torch.from_numpy(image_uint8).permute(2, 0, 1).float().div_(255.0)
    mask = torch.from_numpy(mask_uint8).long()
    return image, mask


@dataclass(frozen=True)
class Normalization:
    """Per-channel (x - mean) / std: the input scale an encoder's weights were trained with."""

    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self):  # built once: __call__ runs for every view of every sample
        object.__setattr__(self, "_mean", torch.tensor(self.mean).view(3, 1, 1))
        object.__setattr__(self, "_std", torch.tensor(self.std).view(3, 1, 1))

    def __call__(self, image: Tensor) -> Tensor:
        """(3, H, W) or (B, 3, H, W) in [0, 1] -> the network's input scale."""
        return (image - self._mean) / self._std


normalize = Normalization()  # ImageNet's: for models trained from scratch


def weak(
    image: Tensor, mask: Tensor, crop: int, scale: tuple[float, float], g: torch.Generator
) -> tuple[Tensor, Tensor, Tensor]:
    """Random rescale, crop (padding: image 0, mask IGNORE) and horizontal flip. Also
    returns which pixels are image rather than padding (an unlabeled image's valid mask
    must not come from its hidden labels)."""
    h, w = image.shape[-2:]
    s = uniform(g, *scale)
    nh, nw = max(1, round(h * s)), max(1, round(w * s))
    image = F.interpolate(image[None], size=(nh, nw), mode="bilinear", align_corners=False)[0]
    # nearest-exact samples at pixel centres, as bilinear with align_corners=False does;
    # plain "nearest" would shift the mask against the image by up to half a pixel.
    mask = F.interpolate(mask[None, None].float(), size=(nh, nw), mode="nearest-exact")[0, 0].long()
    inside = torch.ones(nh, nw, dtype=torch.bool)
    ph, pw = max(crop - nh, 0), max(crop - nw, 0)
    if ph or pw:
        image = F.pad(image, (0, pw, 0, ph), value=0.0)
        mask = F.pad(mask, (0, pw, 0, ph), value=IGNORE)
        inside = F.pad(inside, (0, pw, 0, ph), value=False)
    h, w = image.shape[-2:]
    y = int(torch.randint(0, h - crop + 1, (), generator=g))
    x = int(torch.randint(0, w - crop + 1, (), generator=g))
    window = (slice(y, y + crop), slice(x, x + crop))
    image, mask, inside = image[(slice(None), *window)], mask[window], inside[window]
    if chance(g, 0.5):
        image, mask, inside = image.flip(-1), mask.flip(-1), inside.flip(-1)
    return image.contiguous(), mask.contiguous(), inside.contiguous()


def colour_jitter(image: Tensor, g: torch.Generator, strength: tuple[float, float, float, float], p: float) -> Tensor:
    if not chance(g, p):
        return image
    b, c, s, hue = strength
    ops = torch.randperm(4, generator=g).tolist()
    for op in ops:
        if op == 0 and b:
            image = TF.adjust_brightness(image, uniform(g, 1 - b, 1 + b))
        elif op == 1 and c:
            image = TF.adjust_contrast(image, uniform(g, 1 - c, 1 + c))
        elif op == 2 and s:
            image = TF.adjust_saturation(image, uniform(g, 1 - s, 1 + s))
        elif op == 3 and hue:
            image = TF.adjust_hue(image, uniform(g, -hue, hue))
    return image.clamp(0, 1)


BLUR_SIGMA = (0.1, 2.0)  # UniMatch's range, sized for 321-801 px crops


def blur(image: Tensor, g: torch.Generator, p: float, sigma_range: tuple[float, float] = BLUR_SIGMA) -> Tensor:
    if not chance(g, p):
        return image
    sigma = uniform(g, *sigma_range)
    k = max(3, 2 * math.ceil(2 * sigma) + 1)
    return TF.gaussian_blur(image, kernel_size=[k, k], sigma=[sigma, sigma])


def strong(image: Tensor, g: torch.Generator, blur_sigma: tuple[float, float] = BLUR_SIGMA) -> Tensor:
    """Photometric strong view (UniMatch): colour jitter p=0.8, grayscale p=0.2, blur p=0.5."""
    image = colour_jitter(image, g, (0.5, 0.5, 0.5, 0.25), p=0.8)
    if chance(g, 0.2):
        image = TF.rgb_to_grayscale(image, num_output_channels=3)
    return blur(image, g, p=0.5, sigma_range=blur_sigma)


def mild(image: Tensor, g: torch.Generator, blur_sigma: tuple[float, float] = BLUR_SIGMA) -> Tensor:
    """The CSL masking view's mild photometric change: jitter 0.2 (p=0.8), blur p=0.5."""
    return blur(colour_jitter(image, g, (0.2, 0.2, 0.2, 0.2), p=0.8), g, p=0.5, sigma_range=blur_sigma)


def cutmix_box(size: int, g: torch.Generator, p: float = 0.5) -> Tensor:
    """Bool (size, size) box to paste from the mix source (all False with prob 1 - p);
    area 2-40% of the crop, aspect ratio in [0.3, 1/0.3] (UniMatch's ranges)."""
    box = torch.zeros(size, size, dtype=torch.bool)
    if not chance(g, p):
        return box
    area = uniform(g, 0.02, 0.4) * size * size
    ratio = math.exp(uniform(g, math.log(0.3), math.log(1 / 0.3)))
    bw = min(size, max(1, round(math.sqrt(area * ratio))))
    bh = min(size, max(1, round(math.sqrt(area / ratio))))
    x = int(torch.randint(0, size - bw + 1, (), generator=g))
    y = int(torch.randint(0, size - bh + 1, (), generator=g))
    box[y : y + bh, x : x + bw] = True
    return box
