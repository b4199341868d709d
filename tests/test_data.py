"""Dataset layouts on tiny trees the tests write, CamVid on the real copy, splits and
augmentation determinism."""

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bench.data import transforms as T
from bench.data.loaders import LABELED, UNLABELED, IterationSampler, LabeledSet, UnlabeledSet, iteration_loader
from bench.data.sources import DataError, get_source
from bench.data.splits import load_split, write_split

CAMVID = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "camvid"


def png(path: Path, array: np.ndarray, palette: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(array)
    if palette:
        img = img.convert("P") if array.ndim == 3 else Image.fromarray(array, mode="L").convert("P")
        img.putpalette([i % 256 for i in range(768)])
        img = Image.fromarray(array, mode="P") if array.ndim == 2 else img
    img.save(path)


def rgb(h=12, w=16, seed=0):
    return np.random.default_rng(seed).integers(0, 255, size=(h, w, 3), dtype=np.uint8)


def labels(values, h=12, w=16):
    arr = np.zeros((h, w), dtype=np.uint8)
    for i, v in enumerate(values):
        arr[:, i * (w // len(values)) :] = v
    return arr


def make_camvid(root: Path, n_train=6, n_val=2):
    for split, n in (("train", n_train), ("val", n_val)):
        lines = []
        for i in range(n):
            png(root / split / f"f{i}.png", rgb(seed=i))
            png(root / f"{split}annot" / f"f{i}.png", labels([3, 11, 8]))
            lines.append(f"/SegNet/CamVid/{split}/f{i}.png /SegNet/CamVid/{split}annot/f{i}.png")
        (root / f"{split}.txt").write_text("\n".join(lines) + "\n")


def test_camvid_tiny_tree_maps_foreign_prefixes_and_ignore(tmp_path):
    make_camvid(tmp_path)
    src = get_source("camvid", tmp_path)
    pool = src.pool("train")
    assert len(pool) == 6 and pool[0].image == "train/f0.png" and pool[0].mask == "trainannot/f0.png"
    image, mask = src.load(pool[0])
    assert image.shape == (12, 16, 3)
    assert set(np.unique(mask)) == {3, 8, 255}  # label 11 (Unlabelled) -> ignore


@pytest.mark.skipif(not CAMVID.is_dir(), reason="../shared/data/camvid not present")
def test_camvid_real_copy():
    src = get_source("camvid", CAMVID)
    train, val = src.pool("train"), src.pool("val")
    assert len(train) == 367 and len(val) == 101
    image, mask = src.load(train[0])
    assert image.shape == (360, 480, 3)
    assert set(np.unique(mask)) <= set(range(11)) | {255}
    split = load_split(src, "does-not-exist", "default", labeled=46)
    assert len(split.labeled) == 46 and len(split.unlabeled) == 321 and len(split.val) == 101


def test_pascal_tiny_tree(tmp_path):
    ids = ["2007_000032", "2007_000039", "2007_000063"]
    for i, item in enumerate(ids):
        Image.fromarray(rgb(seed=i)).save(tmp_path / "JPEGImages" / f"{item}.jpg") if (tmp_path / "JPEGImages").mkdir(parents=True, exist_ok=True) is None else None
        folder = "SegmentationClassAug" if i == 0 else "SegmentationClass"
        mask = Image.fromarray(labels([0, 15, 255]), mode="L").convert("P")
        mask.putpalette(list(range(256)) * 3)
        (tmp_path / folder).mkdir(exist_ok=True)
        mask.save(tmp_path / folder / f"{item}.png")
    (tmp_path / "ImageSets" / "Segmentation").mkdir(parents=True)
    (tmp_path / "ImageSets" / "Segmentation" / "train.txt").write_text("\n".join(ids[:2]) + "\n")
    (tmp_path / "ImageSets" / "Segmentation" / "val.txt").write_text(ids[2] + "\n")
    src = get_source("pascal", tmp_path)
    pool = src.pool("train")
    assert pool[0].mask == f"SegmentationClassAug/{ids[0]}.png" and pool[1].mask == f"SegmentationClass/{ids[1]}.png"
    _, mask = src.load(pool[1])
    assert set(np.unique(mask)) == {0, 15, 255}
    split_dir = tmp_path / "splits" / "pascal" / "92"
    split_dir.mkdir(parents=True)
    (split_dir / "labeled.txt").write_text(ids[0] + "\n")
    (split_dir / "unlabeled.txt").write_text(f"JPEGImages/{ids[1]}.jpg SegmentationClass/{ids[1]}.png\n")  # both forms
    split = load_split(src, tmp_path / "splits", "92", labeled=1)
    assert [e.image for e in split.unlabeled] == [f"JPEGImages/{ids[1]}.jpg"]
    assert split.sha256["labeled.txt"] == hashlib.sha256((ids[0] + "\n").encode()).hexdigest()


def test_cityscapes_tiny_tree(tmp_path):
    for split in ("train", "val"):
        base = f"aachen_000000_00001{0 if split == 'train' else 1}"
        png(tmp_path / "leftImg8bit" / split / "aachen" / f"{base}_leftImg8bit.png", rgb())
        png(tmp_path / "gtFine" / split / "aachen" / f"{base}_gtFine_labelTrainIds.png", labels([0, 18, 255]))
    src = get_source("cityscapes", tmp_path)
    (entry,) = src.pool("train")
    assert entry.mask.endswith("_gtFine_labelTrainIds.png")
    assert set(np.unique(src.load(entry)[1])) == {0, 18, 255}
    # its public test masks are placeholders: eval_split=test is refused, naming the way out
    png(tmp_path / "leftImg8bit" / "test" / "berlin" / "berlin_000000_000019_leftImg8bit.png", rgb())
    png(tmp_path / "gtFine" / "test" / "berlin" / "berlin_000000_000019_gtFine_labelTrainIds.png", labels([255]))
    folder = tmp_path / "splits" / "cityscapes" / "s"
    folder.mkdir(parents=True)
    (folder / "labeled.txt").write_text("train/aachen/aachen_000000_000010\n")
    (folder / "unlabeled.txt").write_text("")
    with pytest.raises(DataError, match=r"eval_split=test, but dataset 'cityscapes' has no usable test split: its public gtFine/test masks are placeholders.*use eval_split=val.*test.txt"):
        load_split(src, tmp_path / "splits", "s", labeled=1, eval_split="test")
    assert load_split(src, tmp_path / "splits", "s", labeled=1).val  # val is fine


def test_coco_tiny_tree(tmp_path):
    for folder in ("train2017", "val2017"):
        Image.fromarray(rgb()).save(tmp_path / folder / "000000000009.jpg") if (tmp_path / folder).mkdir(parents=True) is None else None
        png(tmp_path / "masks" / folder / "000000000009.png", labels([0, 80, 81]))
    src = get_source("coco", tmp_path)
    (entry,) = src.pool("train")
    assert entry.image == "train2017/000000000009.jpg"
    assert set(np.unique(src.load(entry)[1])) == {0, 80, 255}  # 81 is out of range -> ignore


def test_split_lines_outside_the_root_are_rejected(tmp_path):
    make_camvid(tmp_path / "data")
    png(tmp_path / "secret.png", rgb())
    src = get_source("camvid", tmp_path / "data")
    folder = tmp_path / "splits" / "camvid" / "evil"
    folder.mkdir(parents=True)
    (folder / "labeled.txt").write_text("../secret.png ../secret.png\n")
    (folder / "unlabeled.txt").write_text("train/f1.png trainannot/f1.png\n")
    with pytest.raises(DataError, match="outside the data root"):
        load_split(src, tmp_path / "splits", "evil", labeled=1)
    (folder / "labeled.txt").write_text(f"{tmp_path / 'secret.png'} trainannot/f0.png\n")
    with pytest.raises(DataError, match="absolute path with no part found under the data root"):
        load_split(src, tmp_path / "splits", "evil", labeled=1)


def test_a_symlinked_folder_inside_the_root_is_followed(tmp_path):
    """Datasets often live on another disk, linked into the root: that is not an escape."""
    make_camvid(tmp_path / "disk")
    root = tmp_path / "data"
    root.mkdir()
    for name in ("train", "trainannot", "val", "valannot"):
        (root / name).symlink_to(tmp_path / "disk" / name, target_is_directory=True)
    src = get_source("camvid", root)
    folder = tmp_path / "splits" / "camvid" / "linked"
    folder.mkdir(parents=True)
    (folder / "labeled.txt").write_text("train/f0.png trainannot/f0.png\n")
    (folder / "unlabeled.txt").write_text("/elsewhere/CamVid/train/f1.png /elsewhere/CamVid/trainannot/f1.png\n")
    split = load_split(src, tmp_path / "splits", "linked", labeled=1)
    assert [e.image for e in split.labeled + split.unlabeled] == ["train/f0.png", "train/f1.png"]
    image, mask = src.load(split.unlabeled[0])
    assert image.shape[2] == 3 and mask.ndim == 2


def test_a_corrupt_image_is_an_error_naming_the_file(tmp_path):
    make_camvid(tmp_path / "data")
    src = get_source("camvid", tmp_path / "data")
    entry = src.pool("train")[0]
    bad = tmp_path / "data" / entry.image
    bad.write_bytes(bad.read_bytes()[:40])  # cut short, as by a failed copy
    with pytest.raises(DataError, match=f"cannot read image {bad}"):
        src.load(entry)


def test_missing_files_are_listed_in_one_error(tmp_path):
    make_camvid(tmp_path / "data")
    folder = tmp_path / "splits" / "camvid" / "gone"
    folder.mkdir(parents=True)
    (folder / "labeled.txt").write_text("".join(f"train/x{i}.png trainannot/x{i}.png\n" for i in range(4)))
    (folder / "unlabeled.txt").write_text("train/f1.png trainannot/f1.png\n")
    with pytest.raises(DataError, match=r"8 files are missing, the first:\n.*x0.png") as info:
        load_split(get_source("camvid", tmp_path / "data"), tmp_path / "splits", "gone", labeled=1)
    assert str(info.value).count("\n  ") == 5


def test_written_split_is_read_back_with_the_same_hashes(tmp_path):
    make_camvid(tmp_path / "data", n_train=10)
    src = get_source("camvid", tmp_path / "data")
    hashes = write_split(src, tmp_path / "splits" / "camvid" / "3_seed1", labeled=3, seed=1)
    split = load_split(src, tmp_path / "splits", "3_seed1", labeled=3)
    assert len(split.labeled) == 3 and len(split.unlabeled) == 7
    assert {e.image for e in split.labeled}.isdisjoint({e.image for e in split.unlabeled})
    assert split.sha256["labeled.txt"] == hashes["labeled.txt"]
    assert write_split(src, tmp_path / "again", labeled=3, seed=1) == hashes  # seeded


def test_weak_view_keeps_image_and_mask_aligned():
    # the image's red channel encodes the label: after any rescale/crop/flip the two agree
    h, w = 40, 50
    mask = torch.from_numpy(np.kron(np.arange(20).reshape(4, 5) % 7, np.ones((10, 10)))).long()
    image = torch.stack([mask.float() / 10, torch.zeros(h, w), torch.zeros(h, w)])
    for seed in range(20):
        img, m, inside = T.weak(image, mask, 32, (0.5, 2.0), T.sample_generator(seed))
        assert img.shape == (3, 32, 32) and m.shape == inside.shape == (32, 32)
        decoded = (img[0] * 10).round().long()
        # bilinear resampling blends labels only next to a label edge: compare the interior
        padded = torch.nn.functional.pad(m[None, None].float(), (1, 1, 1, 1), mode="replicate")[0, 0]
        interior = torch.ones_like(m, dtype=torch.bool)
        for dy in range(3):
            for dx in range(3):
                interior &= padded[dy : dy + 32, dx : dx + 32] == m
        ok = inside & (m != T.IGNORE) & interior
        assert ok.sum() > 100 and (decoded[ok] == m[ok]).all()
        assert (m[~inside] == T.IGNORE).all() and (img[:, ~inside] == 0).all()


def test_augmentation_depends_only_on_seed_iteration_and_slot():
    src = get_source("synthetic", None)
    ds = UnlabeledSet(src, src.pool("train")[:20], 32, (0.8, 1.25), seed=3, stream=UNLABELED, mask_view=True)
    a, b = ds[(5, 7, 1)], ds[(5, 7, 1)]
    for k in a:
        assert torch.equal(a[k], b[k]), k
    c = ds[(5, 8, 1)]
    assert not torch.equal(a["strong1"], c["strong1"])


def test_batches_do_not_depend_on_worker_count_or_restart_point():
    src = get_source("synthetic", None)
    ds = LabeledSet(src, src.pool("train")[:30], 32, (0.8, 1.25), seed=1)
    def batches(**kw):
        return list(iteration_loader(ds, 4, iters=6, seed=1, stream=LABELED, **kw))

    serial, parallel, resumed = batches(start=0, workers=0), batches(start=0, workers=2), batches(start=3, workers=0)
    # Same draws everywhere (masks identical); images may differ in the last float bit,
    # because worker processes run resampling on one thread.
    for x, y in zip(serial, parallel):
        assert torch.equal(x["mask"], y["mask"]) and torch.allclose(x["image"], y["image"], atol=1e-5)
    for x, y in zip(serial[3:], resumed):
        assert torch.equal(x["mask"], y["mask"]) and torch.equal(x["image"], y["image"])


def test_sampler_visits_every_item_once_per_epoch():
    sampler = IterationSampler(n_items=10, batch=4, iters=5, seed=0, stream=1)
    order = [k[0] for batch in sampler for k in batch]
    assert sorted(order[:10]) == list(range(10)) and sorted(order[10:20]) == list(range(10))


def test_synthetic_scenes_are_deterministic_and_imbalanced():
    from bench.data.synthetic import NUM_CLASSES, make_scene

    a, b = make_scene(0, "train", 4), make_scene(0, "train", 4)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    counts = np.bincount(np.stack([make_scene(0, "train", i)[1] for i in range(40)]).ravel(), minlength=NUM_CLASSES)
    share = counts / counts.sum()
    assert share[0] > 0.5 and 0.003 < share[5] < 0.05 and (share > 0).all()


def test_cli_data_split_writes_the_split(tmp_path, capsys):
    from bench.orchestration.cli import main

    make_camvid(tmp_path / "data", n_train=8)
    main(["data", "split", "--dataset", "camvid", "--root", str(tmp_path / "data"), "--labeled", "3", "--seed", "0", "--out", str(tmp_path / "splits")])
    folder = tmp_path / "splits" / "camvid" / "3_seed0"
    assert len((folder / "labeled.txt").read_text().splitlines()) == 3
    assert len((folder / "unlabeled.txt").read_text().splitlines()) == 5
    assert "sha256" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="labeled must lie in"):
        main(["data", "split", "--dataset", "camvid", "--root", str(tmp_path / "data"), "--labeled", "9", "--out", str(tmp_path / "s")])


def test_test_list_may_not_reuse_training_images(tmp_path):
    src = get_source("synthetic", None)
    folder = tmp_path / "synthetic" / "s"
    folder.mkdir(parents=True)
    (folder / "labeled.txt").write_text("train/00001\n")
    (folder / "unlabeled.txt").write_text("train/00002\ntrain/00003\n")
    (folder / "test.txt").write_text("test/00000\ntrain/00003\n")
    with pytest.raises(DataError, match="1 test images are also training or validation images, e.g. train/00003"):
        load_split(src, tmp_path, "s", labeled=1, eval_split="test")
    (folder / "test.txt").write_text("test/00000\ntest/00001\n")
    split = load_split(src, tmp_path, "s", labeled=1, eval_split="test")
    assert [e.image for e in split.test] == ["test/00000", "test/00001"] and "test.txt" in split.sha256
    assert load_split(src, tmp_path, "s", labeled=1).test == []  # read only when asked for


@pytest.mark.skipif(not CAMVID.is_dir(), reason="../shared/data/camvid not present")
def test_resize_at_load_keeps_classes_and_caches():
    full = get_source("camvid", CAMVID)
    small = get_source("camvid", CAMVID, resize=(120, 160))
    entry = full.pool("train")[0]
    image, mask = small.load(entry)
    big_image, big_mask = full.load(entry)
    assert image.shape == (120, 160, 3) and mask.shape == (120, 160) and big_mask.shape == (360, 480)
    assert set(np.unique(mask)) <= set(np.unique(big_mask))  # nearest: no invented classes
    # nearest neighbour of a 3x downscale picks one pixel of each 3x3 block
    assert np.mean(mask == big_mask[1::3, 1::3]) > 0.95
    assert abs(float(image.mean()) - float(big_image.mean())) < 2  # bilinear keeps the brightness
    assert small.load(entry)[0] is image  # decoded once
    import bench.data.sources as sources

    full_cache = get_source("camvid", CAMVID, resize=(120, 160))
    sources_limit, sources.RESIZE_CACHE_BYTES = sources.RESIZE_CACHE_BYTES, int(1.5 * (image.nbytes + mask.nbytes))
    try:  # room for one pair: the second is resized on every read, not kept
        first, second = full_cache.pool("train")[:2]
        assert full_cache.load(first)[0] is full_cache.load(first)[0]
        assert full_cache.load(second)[0] is not full_cache.load(second)[0]
        assert np.array_equal(full_cache.load(second)[1], small.load(second)[1])
    finally:
        sources.RESIZE_CACHE_BYTES = sources_limit


def test_synthetic_scenes_are_drawn_once_per_process(monkeypatch):
    from bench.data import synthetic
    from bench.data.transforms import to_tensor

    src = get_source("synthetic", None)
    calls = []
    draw = synthetic.make_scene
    monkeypatch.setattr(synthetic, "make_scene", lambda *a, **k: calls.append(a) or draw(*a, **k))
    entry = src.pool("val")[3]
    image, mask = src.load(entry)
    again = src.load(entry)
    assert len(calls) == 1 and again[0] is image  # the second read costs nothing
    expected = draw(0, "val", 3)  # the cached pair is the scene the generator draws
    assert np.array_equal(image, expected[0]) and np.array_equal(mask, expected[1])
    tensor_image, tensor_mask = to_tensor(image, mask)
    tensor_image.mul_(0)  # the loaders' tensors are copies: working on them leaves the cache alone
    tensor_mask.fill_(0)
    assert np.array_equal(src.load(entry)[0], expected[0]) and np.array_equal(src.load(entry)[1], expected[1])


def test_resize_must_be_height_and_width():
    from bench.harness.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"resize is \[height, width\]"):
        load_config(overrides=["resize=[120]"])
