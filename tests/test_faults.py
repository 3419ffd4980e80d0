"""Nothing lost, nothing silently corrupt: faults between the writes of a batch, kills and
interrupts at precise moments, concurrent writers, damaged and hostile store files."""
import errno
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

import importlib
import clip_heads.journal as journal_mod
import clip_heads.schema as schema_mod
import clip_heads.writer as writer_mod
from clip_heads.fsutil import DiskFullError, LockedError, exclusive_lock, run_isolated
from clip_heads.interrupts import INTERRUPTED
from clip_heads.store import PromptSet, StoreError, l2_normalize, open_store
from clip_heads.writer import add_prompt_sets, write_store
from clip_heads.verify import verify_store
from clip_heads.journal import StoreWriter, journal_progress
from faultkit import assert_same_store, invoke, make_emotion6, one_line_error, run_forked

encode_mod = importlib.import_module("clip_heads.encode")  # the package attribute is the function


@pytest.fixture(scope="module")
def e6(tiny_clip, tmp_path_factory):
    """A 19-item Emotion6-shaped source (one unreadable), its encode arguments (batch 4, so
    the last batch is partial) and the store an uninterrupted encode writes."""
    root = tmp_path_factory.mktemp("e6")
    src = make_emotion6(root / "src", per_class=3)
    args = [str(src), "--model", tiny_clip, "-b", "4", "-w", "0", "--dtype", "float32", "-t", "bp-emotion"]
    ref = root / "ref.h5"
    code, out = invoke(["-q", "encode", *args, "--out", str(ref)])
    assert code == 0, out
    # The same, encoded in a forked child as the kill tests run (on one torch thread).
    ref1 = root / "ref-forked.h5"
    assert run_forked(lambda: invoke(["-q", "encode", *args, "--out", str(ref1)]))[:2] == ("exit", 0)
    return {"args": args, "ref": ref, "ref-forked": ref1}


def _encode(e6, out, *extra):
    return invoke(["-q", "encode", *e6["args"], "--out", str(out), *extra])


def _only_store_left(out: Path) -> None:
    assert sorted(p.name for p in out.parent.iterdir()) == [out.name], "no journal, lock or temp file is left"


# -- a fault between the datasets of one batch -------------------------------------------------
def test_fault_after_embeds_before_extras_resumes_to_the_identical_store(e6, tmp_path, monkeypatch):
    out = tmp_path / "s.h5"
    real = journal_mod._write_at
    calls = []

    def torn(fd, data, offset):
        calls.append(len(data))
        if len(calls) == 3 and data[:1] == b"B":  # the third batch: its embeds reach the disk, its extras never do
            (n,) = np.frombuffer(data[16:20], "<u4")
            meta = json.loads(data[20:20 + n])
            embeds_end = 20 + n + int(np.prod(meta["arrays"][0][1])) * np.dtype(meta["arrays"][0][0]).itemsize
            real(fd, data[:embeds_end], offset)
            raise OSError(errno.EIO, "Input/output error")
        real(fd, data, offset)

    monkeypatch.setattr(journal_mod, "_write_at", torn)
    code, output = _encode(e6, out)
    assert code == 1
    one_line_error(output, "8 images are safe")
    monkeypatch.setattr(journal_mod, "_write_at", real)
    assert journal_progress(out) == {"items": 8, "rows": 8, "skipped": 0}  # the torn batch is not counted
    code, output = _encode(e6, out)
    assert code == 0 and "resumed" in output, output
    assert_same_store(e6["ref"], out)
    _only_store_left(out)


def test_torn_and_truncated_journal_resumes_from_its_last_whole_record(tmp_path):
    w = StoreWriter.create(tmp_path / "s.h5", dim=4, classes=["a"], dtype="float32",
                           extras={"v": ((), np.dtype("f4"), None)}, attrs={"model_id": "m", "normalized": False})
    layout_end, ends = os.path.getsize(w.part), []
    for i in range(4):
        w.append(np.full((2, 4), i, np.float32), [f"{i}a", f"{i}b"], [0, 0], {"v": np.array([i, i], np.float32)})
        w.commit(2 * (i + 1))
        ends.append(os.path.getsize(w.part))
    w.close()
    part = StoreWriter.partial_path(tmp_path / "s.h5")
    data = part.read_bytes()
    for cut, whole in [(ends[2] + 5, 3), (ends[1] - 1, 1), (ends[0] - 10, 0)]:
        part.write_bytes(data[:cut])
        w = StoreWriter.resume(tmp_path / "s.h5")
        assert w.progress == [2 * whole, 2 * whole, 0]
        assert os.path.getsize(part) == (ends[whole - 1] if whole else layout_end)  # the torn tail is cut off
        w.close()
    part.write_bytes(data[:20])  # inside the layout record: refused in one line, at once
    with pytest.raises(StoreError, match="not a usable encode journal.*--overwrite"):
        StoreWriter.resume(tmp_path / "s.h5")
    with h5py.File(part, "w") as f:  # an old-style HDF5 partial, truncated: never opened by HDF5
        f["x"] = np.zeros(1000)
    part.write_bytes(part.read_bytes()[:3000])
    with pytest.raises(StoreError, match="older clip-heads.*--overwrite"):
        StoreWriter.resume(tmp_path / "s.h5")


def test_truncated_partial_fails_the_cli_in_one_line_without_hanging(e6, tmp_path):
    out = tmp_path / "s.h5"
    with h5py.File(StoreWriter.partial_path(out), "w", libver="latest") as f:
        f.create_dataset("progress", data=np.zeros(3, np.int64))
    part = StoreWriter.partial_path(out)
    part.write_bytes(part.read_bytes()[:1200])
    how, code, res = run_forked(lambda: invoke(["-q", "encode", *e6["args"], "--out", str(out)]), timeout=60)
    assert (how, code) == ("exit", 0) and res["ok"], res
    rc, output = res["value"]
    assert rc == 1
    one_line_error(output, "older clip-heads")
    code, output = _encode(e6, out, "--overwrite")
    assert code == 0, output
    assert_same_store(e6["ref"], out)


# -- interrupts and kills at precise moments -----------------------------------------------------
@pytest.mark.parametrize("delay", [0.1, 1.0])
def test_sigint_in_the_first_second_prints_one_line_and_reruns(e6, tmp_path, delay):
    out = tmp_path / "s.h5"
    cmd = [sys.executable, "-m", "clip_heads.cli", "-q", "encode", *e6["args"], "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(delay)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert err.strip() == INTERRUPTED
    code, output = _encode(e6, out)
    assert code == 0, output
    assert_same_store(e6["ref"], out)
    _only_store_left(out)


def _kill_self(sig):
    os.kill(os.getpid(), sig)
    time.sleep(5)  # SIGINT is raised at the next bytecode; SIGKILL never returns


@pytest.mark.parametrize("point", ["prompt-encoding", "before-build", "before-rename", "after-rename"])
def test_sigint_while_finishing_prints_one_line_and_reruns(e6, tmp_path, monkeypatch, point):
    """After the last (partial) batch: 19 items done is no multiple of the batch size 4."""
    out = tmp_path / "s.h5"
    _arm(monkeypatch, point, signal.SIGINT)
    code, output = _encode(e6, out)
    monkeypatch.undo()
    assert code == 130
    assert output.strip().splitlines()[-1] == INTERRUPTED and "Traceback" not in output
    code, output = _encode(e6, out)
    assert code == 0, output
    assert_same_store(e6["ref"], out)
    _only_store_left(out)


def _arm(monkeypatch, point, sig):
    if point == "prompt-encoding":
        real = encode_mod.encode_prompt_set
        monkeypatch.setattr(encode_mod, "encode_prompt_set", lambda *a, **k: (_kill_self(sig), real(*a, **k))[1])
    elif point == "before-build":
        real = journal_mod.write_isolated
        monkeypatch.setattr(journal_mod, "write_isolated", lambda *a, **k: (_kill_self(sig), real(*a, **k))[1])
    elif point == "in-build":
        real = journal_mod._build_store

        def build(tmp, part):  # runs in the builder child: kill the encode process halfway
            real(tmp, part)
            os.kill(os.getppid(), sig)
            time.sleep(5)
        monkeypatch.setattr(journal_mod, "_build_store", build)
    elif point in ("before-rename", "after-rename"):
        real = schema_mod.durable_replace

        def replace(src, dst):
            if point == "before-rename":
                _kill_self(sig)
            real(src, dst)
            if point == "after-rename":
                _kill_self(sig)
        monkeypatch.setattr(schema_mod, "durable_replace", replace)


@pytest.mark.parametrize("point", ["before-build", "in-build", "before-rename", "after-rename"])
def test_sigkill_inside_finish_leaves_what_the_rerun_finishes(e6, tmp_path, monkeypatch, point):
    out = tmp_path / "s.h5"

    def run():
        _arm(monkeypatch, point, signal.SIGKILL)
        return invoke(["-q", "encode", *e6["args"], "--out", str(out)])

    how, sig, _ = run_forked(run)
    assert (how, sig) == ("signal", signal.SIGKILL)
    assert StoreWriter.partial_path(out).exists() and out.exists() == (point == "after-rename")
    code, output = _encode(e6, out)
    assert code == 0, output
    assert ("up-to-date" if point == "after-rename" else "resumed") in output
    assert_same_store(e6["ref-forked"], out)
    _only_store_left(out)


# -- concurrent writers, destructive-before-safe ----------------------------------------------
def _hold_lock_in_child(target, what):
    """A forked process holding ``target``'s writer lock until told to stop."""
    r, w = os.pipe()
    go_r, go_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            with exclusive_lock(target, what):
                os.write(w, b"x")
                os.read(go_r, 1)
        finally:
            os._exit(0)
    assert os.read(r, 1) == b"x"

    def release():
        os.write(go_w, b"x")
        os.waitpid(pid, 0)
    return pid, release


def test_second_encode_of_one_store_fails_at_once_naming_the_first(e6, tmp_path):
    out = tmp_path / "s.h5"
    pid, release = _hold_lock_in_child(out, "encode")
    try:
        code, output = _encode(e6, out)
    finally:
        release()
    assert code == 1
    one_line_error(output, f"being written by another process (pid {pid}: encode")
    assert not StoreWriter.partial_path(out).exists() and not out.exists()
    assert _encode(e6, out)[0] == 0


def test_concurrent_prompt_writers_never_lose_a_reported_set(tmp_path, monkeypatch):
    p = write_store(tmp_path / "s.h5", l2_normalize(np.random.default_rng(0).normal(size=(20, 4))), np.arange(20) % 2, ["a", "b"])
    r, w = os.pipe()
    real = writer_mod.write_isolated

    def slow(*a, **k):  # the first writer is inside its write, holding the lock
        os.write(w, b"x")
        time.sleep(1.0)
        return real(*a, **k)

    def first():
        monkeypatch.setattr(writer_mod, "write_isolated", slow)
        add_prompt_sets(p, [_prompts("first")])
        return "added"

    pid = os.fork()
    if pid == 0:
        try:
            first()
        finally:
            os._exit(0)
    assert os.read(r, 1) == b"x"
    with pytest.raises(LockedError, match=f"pid {pid}: adding prompt sets"):
        add_prompt_sets(p, [_prompts("second")])
    assert os.waitpid(pid, 0)[1] == 0
    with open_store(p) as s:
        assert s.prompt_sets() == ["first"]  # the one reported as added is there; the refused one is not
    add_prompt_sets(p, [_prompts("second")])
    with open_store(p) as s:
        assert s.prompt_sets() == ["first", "second"]


def _prompts(name, classes=("a", "b"), dim=4):
    rng = np.random.default_rng(len(name))
    return PromptSet(name, list(classes), ["{}"], list(classes), rng.normal(size=(len(classes), dim)).astype(np.float32),
                     np.zeros(len(classes), int), np.arange(len(classes)))


def test_overwrite_with_a_bad_model_keeps_the_old_store(e6, tmp_path):
    out = tmp_path / "s.h5"
    assert _encode(e6, out)[0] == 0
    before = out.read_bytes()
    args = list(e6["args"])
    args[args.index("--model") + 1] = str(tmp_path / "no-such-model")
    code, output = invoke(["-q", "encode", *args, "--out", str(out), "--overwrite"])
    assert code == 1 and "no-such-model" in output
    assert out.read_bytes() == before
    _only_store_left(out)


def test_overwrite_replaces_the_store_only_once_the_new_one_is_complete(e6, tmp_path, monkeypatch):
    out = tmp_path / "s.h5"
    assert _encode(e6, out)[0] == 0
    before = out.read_bytes()
    _arm(monkeypatch, "prompt-encoding", signal.SIGINT)
    assert _encode(e6, out, "--overwrite")[0] == 130
    monkeypatch.undo()
    assert out.read_bytes() == before and StoreWriter.partial_path(out).exists()  # old store intact beside the new journal
    code, output = _encode(e6, out, "--overwrite")
    assert code == 0 and "resumed" in output, output  # the same command resumes the new encode
    assert_same_store(e6["ref"], out)


def test_resume_refuses_another_precision_or_batch_size(e6, tmp_path, monkeypatch):
    out = tmp_path / "s.h5"
    _arm(monkeypatch, "prompt-encoding", signal.SIGINT)
    assert _encode(e6, out)[0] == 130
    monkeypatch.undo()
    with open_store(StoreWriter.partial_path(out), allow_incomplete=True) as s:
        assert s.attrs["precision"] == "fp32" and s.attrs["batch_size"] == 4  # what was used, not "auto"
    code, output = _encode(e6, out, "--precision", "bf16")
    assert code == 1
    one_line_error(output, "--precision fp32")
    args = list(e6["args"])
    args[args.index("-b") + 1] = "8"
    code, output = invoke(["-q", "encode", *args, "--out", str(out)])
    assert code == 1
    one_line_error(output, "--batch-size 4")
    assert _encode(e6, out)[0] == 0
    assert_same_store(e6["ref"], out)


def test_merge_refuses_an_output_equal_to_a_shard(tmp_path):
    p = write_store(tmp_path / "s.h5", np.eye(3), [0, 1, 2])
    before = p.read_bytes()
    code, output = invoke(["merge", str(p), str(p)])
    assert code == 1
    one_line_error(output, "also one of the shards")
    assert p.read_bytes() == before


# -- damaged and hostile store files -------------------------------------------------------------
def _flip(path: Path, offset: int) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 0x40
    path.write_bytes(bytes(raw))


def test_bit_flip_in_embeds_is_caught_by_readers_and_verify(tmp_path):
    X = l2_normalize(np.random.default_rng(0).normal(size=(1000, 16)))
    p = write_store(tmp_path / "s.h5", X, np.arange(1000) % 3, ["a", "b", "c"], keys=[f"key-{i:05d}" for i in range(1000)],
                    prompt_sets=[_prompts("t", ("a", "b", "c"), 16)])
    assert verify_store(p).ok
    with h5py.File(p, "r") as f:
        off = f["images/embeds"].id.get_chunk_info(2).byte_offset  # rows 512-767
    _flip(p, off + 1000)
    with open_store(p) as s:
        with pytest.raises(StoreError, match="/images/embeds rows 512-767 are damaged"):
            s.arrays()
        assert s.embeddings(rows=slice(0, 256)).shape == (256, 16)  # undamaged rows still read
    rep = verify_store(p)
    assert not rep.ok and [(q.dataset, q.rows) for q in rep.problems] == [("/images/embeds", (512, 768))]
    code, output = invoke(["verify", str(p)])
    assert code == 1 and "/images/embeds rows 512-767" in output
    code, output = invoke(["zero-shot", str(p), "--out", str(tmp_path / "zs")])
    assert code == 1
    one_line_error(output, "/images/embeds rows 512-767")


def test_changed_key_string_is_caught_by_its_digest(tmp_path):
    p = write_store(tmp_path / "s.h5", np.eye(4), [0, 1, 0, 1], ["a", "b"], keys=["cat/1.jpg", "cat/2.jpg", "dog/1.jpg", "dog/2.jpg"])
    raw = p.read_bytes()
    i = raw.index(b"dog/1.jpg")
    p.write_bytes(raw[:i] + b"dog/7.jpg" + raw[i + 9:])  # a flipped bit inside HDF5's string heap
    with open_store(p) as s:
        with pytest.raises(StoreError, match="/images/keys does not match its sha256"):
            s.keys  # noqa: B018  (reading the property is the test)
        np.testing.assert_array_equal(s.embeddings(), np.eye(4))
    assert [q.dataset for q in verify_store(p).problems] == ["/images/keys"]


def test_store_without_checksums_still_opens_and_verify_says_so(tmp_path):
    p = tmp_path / "old.h5"  # the layout stores had before checksums
    with h5py.File(p, "w") as f:
        f.attrs.update(schema_version=1, model_id="m", model_hash="", dim=4, dtype="float16", normalized=True, complete=True)
        f["classes"] = np.array(["a", "b"], dtype=object)
        f.create_dataset("images/embeds", data=l2_normalize(np.eye(4)).astype(np.float16), maxshape=(None, 4), chunks=(256, 4))
        f.create_dataset("images/keys", data=np.array(list("wxyz"), dtype=object), dtype=h5py.string_dtype())
        f["images/labels"] = np.array([0, 1, 0, 1])
        f.create_group("images/extras")
        f["progress"] = np.array([4, 4, 0])
    with open_store(p) as s:
        assert len(s) == 4 and not s.checksums and s.keys == list("wxyz")
    rep = verify_store(p)
    assert rep.ok and not rep.checksums and "no checksum" in rep.text


def test_links_to_other_files_are_refused_unless_declared(tmp_path):
    other = write_store(tmp_path / "other.h5", np.eye(2) * 7, [0, 1])
    p = write_store(tmp_path / "s.h5", np.eye(2), [0, 1])
    with h5py.File(p, "a") as f:
        f["images/extras/leak"] = h5py.ExternalLink("other.h5", "/images/embeds")
    with pytest.raises(StoreError, match="/images/extras/leak is an external link to other.h5"):
        open_store(p)
    code, output = invoke(["info", str(p)])
    assert code == 1 and "7.0" not in output
    one_line_error(output, "external link")
    assert not verify_store(p).ok
    with h5py.File(p, "a") as f:  # a virtual dataset reading the other file
        del f["images/extras/leak"]
        del f["images/labels"]
        layout = h5py.VirtualLayout(shape=(2,), dtype="i8")
        layout[:] = h5py.VirtualSource(str(other), "images/labels", shape=(2,))
        f.create_virtual_dataset("images/labels", layout)
    with pytest.raises(StoreError, match="/images/labels is a virtual dataset reading"):
        open_store(p)
    with h5py.File(p, "a") as f:  # the documented hook: a store declares the files it may read
        f.attrs["virtual_sources"] = json.dumps([str(other)])
    with open_store(p) as s:
        np.testing.assert_array_equal(s.labels, [0, 1])


@pytest.mark.parametrize("edit, needle", [
    (lambda f: f["images/labels"].__setitem__(3, 7), "/images/labels has value 7 at row 3"),
    (lambda f: f["images/labels"].__setitem__(0, -2), "/images/labels has value -2 at row 0"),
    (lambda f: f["prompts/t/class_id"].__setitem__(1, 5), "/prompts/t/class_id has value 5 at row 1"),
    (lambda f: f["prompts/t/template_id"].__setitem__(0, 1), "/prompts/t/template_id has value 1 at row 0"),
    (lambda f: f["images/keys"].resize((9,)), "/images/keys has 9 rows but the store records 10"),
    (lambda f: f["progress"].__setitem__(0, 11), "/progress says 11 items = 10 rows + 0 skipped"),
])
def test_out_of_range_values_and_misaligned_columns_are_refused_on_open(tmp_path, edit, needle):
    p = write_store(tmp_path / "s.h5", np.eye(10), np.arange(10) % 2, ["a", "b"], prompt_sets=[_prompts("t", dim=10)])
    with h5py.File(p, "a") as f:
        edit(f)
    with pytest.raises(StoreError, match=re.escape(needle)):
        open_store(p)
    code, output = invoke(["info", str(p)])
    assert code == 1
    one_line_error(output, needle)


@pytest.mark.parametrize("name", [".", "..", "prompts", "", "a/b", "-x", "with space", "x" * 129])
def test_prompt_set_names_follow_the_documented_rule(tmp_path, name):
    p = write_store(tmp_path / "s.h5", np.eye(4), [0, 1, 0, 1], ["a", "b"])
    before = p.read_bytes()
    for overwrite in (False, True):
        with pytest.raises(StoreError, match="invalid prompt set name"):
            add_prompt_sets(p, [_prompts(name)], overwrite=overwrite)
    assert p.read_bytes() == before
    add_prompt_sets(p, [_prompts("fi-labels.v2_1")])


def test_prompts_cli_refuses_a_bad_name_in_one_line(e6, tmp_path):
    code, output = invoke(["prompts", str(e6["ref"]), "-t", "bp-photo", "--name", ".", "--overwrite"])
    assert code == 2  # a bad value (issue 9: exit 2)
    one_line_error(output, "invalid prompt set name '.'")


# -- the isolation the writers rely on -----------------------------------------------------------
def test_run_isolated_brings_errors_back_and_survives_a_crash(tmp_path):
    def full():
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(DiskFullError):
        run_isolated(full)
    with pytest.raises(StoreError, match="bad store"):
        run_isolated(lambda: (_ for _ in ()).throw(StoreError("bad store")), errors={"StoreError": StoreError})
    def crash():
        import faulthandler

        faulthandler.disable()  # a quiet crash
        os.kill(os.getpid(), signal.SIGSEGV)

    with pytest.raises(RuntimeError, match="signal 11"):
        run_isolated(crash)
    marker = tmp_path / "m"
    run_isolated(lambda: marker.write_text("written by the child"))
    assert marker.read_text() == "written by the child"


def test_verify_reports_an_unfinished_encode(e6, tmp_path, monkeypatch):
    out = tmp_path / "s.h5"
    _arm(monkeypatch, "prompt-encoding", signal.SIGINT)
    assert _encode(e6, out)[0] == 130
    monkeypatch.undo()
    code, output = invoke(["verify", str(StoreWriter.partial_path(out))])
    assert code == 0 and "unfinished encode: 19 items committed (18 rows, 1 skipped)" in output
    code, output = invoke(["info", str(StoreWriter.partial_path(out))])
    assert code == 0 and "INCOMPLETE" in output and "18 x 16" in output


def test_reentrant_lock_joins_in_its_own_thread_only(tmp_path):
    import threading

    target = tmp_path / "s.h5"
    seen = []
    with exclusive_lock(target, "encode", reentrant=True):
        with exclusive_lock(target, "prompts", reentrant=True):  # an encode adding prompts to its own store
            pass
        with pytest.raises(LockedError):
            with exclusive_lock(target, "other"):  # not reentrant: refused even here
                pass

        def other_thread():
            try:
                with exclusive_lock(target, "thread", reentrant=True):
                    seen.append("took it")
            except LockedError:
                seen.append("refused")
        t = threading.Thread(target=other_thread)
        t.start()
        t.join()
    assert seen == ["refused"]
