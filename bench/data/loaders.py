"""Torch datasets and an iteration-indexed sampler.

Batch t of a stream is a pure function of (seed, stream, t): the order comes from a
per-epoch permutation and each sample's augmentation from a generator seeded with
(seed, stream, t, slot). A resumed run asks for batches from its checkpoint's iteration on
and gets exactly what the uninterrupted run would have seen, with any number of workers.
"""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from bench.data import transforms as T
from bench.data.sources import Entry, Source

LABELED, UNLABELED, MIX = 1, 2, 3  # stream ids


class IterationSampler(Sampler):
    def __init__(self, n_items: int, batch: int, iters: int, seed: int, stream: int, start: int = 0):
        self.n, self.batch, self.iters = n_items, batch, iters
        self.seed, self.stream, self.start = seed, stream, start

    def _perm(self, epoch: int) -> list[int]:
        return torch.randperm(self.n, generator=T.sample_generator(self.seed, self.stream, epoch, 7)).tolist()

    def __iter__(self):
        cache: dict[int, list[int]] = {}
        for t in range(self.start, self.iters):
            keys = []
            for slot in range(self.batch):
                pos = t * self.batch + slot
                epoch = pos // self.n
                if epoch not in cache:
                    cache.clear()
                    cache[epoch] = self._perm(epoch)
                keys.append((cache[epoch][pos % self.n], t, slot))
            yield keys

    def __len__(self):
        return max(0, self.iters - self.start)


class LabeledSet(Dataset):
    def __init__(self, source: Source, entries: list[Entry], crop: int, scale, seed: int, normalize=T.normalize):
        self.source, self.entries, self.crop, self.scale, self.seed = source, entries, crop, scale, seed
        self.normalize = normalize

    def __len__(self):
        return len(self.entries)

    def __getitem__(self, key):
        index, t, slot = key
        g = T.sample_generator(self.seed, LABELED, t, slot)
        image, mask = T.to_tensor(*self.source.load(self.entries[index]))
        image, mask, _ = T.weak(image, mask, self.crop, self.scale, g)
        return {"image": self.normalize(image), "mask": mask}


class UnlabeledSet(Dataset):
    """Weak view, two strong views, CutMix boxes and the padding mask; `gt` is the hidden
    truth, read only by the selection-quality meter. With `mask_view`, also the CSL masking
    view (mild jitter to be hidden, or an ordinary strong view) and which of the two.
    `normalize` scales images as the encoder's weights expect (the model's `normalization`)."""

    def __init__(
        self, source: Source, entries: list[Entry], crop: int, scale, seed: int, stream: int, mask_view: bool = False, blur_sigma=T.BLUR_SIGMA, normalize=T.normalize
    ):
        self.source, self.entries, self.crop, self.scale = source, entries, crop, scale
        self.seed, self.stream, self.mask_view, self.blur_sigma = seed, stream, mask_view, tuple(blur_sigma)
        self.normalize = normalize

    def __len__(self):
        return len(self.entries)

    def __getitem__(self, key):
        index, t, slot = key
        g = T.sample_generator(self.seed, self.stream, t, slot)
        image, gt = T.to_tensor(*self.source.load(self.entries[index]))
        image, gt, inside = T.weak(image, gt, self.crop, self.scale, g)
        item = {
            "weak": self.normalize(image),
            "strong1": self.normalize(T.strong(image, g, self.blur_sigma)),
            "strong2": self.normalize(T.strong(image, g, self.blur_sigma)),
            "box1": T.cutmix_box(self.crop, g),
            "box2": T.cutmix_box(self.crop, g),
            "valid": inside,
            "gt": gt,
        }
        if self.mask_view:
            hide = T.chance(g, 0.5)
            item["masked"] = self.normalize(T.mild(image, g, self.blur_sigma) if hide else T.strong(image, g, self.blur_sigma))
            item["hide"] = torch.tensor(hide)
        return item


class EvalSet(Dataset):
    def __init__(self, source: Source, entries: list[Entry], normalize=T.normalize):
        self.source, self.entries, self.normalize = source, entries, normalize

    def __len__(self):
        return len(self.entries)

    def __getitem__(self, index):
        image, mask = T.to_tensor(*self.source.load(self.entries[index]))
        return {"image": self.normalize(image), "mask": mask}


def eval_collate(items: list[dict]) -> list[dict]:
    """An evaluation batch as sub-batches of consecutive same-sized images (whole-image
    evaluation of datasets whose images differ in size: those come one by one)."""
    groups: list[list[dict]] = []
    for item in items:
        if groups and groups[-1][0]["image"].shape == item["image"].shape:
            groups[-1].append(item)
        else:
            groups.append([item])
    return [{key: torch.stack([it[key] for it in group]) for key in ("image", "mask")} for group in groups]


def iteration_loader(dataset: Dataset, batch: int, iters: int, seed: int, stream: int, start: int, workers: int, pin_memory: bool = False) -> DataLoader:
    """`pin_memory` (for CUDA) lets the copy to the device overlap with compute."""
    sampler = IterationSampler(len(dataset), batch, iters, seed, stream, start)
    # The loader draws a worker base seed when it starts; its own generator keeps that draw
    # off the global RNG, which a resumed run restores from its checkpoint.
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_sampler=sampler, num_workers=workers, generator=generator, pin_memory=pin_memory)
