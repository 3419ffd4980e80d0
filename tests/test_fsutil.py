import errno
import os
import subprocess
import sys
import textwrap

import pytest

from clip_heads.fsutil import (
    LockedError,
    atomic_write_text,
    exclusive_lock,
    is_disk_full,
    lock_path,
    replace_dir,
    staged_dir,
)

def test_atomic_write_replaces_whole_file_and_leaves_no_temp(tmp_path):
    p = tmp_path / "a.txt"
    atomic_write_text(p, "old")
    atomic_write_text(p, "new content")
    assert p.read_text() == "new content"
    assert sorted(os.listdir(tmp_path)) == ["a.txt"]

def test_staged_dir_swaps_in_only_on_success(tmp_path):
    final = tmp_path / "head"
    with staged_dir(final) as d:
        (d / "config.json").write_text("1")
        (d / "model.safetensors").write_text("w1")
    assert (final / "config.json").read_text() == "1"
    with pytest.raises(KeyboardInterrupt):
        with staged_dir(final) as d:
            (d / "config.json").write_text("2")
            raise KeyboardInterrupt  # killed between the two files
    # The previous folder is intact, and no staging folder is left behind.
    assert (final / "config.json").read_text() == "1" and (final / "model.safetensors").read_text() == "w1"
    assert sorted(os.listdir(tmp_path)) == ["head"]
    with staged_dir(final, copy_existing=True) as d:
        (d / "config.json").write_text("3")
    assert (final / "config.json").read_text() == "3" and (final / "model.safetensors").read_text() == "w1"
    assert sorted(os.listdir(tmp_path)) == ["head"]

def test_replace_dir_refuses_to_replace_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    (tmp_path / "s").mkdir()
    with pytest.raises(NotADirectoryError, match="not a folder"):
        replace_dir(tmp_path / "s", tmp_path / "f")
    assert (tmp_path / "f").read_text() == "x"

def test_lock_is_exclusive_across_processes_and_names_the_holder(tmp_path):
    target = tmp_path / "store.h5"
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from clip_heads.fsutil import exclusive_lock
        with exclusive_lock({str(target)!r}, "encode"):
            print("locked", flush=True)
            time.sleep(60)
    """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(LockedError, match=rf"pid {holder.pid}: encode"):
            with exclusive_lock(target):
                pass
    finally:
        holder.kill()
        holder.wait()
    # The kernel dropped the dead holder's lock: a rerun takes it at once.
    with exclusive_lock(target) as lp:
        assert lp == lock_path(target)
    assert not lock_path(target).exists()

def test_lock_in_one_process_twice_is_refused(tmp_path):
    target = tmp_path / "x"
    with exclusive_lock(target):
        with pytest.raises(LockedError):
            with exclusive_lock(target):
                pass

def test_disk_full_errors_are_recognised_through_chains():
    assert is_disk_full(OSError(errno.ENOSPC, "No space left on device"))
    assert is_disk_full(OSError(errno.EFBIG, "File too large"))
    try:
        try:
            raise OSError(errno.ENOSPC, "x")
        except OSError as e:
            raise RuntimeError("Can't write data (file write failed)") from e
    except RuntimeError as wrapped:
        assert is_disk_full(wrapped)
    assert is_disk_full(RuntimeError("... errno = 28, error message = 'No space left on device'"))
    assert not is_disk_full(OSError(errno.EACCES, "Permission denied"))
    assert not is_disk_full(ValueError("bad"))

