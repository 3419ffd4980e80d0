"""Hostile and broken sources: bounded time and memory, nothing read outside the root, one line each."""
from __future__ import annotations

import gzip
import os
import pickle
import resource
import subprocess
import sys
import tarfile
import threading
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from clip_heads import images
from clip_heads.backbone import Preprocess
from clip_heads.cli import main
from clip_heads.datasets import open_source
from clip_heads.images import BadImage, ImageLimits, RefusedFile, open_regular, open_rgb, read_regular
from clip_heads.loading import DecodedBatches
from clip_heads.source import is_inside
from clip_heads.store import open_store

REPO = Path(__file__).resolve().parents[1]


def _img(path, size=(12, 9), color=(10, 20, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def _no_hang(fn, seconds=10.0):
    """Run fn in a thread; fail (instead of hanging the suite) when it does not return in time."""
    out: dict = {}

    def run():
        try:
            out["value"] = fn()
        except BaseException as e:  # handed back to the test below
            out["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), f"{fn} still running after {seconds} s"
    if "error" in out:
        raise out["error"]
    return out.get("value")


def _cli(*args):
    """The CLI in process: exit code and output; a traceback would show up as result.exception."""
    r = CliRunner().invoke(main, ["-q", *map(str, args)])
    return r.exit_code, r.output.strip(), r.exception


def _one_line_error(code, output, exc, *, match):
    assert code == 1 and isinstance(exc, SystemExit), (code, output, exc)
    assert "Traceback" not in output and len(output.splitlines()) == 1, output
    assert output.startswith("Error: ") and match in output, output


# ---------------------------------------------------------------------------------------- files

def test_fifo_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    for read in (lambda: open_rgb(fifo), lambda: read_regular(fifo)):
        with pytest.raises((BadImage, RefusedFile), match=r"^not a regular file \(FIFO\)$"):
            _no_hang(read)


def test_swapped_in_fifo_is_caught_on_the_descriptor(tmp_path, monkeypatch):
    # The path passes the stat check, then is a FIFO when opened: the non-blocking open
    # returns at once and the check on the descriptor refuses it.
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    regular, real_stat = os.stat(_img(tmp_path / "ok.png")), os.stat
    monkeypatch.setattr(images.os, "stat", lambda p, *a, **k: regular if os.fspath(p) == str(fifo) else real_stat(p, *a, **k))
    with pytest.raises(RefusedFile, match=r"^not a regular file \(FIFO\)$"):
        _no_hang(lambda: open_regular(fifo))


def test_devices_and_size_limit(tmp_path):
    (tmp_path / "zero.jpg").symlink_to("/dev/zero")
    with pytest.raises(BadImage, match=r"^not a regular file \(character device\)$"):
        _no_hang(lambda: open_rgb(tmp_path / "zero.jpg"))
    big = _img(tmp_path / "big.png", size=(64, 64))
    n = big.stat().st_size
    with pytest.raises(BadImage, match=rf"^file too large \({n} bytes > limit {n - 1}\)$"):
        open_rgb(big, ImageLimits(max_file_bytes=n - 1))
    assert open_rgb(big, ImageLimits(max_file_bytes=n)).size == (64, 64)
    with open(big, "rb") as f:  # a file object is read with the same cap
        with pytest.raises(BadImage, match=rf"^file too large \(more than {n - 1} bytes\)$"):
            open_rgb(f, ImageLimits(max_file_bytes=n - 1))


def test_thin_strip_is_refused_before_decoding(tmp_path):
    strip = _img(tmp_path / "strip.png", size=(40000, 1))
    assert strip.stat().st_size < 300  # a few hundred bytes: passes any pixel-count check
    with pytest.raises(BadImage, match=r"^extreme aspect ratio \(40000x1 > 50:1\)$"):
        open_rgb(strip)
    tall = _img(tmp_path / "tall.png", size=(2, 101))
    with pytest.raises(BadImage, match=r"^extreme aspect ratio \(2x101 > 50:1\)$"):
        open_rgb(tall)
    assert open_rgb(_img(tmp_path / "wide.png", size=(100, 2))).size == (100, 2)  # 50:1 is allowed
    assert open_rgb(strip, ImageLimits(max_aspect=None)).size == (40000, 1)


def test_pixel_limit_is_checked_from_the_header(tmp_path):
    p = _img(tmp_path / "a.png", size=(100, 100))
    with pytest.raises(BadImage, match=r"^decompression bomb \(10000 pixels\)$"):
        open_rgb(p, ImageLimits(max_pixels=9999))
    assert open_rgb(p, ImageLimits(max_pixels=10000)).size == (100, 100)


class _Stub:
    """A source of in-memory images (the loader needs only load, limits)."""

    limits = ImageLimits(max_aspect=None, max_resized_pixels=10**6)

    def __init__(self, imgs):
        self.imgs = imgs

    def load(self, i):
        img = self.imgs[i]
        if isinstance(img, Exception):
            raise img
        return img


def test_loader_refuses_a_resize_that_would_blow_up():
    pre = Preprocess(shortest_edge=30, crop_height=30, crop_width=30)
    ok, strip = Image.new("RGB", (40, 30)), Image.new("RGB", (4000, 1))  # strip -> 120000 x 30
    b = DecodedBatches(_Stub([ok, strip, BadImage("truncated JPEG")]), np.arange(3), 8, pre)[0]
    assert b["n"] == 3 and b["good"] == [0] and tuple(b["pixels"].shape) == (1, 3, 30, 30)
    assert b["bad"] == [(1, "extreme aspect ratio (4000x1 would be resized to 120000x30, over 1000000 pixels)"),
                        (2, "truncated JPEG")]


def test_loader_lets_bugs_propagate():
    pre = Preprocess(shortest_edge=30, crop_height=30, crop_width=30)
    for bug in (TypeError("a bug"), RuntimeError("a bug"), MemoryError()):
        with pytest.raises(type(bug)):
            DecodedBatches(_Stub([Image.new("RGB", (30, 30)), bug]), np.arange(2), 2, pre)[0]


def test_a_preprocessing_bug_stops_the_encode(tiny_clip, tmp_path, monkeypatch):
    from clip_heads.encode import encode
    from clip_heads.journal import StoreWriter

    for i in range(3):
        _img(tmp_path / "data" / "cat" / f"{i}.png")

    def broken(self, img, *args):  # (img, resizer)
        raise TypeError("preprocessing bug")

    monkeypatch.setattr(Preprocess, "pixels", broken)  # the uint8 crop both the float and the uint8 paths make
    with pytest.raises(TypeError, match="preprocessing bug"):
        encode(str(tmp_path / "data"), tmp_path / "s.h5", model=tiny_clip, workers=0, progress=False)
    part = StoreWriter.partial_path(tmp_path / "s.h5")
    with open_store(part, allow_incomplete=True) as s:
        assert len(s) == 0 and s.skipped() == []  # nothing recorded as a skipped image


# ---------------------------------------------------------------------------------------- encode, end to end

MAXRSS = "import resource, subprocess, sys; rc = subprocess.call(sys.argv[1:]); " \
         "print('MAXRSS_KB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); sys.exit(rc)"


def test_hostile_folder_encodes_in_bounded_time_and_memory(tiny_clip, tmp_path):
    root = tmp_path / "data"
    for i in range(3):
        _img(root / "cat" / f"{i}.png", color=(i * 40, 0, 0))
        _img(root / "dog" / f"{i}.png", color=(0, i * 40, 0))
    os.mkfifo(root / "cat" / "pipe.jpg")  # blocks whoever opens it
    (root / "cat" / "zero.jpg").symlink_to("/dev/zero")  # never ends
    _img(root / "cat" / "strip.png", size=(40000, 1))  # 8.6 GB once resized to 224 on its short edge
    secret = _img(tmp_path / "elsewhere" / "secret.png")
    (root / "dog" / "link.png").symlink_to(secret)  # a file outside the root
    (root / "dog" / "inside.png").symlink_to(root / "cat" / "0.png")  # a symlink inside the root is fine
    env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    cmd = [sys.executable, "-c", MAXRSS, sys.executable, "-m", "clip_heads.cli", "-q", "encode", str(root),
           "--out", str(tmp_path / "s.h5"), "--model", tiny_clip, "--workers", "0"]
    # A cap on address space too, so that a regression fails here instead of taking the machine.
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env,
                       preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30)))
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr and r.stdout.strip() == f"encoded: {tmp_path / 's.h5'} (7 images, 4 skipped)"
    peak_mb = int(r.stderr.split("MAXRSS_KB")[1].split()[0]) / 1024
    assert peak_mb < 800, f"peak RSS {peak_mb:.0f} MB"  # torch + transformers alone take ~350-450 MB
    with open_store(tmp_path / "s.h5") as s:
        skipped = dict(s.skipped())
        assert sorted(s.keys) == ["cat/0.png", "cat/1.png", "cat/2.png", "dog/0.png", "dog/1.png", "dog/2.png",
                                  "dog/inside.png"]
    assert skipped == {
        "cat/pipe.jpg": "not a regular file (FIFO)",
        "cat/zero.jpg": "outside the source root (resolves to /dev/zero)",
        "cat/strip.png": "extreme aspect ratio (40000x1 > 50:1)",
        "dog/link.png": f"outside the source root (resolves to {secret.resolve()})",
    }


def test_allow_outside_root_reads_symlinks_out(tmp_path):
    root = tmp_path / "data"
    _img(root / "cat" / "a.png")
    secret = _img(tmp_path / "elsewhere" / "secret.png", color=(1, 2, 3))
    (root / "cat" / "link.png").symlink_to(secret)
    (root / "cat" / "zero.png").symlink_to("/dev/zero")
    src = open_source(root)
    with pytest.raises(BadImage, match="^outside the source root"):
        src.load(src.keys.index("cat/link.png"))
    assert "allow_outside_root" not in src.options  # the default leaves fingerprints as they were
    free = open_source(root, allow_outside_root=True)
    assert free.load(free.keys.index("cat/link.png")).getpixel((0, 0)) == (1, 2, 3)
    with pytest.raises(BadImage, match=r"^not a regular file \(character device\)$"):
        free.load(free.keys.index("cat/zero.png"))  # regular files only, whatever the flag
    assert free.options == {"allow_outside_root": True} and free.fingerprint() != src.fingerprint()
    assert is_inside("/a/b/c", "/a/b") and is_inside("/a/b", "/a/b") and not is_inside("/a/bc", "/a/b")


# ---------------------------------------------------------------------------------------- one line each, at open time

def test_class_folder_symlinked_out_of_the_root(tmp_path):
    _img(tmp_path / "data" / "cat" / "a.png")
    _img(tmp_path / "elsewhere" / "dogs" / "b.png")
    (tmp_path / "data" / "dog").symlink_to(tmp_path / "elsewhere" / "dogs")
    code, out, exc = _cli("encode", tmp_path / "data", "--out", tmp_path / "s.h5")
    _one_line_error(code, out, exc, match="class folder 'dog' in")
    assert "resolves outside the source root" in out and "--allow-outside-root" in out
    assert open_source(tmp_path / "data", allow_outside_root=True).keys == ["cat/a.png", "dog/b.png"]


@pytest.mark.parametrize("entry, rule", [
    ("../../etc/passwd", "resolves outside the manifest's folder"),
    ("/etc/passwd", "is an absolute path outside the manifest's folder"),
    ("link/secret.png", "resolves outside the manifest's folder"),
])
def test_manifest_paths_stay_inside_its_folder(tmp_path, entry, rule):
    m = tmp_path / "sub" / "m.csv"
    _img(m.parent / "ok.png")
    _img(tmp_path / "elsewhere" / "secret.png")
    (m.parent / "link").symlink_to(tmp_path / "elsewhere")
    m.write_text(f"path,label\nok.png,a\n{entry},b\n")
    code, out, exc = _cli("encode", m, "--out", tmp_path / "s.h5")
    _one_line_error(code, out, exc, match=f"row 2 (line 3): '{entry}' {rule}")
    if entry.startswith("link"):
        assert open_source(m, allow_outside_root=True).keys == ["ok.png", "link/secret.png"]


def test_manifest_entry_must_be_a_regular_file(tmp_path):
    os.mkfifo(tmp_path / "pipe.jpg")
    (tmp_path / "m.csv").write_text("path,label\npipe.jpg,a\n")
    with pytest.raises(ValueError, match=r"row 1 \(line 2\): 'pipe.jpg' is not a regular file \(FIFO\)"):
        _no_hang(lambda: open_source(tmp_path / "m.csv"))
    os.mkfifo(tmp_path / "fifo.csv")  # the manifest itself
    with pytest.raises(ValueError, match=r"dataset path '.*fifo.csv' is a FIFO: expected a folder or a regular file"):
        _no_hang(lambda: open_source(tmp_path / "fifo.csv"))


def test_csv_field_over_the_limit(tmp_path):
    _img(tmp_path / "a.png")
    (tmp_path / "m.csv").write_text("path,label\na.png,x\n\"" + "y" * 131_073 + "\",z\n")
    code, out, exc = _cli("encode", tmp_path / "m.csv", "--out", tmp_path / "s.h5")
    _one_line_error(code, out, exc, match=f"manifest '{tmp_path / 'm.csv'}' row 2 (line 3): field larger than field limit")
    (tmp_path / "bad.csv").write_bytes(b"path,label\n\xff\xfe.png,x\n")
    with pytest.raises(ValueError, match=r"bad.csv' is not UTF-8 text"):
        open_source(tmp_path / "bad.csv")


def test_deep_folder(tmp_path):
    deep = tmp_path / "data" / "cat"
    deep.mkdir(parents=True)
    try:
        for _ in range(1100):  # one level at a time: pathlib's and os's makedirs recurse (Python < 3.12)
            deep = deep / "d"
            deep.mkdir()
        _img(deep / "x.png")
        _img(tmp_path / "data" / "cat" / "y.png")
        code, out, exc = _cli("encode", tmp_path / "data", "--out", tmp_path / "s.h5")
        _one_line_error(code, out, exc, match="nests subfolders deeper than 128 levels (at 'cat/d/d/d/")
    finally:
        _remove_deep(tmp_path / "data")  # pytest's own clean-up (shutil.rmtree) would recurse


def _remove_deep(top: Path) -> None:
    folders, stack = [], [top]
    while stack:
        d = stack.pop()
        folders.append(d)
        for e in os.scandir(d):
            if e.is_dir(follow_symlinks=False):
                stack.append(Path(e.path))
            else:
                os.unlink(e.path)
    for d in reversed(folders):
        os.rmdir(d)


def test_cifar_pickle_allocation_is_bounded(tmp_path):
    from test_datasets import _cifar_files

    _cifar_files(tmp_path / "c")
    blob = b"\x80\x02cbuiltins\nbytearray\n\x8a\x05\x00\xf2\x05*\x01\x85R."  # bytearray(5_000_000_000)
    assert len(blob) < 40 and pickle.loads(b"\x80\x02\x8a\x05\x00\xf2\x05*\x01.") == 5_000_000_000
    (tmp_path / "c" / "test").write_bytes(blob)
    tracemalloc.start()
    try:
        code, out, exc = _cli("encode", tmp_path / "c", "--out", tmp_path / "s.h5")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    _one_line_error(code, out, exc, match="refusing to load CIFAR-100 'test': refusing bytearray(int)")
    assert peak < 50 << 20, peak
    # An ndarray of a forged shape, and a dtype of a forged size, are refused before they allocate.
    forged = [np.ndarray, ((10**10,), "u1")], [np.dtype, (("u1", (10**9,)),)]
    for fn, args in forged:
        blob = _reduce_pickle(fn, args)
        (tmp_path / "c" / "test").write_bytes(blob)
        with pytest.raises(ValueError, match=rf"refusing numpy (array|dtype) .* from a pickle of {len(blob)} bytes"):
            open_source(tmp_path / "c")


def _reduce_pickle(fn, args):
    class R:
        def __reduce__(self):
            return fn, args

    return pickle.dumps(R(), protocol=2)


def test_tar_members_bounded_by_their_declared_size(tmp_path):
    from test_datasets import _cifar_files

    _cifar_files(tmp_path / "c")
    meta = (tmp_path / "c" / "meta").read_bytes()
    # 1. A header declaring more than the archive holds.
    ti = tarfile.TarInfo("cifar-100-python/meta")
    ti.size = 10 * len(meta)
    (tmp_path / "short.tar.gz").write_bytes(gzip.compress(ti.tobuf(tarfile.GNU_FORMAT) + meta))
    code, out, exc = _cli("encode", tmp_path / "short.tar.gz", "--out", tmp_path / "s.h5")
    _one_line_error(code, out, exc, match="cannot read cifar100 archive")
    # 2. A member of 300 MB of zeros in a 1.3 MB archive: refused from its header, never read.
    ti.size = 300 << 20
    z = zlib.compressobj(1, zlib.DEFLATED, 31)
    body = [z.compress(ti.tobuf(tarfile.GNU_FORMAT))]
    chunk = bytes(16 << 20)
    body += [z.compress(chunk) for _ in range(ti.size // len(chunk))] + [z.compress(bytes(1024)), z.flush()]
    (tmp_path / "bomb.tar.gz").write_bytes(b"".join(body))
    assert (tmp_path / "bomb.tar.gz").stat().st_size < 2 << 20
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match=r"member 'cifar-100-python/meta' declares 314572800 bytes"):
            open_source(tmp_path / "bomb.tar.gz")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 50 << 20, peak


def test_formats_that_run_external_programs_are_refused(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.eps")  # decoding EPS runs Ghostscript
    (tmp_path / "a.jpg").write_bytes((tmp_path / "a.eps").read_bytes())
    with pytest.raises(BadImage, match=r"^unsupported format EPS$"):
        open_rgb(tmp_path / "a.jpg")


def test_emotion6_ground_truth_must_be_a_regular_file(tmp_path):
    for c in ("anger", "disgust", "fear", "joy", "sadness", "surprise"):
        _img(tmp_path / "e6" / "images" / c / "1.jpg")
    os.mkfifo(tmp_path / "e6" / "ground_truth.txt")
    with pytest.raises(ValueError, match=r"cannot read emotion6 ground truth '.*ground_truth.txt': not a regular file \(FIFO\)"):
        _no_hang(lambda: open_source(tmp_path / "e6", format="emotion6"))
