"""The encode's commits in a thread of their own, so the next forward never waits for the disk.

:class:`CommitThread` takes the blocks the engine hands back, in order, and commits each one to
the journal (rows, skips, cursor, sync) in a writer thread while the caller fetches the next
block (decoding and the forward pass). At most ``depth`` blocks wait, so memory stays flat and
the caller stops when the disk is the slower side.

What the journal holds is what is committed: a block waiting in the queue, or one being written
when the process is killed, is not, and the rerun embeds it again from the cursor (the journal's
records are whole or ignored). An error in the writer thread - a full disk, a bug - stops the run
at the caller's next step, with that error; Ctrl-C in the caller lets the block being written
finish (a commit is never torn by us), drops the queued ones, and re-raises.
"""
from __future__ import annotations

import queue
import threading
import time
from typing import Any, Callable

__all__ = ["CommitThread"]

_STOP = object()


class CommitThread:
    """``commit(item)`` runs in one writer thread, items in the order :meth:`put` gave them.

    Use as a context manager: leaving the block normally waits for every item to be committed
    (and raises the writer's error, if any); leaving it by an exception drops what is queued,
    waits for the commit in progress, and lets the exception go on.

    ``stats`` gains ``commit_s`` (time the writer spent committing) and ``commit_wait_s`` (time
    :meth:`put` waited for room: the disk holding the forward up).
    """

    def __init__(self, commit: Callable[[Any], None], depth: int = 2, stats: dict | None = None) -> None:
        if depth < 1:
            raise ValueError(f"depth must be >= 1; got {depth}")
        self._commit, self._queue = commit, queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._abandon = threading.Event()
        self.stats = stats if stats is not None else {}
        self.stats.setdefault("commit_s", 0.0)
        self.stats.setdefault("commit_wait_s", 0.0)
        self._thread = threading.Thread(target=self._run, name="clip-heads-commit", daemon=True)

    def __enter__(self) -> "CommitThread":
        self._thread.start()
        return self

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP or self._abandon.is_set():
                return
            t = time.perf_counter()
            try:
                self._commit(item)
            except BaseException as e:  # handed to the caller, which raises it as it is
                self._error = e
                self._abandon.set()
                return
            finally:
                self.stats["commit_s"] += time.perf_counter() - t

    def _raise_error(self) -> None:
        if self._error is not None:
            err, self._error = self._error, None
            raise err

    def put(self, item: Any) -> None:
        """Queue ``item`` for its commit; waits while ``depth`` items wait. Raises the writer's
        error as soon as there is one."""
        t = time.perf_counter()
        while True:
            self._raise_error()
            if not self._thread.is_alive():
                raise RuntimeError("the commit thread has stopped")
            try:
                self._queue.put(item, timeout=0.2)
                break
            except queue.Full:
                continue
        self.stats["commit_wait_s"] += time.perf_counter() - t

    def __exit__(self, kind, exc, tb) -> None:
        if kind is None:
            self._send_stop()
            self._thread.join()
            self._raise_error()
            return
        # Leaving by an exception (Ctrl-C, an engine's error): the queued blocks are dropped - they
        # are not committed, and the rerun embeds them again - and the commit under way ends whole.
        self._abandon.set()
        self._drain()
        self._send_stop()
        self._thread.join()
        self._error = None  # the exception already leaving wins

    def _drain(self) -> None:
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                return

    def _send_stop(self) -> None:
        while self._thread.is_alive():
            try:
                self._queue.put(_STOP, timeout=0.2)
                return
            except queue.Full:
                if self._abandon.is_set():
                    self._drain()
