"""Filesystem primitives every writer uses: atomic replacement, durability, exclusive locks.

One home for these, so that "write somewhere safe, make it durable, then swap it in" is the
same everywhere: a store, a prompt-set rewrite, a head folder, a WiSE-FT model, a report.

* :func:`atomic_write_text` / :func:`atomic_write_bytes` - a file replaced in one rename.
* :func:`staged_dir` - a folder built beside its destination and swapped in at the end
  (an atomic exchange where the kernel offers one), so a reader sees the old folder or the
  new one, never a mix.
* :func:`exclusive_lock` - one writer per output; a second fails at once and is told which
  process holds it. Locks are ``flock`` locks, released by the kernel when the holder dies.
* :func:`is_disk_full` - the errors that mean "no space": the caller stops cleanly
  (:class:`DiskFullError` says so in one line).
* :func:`run_isolated` - run a write in a forked child, so a library left broken by a failed
  write (HDF5 after ENOSPC segfaults at exit) cannot take the caller down;
  :func:`remove_stale_siblings` clears the temporary files killed writers left.
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import json
import logging
import os
import re
import secrets
import shutil
import signal
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Union

logger = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]
DISK_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


class LockedError(RuntimeError):
    """Another process holds the lock of an output this process wants to write."""


class DiskFullError(OSError):
    """A write stopped because the disk (or a quota, or the file-size limit) is full.

    Its message is one line for the user: what was being written, what is safe, what to do."""

    def __init__(self, message: str, errno_: int = errno.ENOSPC):
        super().__init__(errno_, message)
        self.message = message

    def __str__(self) -> str:
        return self.message


def is_disk_full(e: BaseException) -> bool:
    """Whether ``e`` (or an error it was raised from) means the disk or a file-size limit is full."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in DISK_FULL_ERRNOS:
            return True
        text = str(e).lower()
        # h5py turns a failed write(2) into an OSError/RuntimeError whose errno is lost but whose
        # message keeps the C library's words.
        if "no space left on device" in text or "file too large" in text or "disk quota exceeded" in text:
            return True
        e = e.__cause__ or e.__context__
    return False


def temp_sibling(path: PathLike, tag: str = "tmp") -> Path:
    """A fresh name in ``path``'s folder (same filesystem, so a rename is atomic), unique per call."""
    path = Path(path)
    return path.with_name(f".{path.name}.{tag}-{os.getpid()}-{secrets.token_hex(4)}")


def fsync_file(path: PathLike) -> None:
    """Flush a file's data and metadata to the device."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: PathLike) -> None:
    """Make a rename or unlink inside folder ``path`` durable (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on a directory; the rename itself already happened
    finally:
        os.close(fd)


def durable_replace(src: PathLike, dst: PathLike) -> None:
    """``os.replace(src, dst)`` after syncing ``src``, then sync the folder: survives power loss."""
    fsync_file(src)
    os.replace(src, dst)
    fsync_dir(Path(dst).parent)


def atomic_write_bytes(path: PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` so a reader sees the old content or the new, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def atomic_write_text(path: PathLike, text: str, encoding: str = "utf-8") -> Path:
    """:func:`atomic_write_bytes` of ``text``."""
    return atomic_write_bytes(path, text.encode(encoding))


# -- folders ---------------------------------------------------------------------------------
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _renameat2_exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP if hasattr(errno, "ENOTSUP") else errno.EINVAL):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _sync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            fsync_file(os.path.join(dirpath, name))
        fsync_dir(dirpath)


def replace_dir(staged: PathLike, final: PathLike) -> Path:
    """Put the folder ``staged`` at ``final``, replacing any folder there, as one step.

    Where the kernel can exchange two paths atomically the swap is one operation; elsewhere
    the old folder is first renamed aside, so a crash in between leaves it (under a hidden
    sibling name) rather than nothing. The old folder is removed afterwards.
    """
    staged, final = Path(staged), Path(final)
    _sync_tree(staged)
    if not final.exists():
        os.rename(staged, final)
        fsync_dir(final.parent)
        return final
    if not final.is_dir():
        raise NotADirectoryError(f"{final} exists and is not a folder; not replacing it")
    if _renameat2_exchange(staged, final):
        old = staged  # after the exchange the staged name holds the old folder
    else:
        old = temp_sibling(final, "old")
        os.rename(final, old)
        os.rename(staged, final)
    fsync_dir(final.parent)
    shutil.rmtree(old, ignore_errors=True)
    return final


@contextlib.contextmanager
def staged_dir(final: PathLike, copy_existing: bool = False) -> Iterator[Path]:
    """Build a folder beside ``final`` and swap it in when the block ends without an error.

    ``copy_existing`` starts the staging folder as a copy of what ``final`` holds (to update a
    few files of a folder and keep the rest). On an error or interrupt the staging folder is
    removed and ``final`` is left exactly as it was.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = temp_sibling(final, "staging")
    try:
        if copy_existing and final.is_dir():
            shutil.copytree(final, staging, symlinks=True)
        else:
            staging.mkdir()
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    replace_dir(staging, final)


# -- locks -----------------------------------------------------------------------------------
def lock_path(target: PathLike) -> Path:
    """The lock file of an output: ``<target>.lock`` beside it."""
    target = Path(target)
    return target.with_name(target.name + ".lock")


_held = threading.local()


@contextlib.contextmanager
def exclusive_lock(target: PathLike, what: str = "", reentrant: bool = False) -> Iterator[Path]:
    """Hold the write lock of ``target`` for the block; raise :class:`LockedError` at once if
    another process holds it, naming that process.

    The lock is an ``flock`` on ``<target>.lock``: the kernel drops it when the holder exits,
    even by SIGKILL, so a stale lock file never blocks a rerun. With ``reentrant`` a thread
    that already holds it (by a ``reentrant`` call) takes it again (an encode that adds prompt
    sets to its own store); anyone else, and any non-reentrant second taking, is refused.
    """
    path = lock_path(target)
    key = os.path.abspath(path)
    depth = getattr(_held, "paths", None)
    if depth is None:
        depth = _held.paths = {}
    if reentrant and depth.get(key):
        depth[key] += 1
        try:
            yield path
        finally:
            depth[key] -= 1
        return
    with _flock(path, target, what):
        if reentrant:
            depth[key] = 1
        try:
            yield path
        finally:
            if reentrant:
                depth.pop(key, None)


def _holder_gone(note: str) -> bool:
    m = re.match(r"pid (\d+)", note)
    if not m:
        return False
    try:
        os.kill(int(m.group(1)), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


@contextlib.contextmanager
def _flock(path: Path, target: PathLike, what: str) -> Iterator[None]:
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    waited = 0.0
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                holder = os.read(fd, 512).decode(errors="replace").strip() or "unknown process"
            finally:
                os.close(fd)
            if _holder_gone(holder) and waited < 5.0:
                # A killed holder's worker child (run_isolated) shares the lock until the
                # kernel, told of the holder's death, ends it too: a moment.
                time.sleep(0.05)
                waited += 0.05
                continue
            raise LockedError(f"{target} is being written by another process ({holder}); wait for it "
                              f"to finish or stop it (lock: {path})") from None
        # The holder before us may have unlinked the file after we opened it: then our lock is
        # on a name nobody else sees. Retry until the lock we hold is the one at the path.
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        argv = " ".join(os.path.basename(a) if i == 0 else a for i, a in enumerate(sys.argv[:6]))
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"pid {os.getpid()}{': ' + what if what else ''}{' (' + argv + ')' if argv else ''}".encode())
        except OSError as e:
            # On a full disk the note cannot be written; the flock holds without it, and the
            # writer behind it reports the full disk itself.
            logger.debug("could not write the holder note of %s: %s", path, e)
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        os.close(fd)


# -- crash isolation -------------------------------------------------------------------------
_BUILTIN_ERRORS = {t.__name__: t for t in (ValueError, KeyError, TypeError, FileNotFoundError, FileExistsError,
                                           NotADirectoryError, IsADirectoryError, PermissionError, OSError,
                                           RuntimeError, KeyboardInterrupt)}


def die_with_parent() -> None:
    """Linux: this process gets SIGKILL when its parent dies (a no-op elsewhere)."""
    # Linux: the child gets SIGKILL when the parent dies, so a killed writer never leaves an
    # orphan finishing (and holding the parent's lock) behind its back.
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def run_isolated(fn: Callable[..., Any], *args: Any, what: str = "a write",
                 errors: Mapping[str, type] | None = None) -> None:
    """Run ``fn(*args)`` in a forked child process and wait for it.

    Some libraries cannot survive their own failed writes: after ENOSPC, HDF5 leaves its caches
    in a state that segfaults when the file is closed or the process exits. Running the write in
    a child keeps the caller alive and its other files untouched whatever happens there. The
    child's exception comes back as the same type when it is a builtin or named in ``errors``
    (by class name), as :class:`DiskFullError` when it means the disk is full, and as
    RuntimeError otherwise. The child dies with the caller (Linux) and leaves through
    ``os._exit``, never through the caller's cleanup. Where ``fork`` is unavailable ``fn`` runs
    in this process.
    """
    if not hasattr(os, "fork"):
        fn(*args)
        return
    parent = os.getpid()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns
        code = 0
        try:
            os.close(r)
            die_with_parent()
            if os.getppid() != parent:
                os._exit(1)
            fn(*args)
            report = {"ok": True}
        except BaseException as e:  # everything goes back to the parent, which decides
            code = 1
            report = {"ok": False, "type": type(e).__name__, "message": str(e), "disk_full": is_disk_full(e),
                      "errno": getattr(e, "errno", None), "traceback": traceback.format_exc(limit=8)}
        try:
            data = json.dumps(report).encode()
            while data:
                data = data[os.write(w, data):]
        finally:
            os._exit(code)
    os.close(w)
    chunks = []
    try:
        while True:
            b = os.read(r, 65536)
            if not b:
                break
            chunks.append(b)
        _, status = os.waitpid(pid, 0)
    except BaseException:  # interrupted: the child must not outlive this call
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(OSError):
            os.waitpid(pid, 0)
        raise
    finally:
        os.close(r)
    try:
        report = json.loads(b"".join(chunks).decode()) if chunks else None
    except ValueError:
        report = None
    if report is None:
        how = f"signal {-os.waitstatus_to_exitcode(status)}" if os.WIFSIGNALED(status) else f"exit {os.waitstatus_to_exitcode(status)}"
        raise RuntimeError(f"{what} crashed in its worker process ({how}); check free space and rerun")
    if report["ok"]:
        return
    if report["disk_full"]:
        raise DiskFullError(report["message"], report.get("errno") or errno.ENOSPC)
    kind = dict(_BUILTIN_ERRORS, **(errors or {})).get(report["type"])
    if kind is KeyboardInterrupt:
        raise KeyboardInterrupt
    if kind is not None:
        raise kind(report["message"])
    raise RuntimeError(f"{what} failed: {report['type']}: {report['message']}\n{report['traceback']}")


def remove_stale_siblings(path: PathLike) -> None:
    """Remove temporary files that killed writers of ``path`` left beside it (call holding its
    lock): siblings named by :func:`temp_sibling` whose process is gone."""
    path = Path(path)
    pattern = re.compile(rf"\.{re.escape(path.name)}(\.partial)?\.(build|new)-(\d+)-[0-9a-f]+")
    for p in path.parent.glob(f".{path.name}.*"):
        m = pattern.fullmatch(p.name)
        if not m or not p.is_file():
            continue
        pid = int(m.group(3))
        try:
            if pid != os.getpid():
                os.kill(pid, 0)
                continue  # its writer is alive (and not ours to judge)
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        logger.debug("removing %s, left by a killed writer", p)
        p.unlink(missing_ok=True)
