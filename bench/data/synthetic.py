"""An embedded procedural segmentation dataset: no download, deterministic by seed.

Made so that selection matters and that unlabelled images help. Six classes, of which
colour tells nothing (each image draws four colours that any object may take): disc and box
differ only by shape; stripes and dots only by texture; a rare small class (triangles).
Objects are placed apart (they may touch), an occluding stroke (labelled background) may
cut through them, boundaries are blurred, and each image has its own noise level and
contrast. A small network trained from scratch on 20 labelled images is confidently wrong
on some regions, and learns more from more labels (the README's calibration table).

Generator v2 (2026-11-28): v1 drew two colours per image, let objects pile on each other
and drew 1-3 strokes; there, pseudo-labelling never beat the labelled loss alone. Results
of the two are not comparable; records name the generator (`splits.sha256.generator`).
"""

from __future__ import annotations

import numpy as np

CLASSES = ("background", "disc", "box", "stripes", "dots", "triangle")
NUM_CLASSES = len(CLASSES)
SIZE = 80
TRAIN_IMAGES = 600
VAL_IMAGES = 100
GENERATOR = "synthetic v2"
TEST_IMAGES = 200  # held out: model selection never sees it
IMAGES = {"train": TRAIN_IMAGES, "val": VAL_IMAGES, "test": TEST_IMAGES}
_STREAMS = {"train": 0, "val": 1, "test": 2}


def _rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, _STREAMS[split], index])


def _smooth(rng: np.random.Generator, size: int, cells: int, channels: int) -> np.ndarray:
    coarse = rng.normal(size=(cells, cells, channels))
    idx = np.linspace(0, cells - 1, size)
    i0 = np.floor(idx).astype(int)
    i1 = np.minimum(i0 + 1, cells - 1)
    t = (idx - i0)[:, None]
    rows = coarse[i0] * (1 - t)[:, :, None] + coarse[i1] * t[:, :, None]
    cols = rows[:, i0] * (1 - t.T)[:, :, None] + rows[:, i1] * t.T[:, :, None]
    return cols


def _saturated(rng: np.random.Generator, n: int) -> np.ndarray:
    """n saturated colours with well-separated hues (HSV -> RGB)."""
    hue = (rng.uniform() + np.arange(n) / n + rng.uniform(-0.1, 0.1, n)) % 1.0
    sat, val = rng.uniform(0.6, 1.0, n), rng.uniform(0.55, 1.0, n)
    k = (np.array([5.0, 3.0, 1.0]) + hue[:, None] * 6) % 6
    return val[:, None] - val[:, None] * sat[:, None] * np.clip(np.minimum(k, 4 - k), 0, 1)


def _box_blur(image: np.ndarray) -> np.ndarray:
    padded = np.pad(image, ((1, 1), (1, 1), (0, 0)), mode="edge")
    out = np.zeros_like(image)
    for dy in range(3):
        for dx in range(3):
            out += padded[dy : dy + image.shape[0], dx : dx + image.shape[1]]
    return out / 9.0


def make_scene(seed: int, split: str, index: int, size: int = SIZE) -> tuple[np.ndarray, np.ndarray]:
    """One image (H, W, 3) uint8 and its label map (H, W) uint8."""
    rng = _rng(seed, split, index)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    palette = _saturated(rng, 4)  # foreground colours shared by all classes
    placed: list[tuple[float, float, float]] = []
    grey = 0.45 + 0.1 * _smooth(rng, size, 4, 1)
    image = grey + 0.05 * _smooth(rng, size, 4, 3)  # low-frequency, low-saturation background
    label = np.zeros((size, size), dtype=np.uint8)

    def place(kind: int) -> None:
        r = rng.uniform(8, 16)
        for _ in range(12):  # a centre away from the objects already placed, if one is found
            cy, cx = rng.uniform(8, size - 8, size=2)
            if all((cy - y) ** 2 + (cx - x) ** 2 > (0.8 * (r + q)) ** 2 for y, x, q in placed):
                break
        placed.append((cy, cx, r))
        if kind in (1, 3, 4):  # round regions (discs, textured blobs)
            ar = rng.uniform(0.6, 1.4)
            region = ((yy - cy) / r) ** 2 + ((xx - cx) / (r * ar)) ** 2 <= 1
        elif kind == 2:  # boxes, rotated
            a = rng.uniform(0, np.pi)
            u = (xx - cx) * np.cos(a) + (yy - cy) * np.sin(a)
            v = -(xx - cx) * np.sin(a) + (yy - cy) * np.cos(a)
            half = rng.uniform(0.5, 0.9)
            region = (np.abs(u) <= r * 0.9) & (np.abs(v) <= r * half)
        else:  # small triangles
            r = rng.uniform(6, 10)
            region = (yy - cy <= r) & (yy - cy >= -r) & (np.abs(xx - cx) <= (yy - cy + r) / 2)
        colour = palette[rng.integers(len(palette))]
        if kind == 3:
            period = rng.uniform(3, 6)
            a = rng.uniform(0, np.pi)
            phase = ((xx * np.cos(a) + yy * np.sin(a)) / period) % 1.0 < 0.5
            texture = np.where(phase[..., None], colour, colour * 0.45)
        elif kind == 4:
            period = rng.uniform(4, 6)
            dots = ((xx % period - period / 2) ** 2 + (yy % period - period / 2) ** 2) < (period / 3.2) ** 2
            texture = np.where(dots[..., None], colour * 0.45, colour)
        elif kind == 2:  # boxes carry a faint dark rim: a local cue that blur and noise can hide
            rim = (np.abs(u) > r * 0.9 - 2.0) | (np.abs(v) > r * half - 2.0)
            texture = np.where(rim[..., None], colour * 0.6, colour)
        else:
            texture = np.broadcast_to(colour, image.shape)
        image[region] = texture[region]
        label[region] = kind

    kinds = [1, 2, 3, 4] + list(rng.choice([1, 2, 3, 4], size=rng.integers(1, 4)))
    if rng.random() < 0.7:
        kinds += [5] * int(rng.integers(1, 4))
    for kind in rng.permutation(kinds):
        place(int(kind))

    for _ in range(rng.integers(0, 2)):  # an occluding stroke, labelled background
        y0, x0, y1, x1 = rng.uniform(0, size, size=4)
        width = rng.uniform(1.0, 2.5)
        d = np.abs((y1 - y0) * xx - (x1 - x0) * yy + x1 * y0 - y1 * x0) / (np.hypot(y1 - y0, x1 - x0) + 1e-6)
        stroke = d <= width
        image[stroke] = rng.uniform(0.1, 0.9, size=3)
        label[stroke] = 0

    image = _box_blur(image)
    contrast = rng.uniform(0.7, 1.2)
    image = (image - 0.5) * contrast + 0.5 + rng.uniform(-0.1, 0.1)
    image = image + rng.normal(scale=rng.uniform(0.01, 0.08), size=image.shape)
    return (np.clip(image, 0, 1) * 255).astype(np.uint8), label


def item_ids(split: str) -> list[str]:
    if split not in IMAGES:
        raise ValueError(f"synthetic data has splits {', '.join(IMAGES)}, not {split!r}")
    return [f"{split}/{i:05d}" for i in range(IMAGES[split])]
