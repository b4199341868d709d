"""Where each dataset keeps its images and masks, and how a split line names them.

A split line is `<image> <mask>` (paths relative to the data root) or a bare id that the
dataset expands. Absolute paths from another machine (CamVid's list files hold
`/SegNet/CamVid/train/x.png`) are mapped onto the root by their longest suffix that exists
there. A line may not reach outside the root (`..`, an absolute path with no suffix under
it); symlinks inside the root are the user's own choice (datasets often live on another
disk) and are followed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image

from bench.data import synthetic
from bench.labels import IGNORE



@dataclass(frozen=True)
class Entry:
    image: str  # relative to the data root (or a synthetic id)
    mask: str


class DataError(ValueError):
    pass


def read_image(path: Path) -> Image.Image:
    """The decoded image; a file that cannot be decoded is an error naming it."""
    try:
        image = Image.open(path)
        image.load()
    except (OSError, SyntaxError, ValueError) as exc:  # PIL raises all three for bad files
        raise DataError(f"cannot read image {path}: {exc} (a truncated or corrupt file? replace it or drop it from the split)") from None
    return image


RESIZE_CACHE_BYTES = 1 << 30


class Source:
    name = "?"
    num_classes = 0
    needs_root = True
    generator: str | None = None  # for generated data: which generator made the images
    # Why the dataset's own test split cannot score a model (None: it can, where present).
    no_test_labels: str | None = None
    # Keep what `read` returns in memory even without `resize` (generated data: reading is
    # computing, and the whole dataset is small).
    cache_reads = False

    def __init__(self, root: str | Path | None, resize: tuple[int, int] | None = None):
        # Every image and mask resized at load (bilinear / nearest) to (height, width): a
        # CPU protocol trains on whole small frames. Resized pairs are kept in memory, up to
        # RESIZE_CACHE_BYTES per loader process (CamVid at 120x160: 54 MB for all of it).
        self.resize = tuple(resize) if resize else None
        self._cache: dict[Entry, tuple[np.ndarray, np.ndarray]] = {}
        self._cached_bytes = 0
        if self.needs_root:
            if root is None:
                raise DataError(f"dataset '{self.name}' needs root=<folder> ({self.layout})")
            self.root = Path(root).expanduser()
            if not self.root.is_dir():
                raise DataError(f"dataset '{self.name}': root {self.root} is not a folder ({self.layout})")
        else:
            self.root = None

    layout = ""

    # -- split lines ------------------------------------------------------------------
    def parse_line(self, line: str, where: str) -> Entry:
        parts = line.split()
        if len(parts) == 2:
            return Entry(self._inside(parts[0], where), self._inside(parts[1], where))
        if len(parts) == 1:
            return self.from_id(parts[0], where)
        raise DataError(f"{where}: expected '<image> <mask>' or a bare id, got {line!r}")

    def from_id(self, item: str, where: str) -> Entry:
        raise DataError(f"{where}: dataset '{self.name}' needs '<image> <mask>' per line, got bare id {item!r}")

    def to_line(self, entry: Entry) -> str:
        return f"{entry.image} {entry.mask}"

    def _inside(self, text: str, where: str) -> str:
        """Map a path from a split line onto the root; refuse a line that leaves it."""
        path = PurePosixPath(text.replace("\\", "/"))
        if ".." in path.parts:
            raise DataError(f"{where}: {text!r} reaches outside the data root (contains '..')")
        if not path.is_absolute():
            return str(path)
        parts = path.parts[1:]  # a foreign prefix: keep the longest suffix found under root
        for start in range(len(parts)):
            candidate = PurePosixPath(*parts[start:])
            if (self.root / candidate).exists():
                return str(candidate)
        raise DataError(f"{where}: {text!r} is an absolute path with no part found under the data root {self.root}")

    def missing(self, entries: list[Entry]) -> list[str]:
        out = []
        for e in entries:
            for rel in (e.image, e.mask):
                if not (self.root / rel).is_file():
                    out.append(str(self.root / rel))
        return out

    # -- pools ------------------------------------------------------------------------
    def pool(self, split: str) -> list[Entry]:
        raise NotImplementedError

    # -- loading ----------------------------------------------------------------------
    def load(self, entry: Entry) -> tuple[np.ndarray, np.ndarray]:
        """(H, W, 3) uint8 image and (H, W) uint8 class map (IGNORE = void)."""
        if self.resize is None and not self.cache_reads:
            return self.read(entry)
        if entry not in self._cache:
            image, mask = self.read(entry)
            if self.resize is not None:
                h, w = self.resize
                image = np.array(Image.fromarray(image).resize((w, h), Image.BILINEAR))
                mask = np.array(Image.fromarray(mask).resize((w, h), Image.NEAREST))
            if self._cached_bytes + image.nbytes + mask.nbytes > RESIZE_CACHE_BYTES:
                return image, mask  # full: later images are read (and resized) on every load
            self._cache[entry] = (image, mask)
            self._cached_bytes += image.nbytes + mask.nbytes
        return self._cache[entry]

    def read(self, entry: Entry) -> tuple[np.ndarray, np.ndarray]:
        image = np.array(read_image(self.root / entry.image).convert("RGB"))
        mask = np.array(read_image(self.root / entry.mask))
        if mask.ndim == 3:
            raise DataError(f"mask {self.root / entry.mask} has colour channels; expected class indices")
        return image, self.map_mask(mask.astype(np.uint8))

    def map_mask(self, mask: np.ndarray) -> np.ndarray:
        mask = mask.copy()
        mask[mask >= self.num_classes] = IGNORE
        return mask


class SyntheticSource(Source):
    name = "synthetic"
    num_classes = synthetic.NUM_CLASSES
    needs_root = False
    generator = synthetic.GENERATOR
    seed = 0
    cache_reads = True  # a scene costs ~8 ms to draw; all 900 of them hold 23 MB

    def parse_line(self, line: str, where: str) -> Entry:
        item = line.split()[0]
        split, _, index = item.partition("/")
        if split not in synthetic.IMAGES or not index.isdigit():
            raise DataError(f"{where}: synthetic ids look like train/00012, got {item!r}")
        return Entry(item, item)

    def to_line(self, entry: Entry) -> str:
        return entry.image

    def missing(self, entries):
        return [e.image for e in entries if int(e.image.split("/")[1]) >= synthetic.IMAGES[e.image.split("/")[0]]]

    def pool(self, split):
        return [Entry(i, i) for i in synthetic.item_ids(split)]

    def read(self, entry):
        split, index = entry.image.split("/")
        return synthetic.make_scene(self.seed, split, int(index))


class CamVid(Source):
    name = "camvid"
    num_classes = 11  # label 11 (Unlabelled) and above are ignored
    layout = "SegNet layout: train/ trainannot/ val/ valannot/ [test/ testannot/] and train.txt / val.txt"

    def pool(self, split):
        listing = self.root / f"{split}.txt"
        if listing.is_file():
            return [self.parse_line(l, str(listing)) for l in listing.read_text().splitlines() if l.strip()]
        images = sorted((self.root / split).glob("*.png"))
        if not images:
            raise DataError(f"camvid: neither {listing} nor {self.root / split}/*.png exist ({self.layout})")
        return [Entry(f"{split}/{p.name}", f"{split}annot/{p.name}") for p in images]

    def from_id(self, item, where):
        split, _, name = item.partition("/")
        if not name:
            raise DataError(f"{where}: camvid ids look like train/0001TP_006690, got {item!r}")
        name = name if name.endswith(".png") else name + ".png"
        return Entry(self._inside(f"{split}/{name}", where), self._inside(f"{split}annot/{name}", where))


class PascalVOC(Source):
    name = "pascal"
    num_classes = 21
    no_test_labels = "VOC 2012 test labels are not public (evaluation server only)"
    layout = "VOC 2012: JPEGImages/ and SegmentationClass/ or SegmentationClassAug/ palette PNGs"

    def from_id(self, item, where):
        for folder in ("SegmentationClassAug", "SegmentationClass"):
            if (self.root / folder / f"{item}.png").is_file():
                break
        return Entry(self._inside(f"JPEGImages/{item}.jpg", where), self._inside(f"{folder}/{item}.png", where))

    def to_line(self, entry):
        return PurePosixPath(entry.image).stem

    def pool(self, split):
        listing = self.root / "ImageSets" / "Segmentation" / f"{split}.txt"
        if not listing.is_file():
            raise DataError(f"pascal: {listing} not found ({self.layout})")
        return [self.from_id(l.strip(), str(listing)) for l in listing.read_text().splitlines() if l.strip()]


class Cityscapes(Source):
    name = "cityscapes"
    num_classes = 19
    no_test_labels = "its public gtFine/test masks are placeholders (every pixel void); test labels stay on the evaluation server"
    layout = "leftImg8bit/<split>/<city>/*_leftImg8bit.png and gtFine/<split>/<city>/*_gtFine_labelTrainIds.png"

    def from_id(self, item, where):  # train/aachen/aachen_000000_000019
        split, city, base = (item.split("/") + ["", ""])[:3]
        if not base:
            raise DataError(f"{where}: cityscapes ids look like train/aachen/aachen_000000_000019, got {item!r}")
        return Entry(
            self._inside(f"leftImg8bit/{split}/{city}/{base}_leftImg8bit.png", where),
            self._inside(f"gtFine/{split}/{city}/{base}_gtFine_labelTrainIds.png", where),
        )

    def pool(self, split):
        images = sorted((self.root / "leftImg8bit" / split).glob("*/*_leftImg8bit.png"))
        if not images:
            raise DataError(f"cityscapes: no images under {self.root / 'leftImg8bit' / split} ({self.layout})")
        return [self.from_id(f"{split}/{p.parent.name}/{p.name[: -len('_leftImg8bit.png')]}", "pool") for p in images]


class COCO(Source):
    name = "coco"
    num_classes = 81  # background + 80 things, as in UniMatch's masks
    no_test_labels = "test2017 has no public masks"
    layout = "train2017/*.jpg, val2017/*.jpg and masks/train2017/*.png, masks/val2017/*.png (81-class masks)"

    def from_id(self, item, where):  # train2017/000000000009
        split, _, name = item.partition("/")
        return Entry(self._inside(f"{split}/{name}.jpg", where), self._inside(f"masks/{split}/{name}.png", where))

    def pool(self, split):
        folder = "train2017" if split == "train" else "val2017"
        masks = sorted((self.root / "masks" / folder).glob("*.png"))
        if not masks:
            raise DataError(f"coco: no masks under {self.root / 'masks' / folder} ({self.layout})")
        return [Entry(f"{folder}/{p.stem}.jpg", f"masks/{folder}/{p.name}") for p in masks]


SOURCES = {cls.name: cls for cls in (SyntheticSource, CamVid, PascalVOC, Cityscapes, COCO)}


def get_source(name: str, root: str | Path | None, resize: tuple[int, int] | None = None) -> Source:
    if name not in SOURCES:
        raise DataError(f"unknown dataset '{name}'; available: {', '.join(SOURCES)}")
    return SOURCES[name](root, resize)
