"""CSL's second component: hide reliable pixels so the network must infer them from context.

A 32 x 32-pixel grid covers the image; each block is switched on with probability 0.7 and
the pixels that are both in an "on" block and reliable are hidden (set to the mean
colour, i.e. 0 after normalisation). Randomness comes only from the generator passed in,
so a seeded run hides the same pixels every time.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def reliable_block_mask(
    reliable: Tensor,
    block_size: int = 32,
    ratio: float = 0.7,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Bool (B, H, W): the pixels to hide, reliable pixels inside randomly chosen blocks."""
    if reliable.dim() != 3 or reliable.dtype != torch.bool:
        raise ValueError(
            f"reliable_block_mask: reliable must be a bool (B, H, W) tensor, got "
            f"{reliable.dtype} of shape {tuple(reliable.shape)}"
        )
    if block_size < 1:
        raise ValueError(f"reliable_block_mask: block_size must be >= 1, got {block_size}")
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"reliable_block_mask: ratio must lie in [0, 1], got {ratio}")
    b, h, w = reliable.shape
    grid = (b, math.ceil(h / block_size), math.ceil(w / block_size))
    gen_device = generator.device if generator is not None else torch.device("cpu")
    on = torch.rand(grid, generator=generator, device=gen_device) < ratio
    on = on.to(reliable.device)
    on = on.repeat_interleave(block_size, dim=1).repeat_interleave(block_size, dim=2)[:, :h, :w]
    return on & reliable


def hide_pixels(images: Tensor, hidden: Tensor) -> Tensor:
    """Normalised images (B, C, H, W) with the hidden pixels set to 0 (the mean colour)."""
    if images.dim() != 4 or tuple(hidden.shape) != (images.shape[0], *images.shape[2:]):
        raise ValueError(
            f"hide_pixels: images (B, C, H, W) {tuple(images.shape)} and hidden (B, H, W) "
            f"{tuple(hidden.shape)} do not match"
        )
    return images.masked_fill(hidden.unsqueeze(1), 0.0)
