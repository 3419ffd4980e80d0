"""The :class:`Source` base class: the contract every dataset format implements.

A source is a map-style, picklable listing (keys, labels, classes and optional per-item
extras) plus :meth:`Source.load`, which decodes one image to RGB with
:func:`clip_heads.images.open_rgb`. The formats themselves are in :mod:`clip_heads.datasets`
(folder-like ones, and the registry) and :mod:`clip_heads.cifar`.

File-backed sources are confined to their root: :meth:`Source.load` refuses (as a
:class:`~clip_heads.images.BadImage`) a file whose real path, symlinks resolved, lies outside
the folder the source was opened on, unless it was opened with ``allow_outside_root=True``.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from typing import Any, Iterator

import numpy as np
from PIL import Image

from .images import DEFAULT_LIMITS, BadImage, ImageLimits, open_rgb

logger = logging.getLogger(__name__)


def is_inside(real: str, folder: str) -> bool:
    """Whether the resolved path ``real`` is ``folder`` or below it (both already resolved)."""
    return real == folder or real.startswith(folder.rstrip(os.sep) + os.sep)


def outside_root(path: str, folder: str) -> str | None:
    """``path``'s real path if it resolves outside the resolved ``folder``, else ``None``."""
    real = os.path.realpath(path)
    return None if is_inside(real, folder) else real


class Source:
    """A map-style dataset: ``source[i] -> (key, image, label)``.

    Attributes
    ----------
    format : str
        Registry name, e.g. ``"folder"``.
    kind : str or None
        What the format's labels are, declared by the format: ``"emotions"`` (emotions or
        sentiment, e.g. FI, Emotion6), or None where the class names decide (plain folders, CSV
        manifests, Hugging Face datasets; :func:`clip_heads.kinds.is_emotion_data`).
    root : str
        Absolute path that was opened (folder, manifest file or tarball).
    classes : list of str
        Class names; index = label.
    keys : list of str
        Stable key per item (relative path with ``/``, or the dataset's own id).
    labels : np.ndarray
        int64, shape (n_items,).
    extras : dict of str to np.ndarray
        Optional per-item columns, each of shape (n_items, ...).
    extras_meta : dict of str to list of str
        Column names of 2-D extras.
    limits : ImageLimits
        File size, pixel and aspect limits of :meth:`load` (``open_source(limits=...)``).
    allow_outside_root : bool
        Whether files may resolve (through ``..`` or symlinks) outside the root folder.
    """

    format: str = ""
    kind: str | None = None
    limits: ImageLimits = DEFAULT_LIMITS
    allow_outside_root: bool = False
    _confine: str | None = None  # resolved folder every loaded file must lie in; None: anywhere

    def _set_root_policy(self, folder: str, allow_outside_root: bool) -> None:
        """Confine the files of this source to ``folder`` unless ``allow_outside_root``."""
        self.allow_outside_root = bool(allow_outside_root)
        self._confine = None if self.allow_outside_root else os.path.realpath(folder)

    def _finish(self, root: str, base: str, classes: list[str], keys: list[str], labels: Any,
                extras: dict[str, np.ndarray] | None = None,
                extras_meta: dict[str, list[str]] | None = None,
                options: dict[str, Any] | None = None) -> None:
        if not keys:
            raise ValueError(f"{self.format} source '{root}' contains no images")
        self.root, self._base = root, base
        self.classes, self.keys = list(classes), list(keys)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.extras = extras or {}
        self.extras_meta = extras_meta or {}
        self.options = dict(options or {})
        if self.allow_outside_root:  # only when set, so default runs keep their fingerprints
            self.options["allow_outside_root"] = True
        logger.info("%s source %s: %d images in %d classes", self.format, root, len(self.keys), len(self.classes))

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, i: int) -> tuple[str, Image.Image, int]:
        return self.keys[i], self.load(i), int(self.labels[i])

    def __iter__(self) -> Iterator[tuple[str, Image.Image, int]]:
        return (self[i] for i in range(len(self)))

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.root!r}: {len(self)} items, {len(self.classes)} classes>"

    def path(self, i: int) -> str:
        """Absolute file path of item ``i``."""
        return os.path.normpath(os.path.join(self._base, self.keys[i]))

    def load(self, i: int) -> Image.Image:
        """Decode item ``i`` as RGB; raises :class:`BadImage` for unreadable data, or for a
        file that resolves outside the source root (see ``allow_outside_root``)."""
        path = self.path(i)
        if self._confine is not None:
            real = os.path.realpath(path)
            if not is_inside(real, self._confine):
                raise BadImage(f"outside the source root (resolves to {real})")
            path = real  # open what was checked, not a path a symlink swap could redirect
        return open_rgb(path, self.limits)

    def _stamp(self, h: Any) -> None:
        # stat only, never decode: this must stay cheap on 100k files.
        for i, (key, label) in enumerate(zip(self.keys, self.labels.tolist(), strict=True)):
            try:
                st = os.stat(self.path(i))
                stamp = f"{st.st_size}:{st.st_mtime_ns}"
            except OSError:
                stamp = "missing"
            h.update(f"{key}\t{label}\t{stamp}\n".encode())

    def fingerprint(self) -> str:
        """SHA-256 hex of the listing: keys, labels, classes, extras and file size/mtime."""
        h = hashlib.sha256()
        head = {"format": self.format, "classes": self.classes, "options": self.options}
        h.update(json.dumps(head, sort_keys=True).encode())
        self._stamp(h)
        for name in sorted(self.extras):
            h.update(name.encode() + np.ascontiguousarray(self.extras[name]).tobytes())
        return h.hexdigest()

    def describe(self) -> dict:
        """JSON-able summary: format, root, n, classes, options, extras."""
        return {"format": self.format, "root": self.root, "n": len(self), "classes": list(self.classes),
                "options": dict(self.options), "extras": sorted(self.extras)}
