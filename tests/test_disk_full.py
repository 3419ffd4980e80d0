"""Out of space is an expected error: one line, exit 1, nothing committed lost, and the same
command after freeing space writes the store an uninterrupted encode writes."""
import errno
import importlib
import os
import resource
import shutil
import subprocess
import uuid

import pytest

import clip_heads.journal as journal_mod
import clip_heads.schema as schema_mod
from clip_heads.journal import StoreWriter
from faultkit import assert_same_store, invoke, make_emotion6, one_line_error

encode_mod = importlib.import_module("clip_heads.encode")  # the package attribute is the function


@pytest.fixture(scope="module")
def e6(tiny_clip, tmp_path_factory):
    root = tmp_path_factory.mktemp("e6-full")
    src = make_emotion6(root / "src", per_class=3)
    args = [str(src), "--model", tiny_clip, "-b", "4", "-w", "0", "--dtype", "float32", "-t", "bp-emotion"]
    ref = root / "ref.h5"
    sizes = {}
    real = journal_mod.write_isolated

    def measure(fn, path, part, **kw):  # the journal's size once every batch and the seal are in it
        sizes["journal"] = os.path.getsize(part)
        return real(fn, path, part, **kw)

    journal_mod.write_isolated = measure
    try:
        code, out = invoke(["-q", "encode", *args, "--out", str(ref)])
    finally:
        journal_mod.write_isolated = real
    assert code == 0, out
    return {"args": args, "ref": ref, "journal": sizes["journal"], "store": os.path.getsize(ref)}


@pytest.fixture
def tmpfs(tmp_path):
    """A 4 MiB tmpfs mounted for the test (root only), always unmounted."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root; the RLIMIT_FSIZE test covers the same path without it")
    mnt = tmp_path / f"mnt-{uuid.uuid4().hex[:6]}"
    mnt.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if res.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.strip()}")
    try:
        yield mnt
    finally:
        if subprocess.run(["umount", str(mnt)], capture_output=True).returncode:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def _fill(mnt):
    """Take every free block of the filesystem (what other files already hold is theirs)."""
    fd = os.open(mnt / "filler", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        for size in (1 << 20, 65536, 4096, 512, 1):
            try:
                while True:
                    os.write(fd, b"\0" * size)
            except OSError as e:
                assert e.errno == errno.ENOSPC
    finally:
        os.close(fd)


def _arm(monkeypatch, point, mnt):
    """Fill the disk at one moment of the encode."""
    if point == "before-first-write":
        _fill(mnt)
    elif point == "mid-run":
        real, calls = StoreWriter.commit, []

        def commit(self, items):
            calls.append(items)
            if len(calls) == 3:
                _fill(mnt)
            return real(self, items)
        monkeypatch.setattr(StoreWriter, "commit", commit)
    elif point == "prompt-encoding":
        real = encode_mod.encode_prompt_set
        monkeypatch.setattr(encode_mod, "encode_prompt_set", lambda *a, **k: (_fill(mnt), real(*a, **k))[1])
    elif point == "building":
        real = journal_mod.write_isolated
        monkeypatch.setattr(journal_mod, "write_isolated", lambda *a, **k: (_fill(mnt), real(*a, **k))[1])
    elif point == "building-late":  # the store is mostly written when the space runs out
        real = journal_mod._build_store

        def build(tmp, part):  # runs in the builder process: leave it room for part of the store
            st = os.statvfs(mnt)
            _reserve(mnt, max(0, st.f_bavail * st.f_frsize - 40000))
            real(tmp, part)
        monkeypatch.setattr(journal_mod, "_build_store", build)
    elif point == "renaming":
        real = schema_mod.durable_replace
        monkeypatch.setattr(schema_mod, "durable_replace", lambda *a: (_fill(mnt), real(*a))[1])


def _reserve(mnt, n):
    with open(mnt / "filler", "wb") as f:
        f.write(b"\0" * n)


@pytest.mark.parametrize("point", ["before-first-write", "mid-run", "prompt-encoding", "building", "building-late", "renaming"])
def test_disk_full_stops_in_one_line_and_the_rerun_writes_the_same_store(e6, tmpfs, monkeypatch, point):
    out = tmpfs / "s.h5"
    _arm(monkeypatch, point, tmpfs)
    code, output = invoke(["-q", "encode", *e6["args"], "--out", str(out)])
    monkeypatch.undo()
    if point == "renaming" and code == 0:
        pass  # a rename takes no space on tmpfs: the encode simply finished
    else:
        assert code == 1, output
        one_line_error(output, "disk full writing")
        assert not out.exists()
        left = sorted(p.name for p in tmpfs.iterdir())
        assert set(left) <= {"filler", "s.h5.partial"}, left  # no temp file, no lock left behind
    (tmpfs / "filler").unlink(missing_ok=True)
    code, output = invoke(["-q", "encode", *e6["args"], "--out", str(out)])
    assert code == 0, output
    assert_same_store(e6["ref"], out)
    assert sorted(p.name for p in tmpfs.iterdir()) == ["s.h5"]


@pytest.mark.parametrize("where", ["journal", "store"])
def test_file_size_limit_stops_in_one_line_and_the_rerun_writes_the_same_store(e6, tmp_path, where):
    """No root needed: RLIMIT_FSIZE makes writes past the limit fail with EFBIG (the CLI ignores
    SIGXFSZ), in the journal mid-run or in the final store once the journal is whole."""
    out = tmp_path / "s.h5"
    limit = 3000 if where == "journal" else e6["journal"] + 64
    assert e6["store"] > limit
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        code, output = invoke(["-q", "encode", *e6["args"], "--out", str(out)])
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert code == 1, output
    one_line_error(output, "writing")
    assert ("images are safe" in output) and not out.exists()
    code, output = invoke(["-q", "encode", *e6["args"], "--out", str(out)])
    assert code == 0 and "resumed" in output, output
    assert_same_store(e6["ref"], out)
    shutil.rmtree(tmp_path)
