"""Building blocks of file-backed sources: listing a dataset's files inside a confined root.

Every folder- or list-backed format (:mod:`clip_heads.datasets`, :mod:`clip_heads.emoset`,
:mod:`clip_heads.art_datasets`, :mod:`clip_heads.twitter`, :mod:`clip_heads.emotionroi`,
:mod:`clip_heads.hf_source`) lists its files with these, so that they all walk folders the same
way (iteratively, to at most :data:`MAX_FOLDER_DEPTH` levels, never into a symlinked subfolder),
refuse a class folder or a listed file that resolves outside the source root in one line, and
read their small text files (manifests, split lists, JSON annotations) bounded and regular-only.
"""
from __future__ import annotations

import io
import json
import logging
import os
import stat
from typing import Any

from .images import DEFAULT_LIMITS, RefusedFile, file_kind, read_regular
from .source import outside_root

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
MAX_FOLDER_DEPTH = 128  # levels of subfolders below a class folder; deeper is refused, not walked
ALLOW_HINT = "open it with allow_outside_root=True (--allow-outside-root) to read it anyway"


def subdirs(folder: str) -> list[str]:
    """Sorted names of the non-hidden subfolders of ``folder``."""
    try:
        with os.scandir(folder) as it:
            return sorted(e.name for e in it if not e.name.startswith(".") and e.is_dir())
    except OSError as e:
        raise ValueError(f"cannot list folder '{folder}': {e.strerror or e}") from e


def short(rel: str, n: int = 80) -> str:
    """``rel`` cut to ``n`` characters for an error message."""
    return rel if len(rel) <= n else rel[:n] + "..."


def files_under(root: str, rel: str, confine: str | None = None,
                extensions: tuple[str, ...] = IMAGE_EXTENSIONS) -> tuple[list[str], list[tuple[str, str]]]:
    """Sorted keys ('/'-separated, relative to root) of the files with one of ``extensions``
    anywhere under root/rel, and the (key, target) of those that are symlinks resolving
    outside ``confine``.

    An explicit stack, not recursion: depth costs no Python frames, and is capped at
    :data:`MAX_FOLDER_DEPTH` with a one-line error. Symlinked subfolders are not entered (so
    no loop, and nothing outside the root through them); symlinked files are listed.
    """
    out, outside = [], []
    stack = [(rel, 0)]
    while stack:
        d, depth = stack.pop()
        try:
            with os.scandir(os.path.join(root, d)) as it:
                entries = sorted((e.name, e.is_dir(), e.is_symlink()) for e in it if not e.name.startswith("."))
        except OSError as e:
            raise ValueError(f"cannot list folder '{os.path.join(root, short(d))}': {e.strerror or e}") from e
        for name, is_dir, is_link in entries:
            key = f"{d}/{name}" if d else name
            if is_dir:
                if is_link:
                    continue
                if depth >= MAX_FOLDER_DEPTH:
                    raise ValueError(f"folder '{os.path.join(root, rel)}' nests subfolders deeper than "
                                     f"{MAX_FOLDER_DEPTH} levels (at '{short(key)}')")
                stack.append((key, depth + 1))
            elif name.lower().endswith(extensions):
                out.append(key)
                if is_link and confine is not None:
                    target = outside_root(os.path.join(root, key), confine)
                    if target is not None:
                        outside.append((key, target))
    return sorted(out), outside


def warn_outside(outside: list[tuple[str, str]], root: str) -> None:
    """Log, once per source, the walked files that are symlinks out of the root (skipped at load)."""
    if outside:
        key, target = outside[0]
        logger.warning("%d file(s) in '%s' are symlinks resolving outside the source root (e.g. '%s' -> '%s'): "
                       "they will be skipped; open the source with allow_outside_root=True (--allow-outside-root) "
                       "to read them", len(outside), root, key, target)


def require_dir(path: str, fmt: str) -> None:
    if not os.path.isdir(path):
        raise ValueError(f"{fmt} source must be a folder, got file '{path}'")


def check_inside(path: str, confine: str | None, what: str, root: str) -> None:
    """An error naming ``what`` when ``path`` resolves outside the resolved root ``confine``."""
    if confine is not None:
        target = outside_root(path, confine)
        if target is not None:
            raise ValueError(f"{what} resolves outside the source root '{root}' (to '{target}'); {ALLOW_HINT}")


def check_listed_file(full: str, key: str, base: str, where: str, confine: str | None,
                      root_name: str = "the source root") -> None:
    """An explicit entry (a manifest row, a split-list line) naming something unreadable is an
    error when the source is opened, not a skip later: it must resolve inside ``confine`` (the
    resolved root, unless ``None``; ``root_name`` says what it is) and name a regular file."""
    if confine is not None:
        target = outside_root(full, confine)
        if target is not None:
            rule = "is an absolute path" if os.path.isabs(key) else "resolves"
            raise ValueError(f"{where}: '{key}' {rule} outside {root_name} '{base}' "
                             f"(to '{target}'); paths must stay inside it, or {ALLOW_HINT}")
    try:
        mode = os.stat(full).st_mode
    except FileNotFoundError:
        raise ValueError(f"{where}: file '{key}' not found relative to '{base}'") from None
    except OSError as e:
        raise ValueError(f"{where}: cannot stat '{key}' relative to '{base}': {e.strerror or e}") from e
    if not stat.S_ISREG(mode):
        raise ValueError(f"{where}: '{key}' is not a regular file ({file_kind(mode)})")


def collect(root: str, class_dirs: dict[str, list[str]], classes: list[str],
            confine: str | None = None) -> tuple[list[str], list[int]]:
    """Flatten {class: [folders]} into sorted keys and labels; an imageless folder is an error,
    and so is a class folder resolving outside ``confine`` (the resolved source root)."""
    keys: list[str] = []
    labels: list[int] = []
    outside: list[tuple[str, str]] = []
    for label, name in enumerate(classes):
        found: list[str] = []
        for rel in class_dirs.get(name, []):
            check_inside(os.path.join(root, rel), confine, f"class folder '{rel}' in '{root}'", root)
            imgs, out = files_under(root, rel, confine)
            if not imgs:
                raise ValueError(f"class folder '{rel}' in '{root}' has no images "
                                 f"(accepted extensions: {', '.join(IMAGE_EXTENSIONS)})")
            found += imgs
            outside += out
        keys += sorted(found)
        labels += [label] * len(found)
    warn_outside(outside, root)
    return keys, labels


def match_names(root: str, dirs: list[str], valid: list[str], fmt: str,
                aliases: dict[str, str] | None = None) -> dict[str, str]:
    """Map folder names to canonical class names (case-insensitive); refuse extra or missing ones."""
    aliases = aliases or {}
    mapping, seen, extra = {}, {}, []
    for d in dirs:
        name = aliases.get(d.lower(), d.lower())
        if name not in valid:
            extra.append(d)
        elif name in seen:
            raise ValueError(f"{fmt}: folders '{seen[name]}' and '{d}' in '{root}' are both class '{name}'")
        else:
            mapping[d], seen[name] = name, d
    if extra:
        raise ValueError(f"{fmt}: unexpected class folder(s) {extra} in '{root}'; valid: {', '.join(valid)}")
    missing = [c for c in valid if c not in seen]
    if missing:
        raise ValueError(f"{fmt}: missing class folder(s) {missing} in '{root}'")
    return mapping


def open_text(path: str, what: str, newline: str | None = None) -> io.TextIOWrapper:
    """A small text file read whole (bounded, regular files only) as UTF-8 (BOM tolerated)."""
    try:
        data = read_regular(path, DEFAULT_LIMITS.max_file_bytes)
    except RefusedFile as e:
        raise ValueError(f"cannot read {what} '{path}': {e}") from e
    return io.TextIOWrapper(io.BytesIO(data), encoding="utf-8-sig", newline=newline)


def read_lines(path: str, what: str) -> list[tuple[int, str]]:
    """``(line number, stripped line)`` of the non-empty lines of a small UTF-8 text file."""
    try:
        return [(n, line.strip()) for n, line in enumerate(open_text(path, what), 1) if line.strip()]
    except UnicodeDecodeError as e:
        raise ValueError(f"{what} '{path}' is not UTF-8 text ({e.reason} at byte {e.start})") from e


def read_json(path: str, what: str, max_bytes: int = DEFAULT_LIMITS.max_file_bytes) -> Any:
    """A small JSON file (bounded, regular files only); every way it can be unreadable is one line."""
    try:
        data = read_regular(path, max_bytes)
    except RefusedFile as e:
        raise ValueError(f"cannot read {what} '{path}': {e}") from e
    try:
        return json.loads(data.decode("utf-8-sig"))
    except UnicodeDecodeError as e:
        raise ValueError(f"{what} '{path}' is not UTF-8 text ({e.reason} at byte {e.start})") from e
    except (json.JSONDecodeError, RecursionError) as e:
        raise ValueError(f"{what} '{path}' is not valid JSON ({e})") from e
