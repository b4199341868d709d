"""Labelled / unlabelled splits in the UniMatch format, and their fingerprints.

`<split_dir>/<dataset>/<split>/labeled.txt` and `unlabeled.txt` (and optionally
`val.txt`, `test.txt`) hold one `<image> <mask>` or bare id per line. Without a list the
dataset's own val (and, for `eval_split=test`, test) images are used. Every run records the sha256 of
each file it read, so two results are comparable only when their splits are identical.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field
from pathlib import Path

from bench.data.sources import DataError, Entry, Source
from bench.files import atomic_write_text

SPLIT_FILES = ("labeled", "unlabeled", "val")


@dataclass
class Split:
    labeled: list[Entry]
    unlabeled: list[Entry]
    val: list[Entry]
    sha256: dict[str, str] = field(default_factory=dict)  # file name -> sha256 of its bytes
    origin: str = ""  # the folder read, or how the split was made
    test: list[Entry] = field(default_factory=list)  # held out; read only when eval_split=test


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def make_split(source: Source, labeled: int, seed: int) -> tuple[list[Entry], list[Entry]]:
    pool = source.pool("train")
    if not 1 <= labeled <= len(pool):
        raise DataError(f"labeled must lie in [1, {len(pool)}] for {source.name} ({len(pool)} training images), got {labeled}")
    order = list(range(len(pool)))
    random.Random(seed).shuffle(order)
    chosen = set(order[:labeled])
    return [pool[i] for i in sorted(chosen)], [pool[i] for i in range(len(pool)) if i not in chosen]


def split_text(source: Source, entries: list[Entry]) -> str:
    return "".join(source.to_line(e) + "\n" for e in entries)


def write_split(source: Source, folder: Path, labeled: int, seed: int) -> dict[str, str]:
    lab, unlab = make_split(source, labeled, seed)
    hashes = {}
    for name, entries in (("labeled", lab), ("unlabeled", unlab)):
        text = split_text(source, entries)
        atomic_write_text(folder / f"{name}.txt", text)
        hashes[f"{name}.txt"] = _sha(text)
    return hashes


def read_list(source: Source, path: Path) -> tuple[list[Entry], str]:
    data = path.read_bytes()
    lines = [l for l in data.decode().splitlines() if l.strip() and not l.lstrip().startswith("#")]
    entries = [source.parse_line(l, f"{path}:{i + 1}") for i, l in enumerate(lines)]
    return entries, hashlib.sha256(data).hexdigest()


def load_split(source: Source, split_dir: str | Path, split: str, labeled: int, eval_split: str = "val") -> Split:
    """Read the split files, or for split='default' without files make one (seed 0). With
    eval_split='test' the held-out images are read too (test.txt, else the dataset's test)."""
    folder = Path(split_dir) / source.name / split
    if (folder / "labeled.txt").is_file():
        result = Split([], [], [], origin=str(folder))
        for name in SPLIT_FILES:
            path = folder / f"{name}.txt"
            if name == "val" and not path.is_file():
                continue
            if not path.is_file():
                raise DataError(f"split folder {folder} has labeled.txt but no {name}.txt")
            entries, digest = read_list(source, path)
            setattr(result, name, entries)
            result.sha256[path.name] = digest
        if not result.val:
            result.val = source.pool("val")
            result.sha256["val (dataset list)"] = _sha(split_text(source, result.val))
    elif split == "default":
        lab, unlab = make_split(source, labeled, seed=0)
        val = source.pool("val")
        result = Split(lab, unlab, val, origin=f"generated: {labeled} labelled, seed 0")
        for name, entries in (("labeled.txt", lab), ("unlabeled.txt", unlab), ("val.txt", val)):
            result.sha256[name] = _sha(split_text(source, entries))
    else:
        raise DataError(
            f"no split files in {folder}; write them with `cslbench data split --dataset {source.name} "
            f"--root <root> --labeled N --seed S --name {split}` or pass split_dir=<folder>"
        )
    if eval_split == "test":
        result.test = _test_entries(source, folder, result)
    if source.generator:  # generated images: the ids alone do not say which images they are
        result.sha256["generator"] = source.generator
    overlap = {e.image for e in result.labeled} & {e.image for e in result.val}
    if overlap:
        raise DataError(f"split {result.origin}: {len(overlap)} validation images are also labelled, e.g. {sorted(overlap)[0]}")
    seen = {e.image for e in result.labeled + result.unlabeled + result.val} & {e.image for e in result.test}
    if seen:
        raise DataError(f"split {result.origin}: {len(seen)} test images are also training or validation images, e.g. {sorted(seen)[0]}")
    missing = source.missing(result.labeled + result.unlabeled + result.val + result.test)
    if missing:
        shown = "\n  ".join(missing[:5])
        raise DataError(f"split {result.origin}: {len(missing)} files are missing, the first:\n  {shown}")
    return result


def _test_entries(source: Source, folder: Path, result: Split) -> list[Entry]:
    path = folder / "test.txt"
    if path.is_file():
        entries, digest = read_list(source, path)
        result.sha256["test.txt"] = digest
        return entries
    if source.no_test_labels:
        raise DataError(f"eval_split=test, but dataset '{source.name}' has no usable test split: {source.no_test_labels}; "
                        f"use eval_split=val, or list held-out labelled images (never in the split's train or val) in {path}")
    try:
        entries = source.pool("test")
    except (DataError, OSError) as exc:
        raise DataError(f"eval_split=test, but dataset '{source.name}' has no labelled test images here: {exc}; use eval_split=val or give {path}") from None
    if not entries:
        raise DataError(f"eval_split=test, but dataset '{source.name}' lists no test images; use eval_split=val")
    result.sha256["test (dataset list)"] = _sha(split_text(source, entries))
    return entries
