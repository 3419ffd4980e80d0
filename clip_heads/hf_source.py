"""Hugging Face ``datasets`` on disk: a ``save_to_disk`` folder or a folder of parquet files.

Read with pyarrow alone (the optional extra ``clip-heads[hf]``), never the ``datasets``
library, and never whole: Arrow files are memory-mapped and a row's image is sliced out of its
record batch; parquet files are read one row group of the image column at a time (the last one
is kept, so a batch of consecutive rows costs one read). ``import clip_heads`` does not import
pyarrow.

Layouts accepted (anything else is refused in one line naming them):

* ``Dataset.save_to_disk``: ``state.json`` (its ``_data_files`` name the Arrow shards, Arrow IPC
  stream or file format), ``dataset_info.json`` (the features) and the shards.
* ``DatasetDict.save_to_disk``: ``dataset_dict.json`` (``{"splits": [...]}``) and one such folder
  per split.
* A folder of ``*.parquet`` files, searched below it (as the Hub's ``data/train-00000-of-00001.parquet``).
  Features come from the files' ``huggingface`` schema metadata when present. A file's split is
  the Hub's split keyword that appears as a word in its path (``train``/``training``;
  ``validation``/``valid``/``val``/``dev``; ``test``/``testing``/``eval``/``evaluation``); when
  no file has one, there is no split.

The image column holds the ``Image`` feature (a struct of ``bytes`` and ``path``) or raw bytes.
Bytes are decoded like a file, through :func:`clip_heads.images.open_rgb` and the source's
:class:`~clip_heads.images.ImageLimits`; a row with only a ``path`` opens that file (relative
paths from the dataset folder), which must resolve inside the dataset folder unless
``allow_outside_root``. The label column is a ``ClassLabel`` (its names are the classes, in their
own order), a string column (classes sorted) or an integer one (classes: the sorted values as text).
"""
from __future__ import annotations

import bisect
import io
import json
import logging
import os
import re
from typing import Any

import numpy as np
from PIL import Image

from .folders import check_inside, check_listed_file, files_under, read_json, require_dir
from .images import BadImage, open_rgb
from .source import Source, is_inside

logger = logging.getLogger(__name__)

# The Hub's split keywords (datasets' data_files conventions), and the names this project stores.
SPLIT_KEYWORDS = {"train": ("train", "training"), "val": ("validation", "valid", "val", "dev"),
                  "test": ("test", "testing", "eval", "evaluation")}
MAX_ROW_GROUP_BYTES = 2**30  # one row group of the image column is held in memory while it is read
_ARROW_FILE_MAGIC = b"ARROW1"
_INSTALL_HINT = "pip install 'clip-heads[hf]' (or: pip install pyarrow)"


def _pyarrow():
    try:
        import pyarrow as pa
        import pyarrow.ipc  # noqa: F401
        import pyarrow.parquet  # noqa: F401
    except ImportError as e:
        raise ValueError(f"the hf format reads Arrow and parquet files with pyarrow, which is not installed: "
                         f"{_INSTALL_HINT}") from e
    return pa


def canonical_split(name: str) -> str:
    """``"validation"`` -> ``"val"``, ``"training"`` -> ``"train"``...; other names unchanged (lower case)."""
    low = str(name).strip().lower()
    return next((canon for canon, words in SPLIT_KEYWORDS.items() if low in words), low)


def is_hf_dataset(path: str) -> bool:
    """Whether ``path`` looks like a ``save_to_disk`` folder or holds parquet files (top level or ``data/``)."""
    if os.path.isfile(os.path.join(path, "dataset_dict.json")):
        return True
    if os.path.isfile(os.path.join(path, "state.json")) and os.path.isfile(os.path.join(path, "dataset_info.json")):
        return True
    for d in (path, os.path.join(path, "data")):
        try:
            with os.scandir(d) as it:
                if any(e.name.lower().endswith(".parquet") and e.is_file() for e in it):
                    return True
        except OSError:
            continue
    return False


def _parquet_split(rel: str) -> str | None:
    words = set(re.split(r"[^a-z]+", os.path.splitext(rel)[0].lower()))
    found = {canon for canon, kws in SPLIT_KEYWORDS.items() if words & set(kws)}
    if len(found) > 1:
        raise ValueError(f"hf: parquet file '{rel}' names more than one split ({', '.join(sorted(found))})")
    return found.pop() if found else None


class _Shard:
    """One data file: where it is, its kind, its rows and (parquet) its row groups' first rows."""

    def __init__(self, rel: str, kind: str, split: str | None) -> None:
        self.rel, self.kind, self.split = rel, kind, split
        self.n = 0
        self.starts: list[int] = []  # first row of each record batch / row group


def _is_image_type(pa, t) -> bool:
    if pa.types.is_binary(t) or pa.types.is_large_binary(t):
        return True
    if pa.types.is_struct(t):
        names = {t.field(k).name: t.field(k).type for k in range(t.num_fields)}
        b = names.get("bytes")
        return b is not None and (pa.types.is_binary(b) or pa.types.is_large_binary(b))
    return False


class HFSource(Source):
    """A Hugging Face dataset saved to disk (Arrow) or as parquet files: one image, one label column.

    Parameters
    ----------
    path : str
        The dataset folder.
    image_column : str, optional
        Default: the one column of the ``Image`` feature (or, without features, the one column
        of image structs or bytes).
    label_column : str, optional
        Default: the one ``ClassLabel`` column, else a column named ``label``, else the one
        column besides the image column.
    split : str, optional
        One split of a ``DatasetDict`` (or of split-named parquet files); default: all of them, in
        the order ``dataset_dict.json`` lists them (parquet: train, val, test).

    Items keep the dataset's row order; keys are ``"<split>/<row>"`` (row within the split) or
    ``"<row>"`` when the dataset has no splits. Extra ``split`` (names as :func:`canonical_split`
    writes them: train, val, test) when there are several. The fingerprint covers keys, labels,
    and each data file's size and modification time.
    """

    format = "hf"

    def __init__(self, path: str, image_column: str | None = None, label_column: str | None = None,
                 split: str | None = None, allow_outside_root: bool = False) -> None:
        pa = _pyarrow()
        path = self._root_folder(path)
        self._set_root_policy(path, allow_outside_root)
        shards, features, layout = self._layout(path, split)
        schema = None
        for sh in shards:
            try:
                s, feats = self._scan(pa, path, sh)
            except (pa.ArrowException, OSError) as e:
                raise ValueError(f"hf: cannot read '{os.path.join(path, sh.rel)}': {e}") from e
            if schema is None:
                schema, features = s, features if features is not None else feats
            elif not s.remove_metadata().equals(schema.remove_metadata()):
                raise ValueError(f"hf: '{os.path.join(path, sh.rel)}' has other columns than "
                                 f"'{os.path.join(path, shards[0].rel)}': {s.remove_metadata()} vs "
                                 f"{schema.remove_metadata()}")
        if not sum(sh.n for sh in shards):
            raise ValueError(f"hf source '{path}' contains no rows")
        features = features or {}
        self.image_column = self._pick_image(pa, schema, features, image_column, path)
        self.label_column = self._pick_label(schema, features, label_column, path)
        if any(sh.kind == "parquet" for sh in shards):
            self._check_row_groups(pa, path, [sh for sh in shards if sh.kind == "parquet"])
        if self.label_column is None:  # unlabelled rows (a parquet source to score with a head)
            classes, y = [], np.full(sum(sh.n for sh in shards), -1, np.int64)
        else:
            values = self._column(pa, path, shards, self.label_column, schema, "label")
            classes, y = self._labels(pa, values, features)
        self._shards = shards
        self._ends = [int(v) for v in np.cumsum([sh.n for sh in shards])]
        keys, extras = self._keys(pa, path, shards, schema)
        self._open: dict[int, Any] = {}
        self._finish(path, path, classes, keys, y, extras, options=self._options(layout, split))

    # -- what a subclass changes ----------------------------------------------------------------
    def _root_folder(self, path: str) -> str:
        require_dir(path, self.format)
        return path

    def _options(self, layout: str, split: str | None) -> dict:
        return {"layout": layout, "image_column": self.image_column, "label_column": self.label_column, "split": split}

    def _column(self, pa, path: str, shards: list[_Shard], name: str, schema, what: str):
        try:
            return pa.chunked_array([c for sh in shards for c in self._read_column(pa, path, sh, name)],
                                    type=schema.field(name).type)
        except (pa.ArrowException, OSError) as e:
            raise ValueError(f"{self.format}: cannot read the {what} column {name!r} in '{path}': {e}") from e

    def _keys(self, pa, path: str, shards: list[_Shard], schema) -> tuple[list[str], dict]:
        multi = len({sh.split for sh in shards}) > 1
        keys, done = [], {}
        for sh in shards:  # rows are numbered within their split, across its shards
            first = done.get(sh.split, 0)
            keys += [f"{sh.split}/{r}" if sh.split is not None else str(r) for r in range(first, first + sh.n)]
            done[sh.split] = first + sh.n
        extras = {"split": np.asarray([sh.split for sh in shards for _ in range(sh.n)], dtype=str)} if multi else {}
        return keys, extras

    # -- layout ---------------------------------------------------------------------------------
    def _layout(self, path: str, split: str | None) -> tuple[list[_Shard], dict | None, str]:
        if os.path.isfile(os.path.join(path, "dataset_dict.json")):
            check_inside(os.path.join(path, "dataset_dict.json"), self._confine, "'dataset_dict.json'", path)
            info = read_json(os.path.join(path, "dataset_dict.json"), "hf dataset_dict.json")
            names = info.get("splits") if isinstance(info, dict) else None
            if not isinstance(names, list) or not names or not all(isinstance(n, str) and n and "/" not in n
                                                                   for n in names):
                raise ValueError(f"hf: '{os.path.join(path, 'dataset_dict.json')}' should be "
                                 '{"splits": ["train", ...]}')
            if split is not None:
                pick = [n for n in names if n == split or canonical_split(n) == canonical_split(split)]
                if not pick:
                    raise ValueError(f"hf: split {split!r} is not in '{path}'; it has {', '.join(names)}")
                names = pick[:1]
            shards, features = [], None
            for name in names:
                sub = os.path.join(path, name)
                check_inside(sub, self._confine, f"split folder '{name}'", path)
                found, feats = self._saved(path, name, canonical_split(name))
                shards += found
                features = features or feats
            return shards, features, "save_to_disk"
        if os.path.isfile(os.path.join(path, "state.json")):
            if split is not None:
                raise ValueError(f"hf: '{path}' is a single saved Dataset, not a DatasetDict: it has no split "
                                 f"{split!r} to choose")
            shards, features = self._saved(path, "", None)
            return shards, features, "save_to_disk"
        files, outside = files_under(path, "", self._confine, (".parquet",))
        if outside:
            key, target = outside[0]
            raise ValueError(f"hf: parquet file '{key}' resolves outside the source root '{path}' (to '{target}'); "
                             "open it with allow_outside_root=True (--allow-outside-root) to read it anyway")
        for f in files:  # a FIFO named x.parquet would block the reader; a device would never end
            check_listed_file(os.path.join(path, f), f, path, f"hf parquet file '{f}'", self._confine)
        if not files:
            raise ValueError(f"hf source '{path}' is not a Hugging Face dataset on disk: expected dataset_dict.json, "
                             "or state.json + dataset_info.json + *.arrow (save_to_disk), or *.parquet files")
        splits = [_parquet_split(f) for f in files]
        if any(s is None for s in splits) and any(s is not None for s in splits):
            a = next(f for f, s in zip(files, splits, strict=True) if s is None)
            b = next(f for f, s in zip(files, splits, strict=True) if s is not None)
            raise ValueError(f"hf: parquet file '{a}' names no split but '{b}' does: name every file's split "
                             f"(train, validation, test) or none")
        order = {s: i for i, s in enumerate(SPLIT_KEYWORDS)}
        shards = sorted((_Shard(f, "parquet", s) for f, s in zip(files, splits, strict=True)),
                        key=lambda sh: (order.get(sh.split, len(order)), sh.split or "", sh.rel))
        if split is not None:
            want = canonical_split(split)
            shards = [sh for sh in shards if sh.split == want]
            if not shards:
                have = sorted({s for s in splits if s is not None})
                raise ValueError(f"hf: no parquet file of split {split!r} in '{path}'; splits: "
                                 f"{', '.join(have) if have else 'none (no file names a split)'}")
        return shards, None, "parquet"

    def _saved(self, root: str, sub: str, split: str | None) -> tuple[list[_Shard], dict | None]:
        """The shards of one ``save_to_disk`` Dataset folder ``root/sub``, and its features."""
        folder = os.path.join(root, sub) if sub else root
        state_file, info_file = os.path.join(folder, "state.json"), os.path.join(folder, "dataset_info.json")
        for f in (state_file, info_file):
            if not os.path.isfile(f):
                raise ValueError(f"hf: '{folder}' lacks '{os.path.basename(f)}' (a save_to_disk folder holds "
                                 "state.json, dataset_info.json and its .arrow files)")
            check_inside(f, self._confine, f"'{os.path.relpath(f, root)}'", root)
        state, info = read_json(state_file, "hf state.json"), read_json(info_file, "hf dataset_info.json")
        files = state.get("_data_files") if isinstance(state, dict) else None
        if not isinstance(files, list) or not files or not all(
                isinstance(d, dict) and isinstance(d.get("filename"), str) for d in files):
            raise ValueError(f"hf: '{state_file}' should list its Arrow files as "
                             '"_data_files": [{"filename": "data-00000-of-00001.arrow"}, ...]')
        shards = []
        for n, d in enumerate(files):
            rel = f"{sub}/{d['filename']}" if sub else d["filename"]
            check_listed_file(os.path.join(root, rel), rel, root, f"hf '{state_file}' file {n}", self._confine)
            shards.append(_Shard(rel, "arrow", split))
        features = info.get("features") if isinstance(info, dict) else None
        return shards, features if isinstance(features, dict) else None

    # -- reading --------------------------------------------------------------------------------
    def _batches(self, pa, root: str, sh: _Shard) -> list:
        """The record batches of an Arrow shard, memory-mapped (nothing is copied)."""
        mm = pa.memory_map(os.path.join(root, sh.rel), "r")
        head = mm.read(len(_ARROW_FILE_MAGIC))
        mm.seek(0)
        if head == _ARROW_FILE_MAGIC:
            reader = pa.ipc.open_file(mm)
            return [reader.get_batch(k) for k in range(reader.num_record_batches)]
        return list(pa.ipc.open_stream(mm))

    def _scan(self, pa, root: str, sh: _Shard):
        """Count ``sh``'s rows and where each batch / row group starts; its schema and (parquet) features."""
        full = os.path.join(root, sh.rel)
        features = None
        if sh.kind == "arrow":
            batches = self._batches(pa, root, sh)
            schema = batches[0].schema if batches else pa.ipc.open_stream(pa.memory_map(full, "r")).schema
            for b in batches:
                b.validate()  # lengths and buffer sizes agree: a forged file cannot read out of bounds
            sizes = [b.num_rows for b in batches]
        else:
            pf = pa.parquet.ParquetFile(full, memory_map=True)
            schema = pf.schema_arrow
            sizes = [pf.metadata.row_group(k).num_rows for k in range(pf.metadata.num_row_groups)]
            meta = (schema.metadata or {}).get(b"huggingface")
            if meta:
                try:
                    features = json.loads(meta).get("info", {}).get("features")
                except (ValueError, AttributeError):
                    features = None
        sh.starts = [int(v) for v in np.cumsum([0] + sizes[:-1])] if sizes else []
        sh.n = int(sum(sizes))
        return schema, features if isinstance(features, dict) else None

    def _read_column(self, pa, root: str, sh: _Shard, name: str) -> list:
        """One small column of one shard, as a list of arrays (memory-mapped for Arrow files)."""
        if sh.kind == "arrow":
            return [b.column(name) for b in self._batches(pa, root, sh)]
        pf = pa.parquet.ParquetFile(os.path.join(root, sh.rel), memory_map=True)
        return pf.read(columns=[name]).column(0).chunks

    def _check_row_groups(self, pa, root: str, shards: list[_Shard]) -> None:
        for sh in shards:
            md = pa.parquet.ParquetFile(os.path.join(root, sh.rel), memory_map=True).metadata
            for k in range(md.num_row_groups):
                rg = md.row_group(k)
                size = sum(rg.column(c).total_uncompressed_size for c in range(rg.num_columns)
                           if rg.column(c).path_in_schema.split(".")[0] == self.image_column)
                if size > MAX_ROW_GROUP_BYTES:
                    raise ValueError(f"hf: parquet file '{sh.rel}' row group {k} holds {size} bytes of images "
                                     f"(limit {MAX_ROW_GROUP_BYTES}, as one row group is read at a time); "
                                     "rewrite it with smaller row groups")

    # -- columns and labels ---------------------------------------------------------------------
    def _pick_image(self, pa, schema, features, name: str | None, path: str) -> str:
        feats = features
        typed = {c: str(schema.field(c).type) for c in schema.names}
        if name is not None:
            if name not in schema.names:
                raise ValueError(f"hf: no image column {name!r} in '{path}'; columns: {', '.join(schema.names)}")
            if not _is_image_type(pa, schema.field(name).type):
                raise ValueError(f"hf: column {name!r} holds {typed[name]}, not images (an Image feature: "
                                 "struct<bytes, path>, or binary)")
            return name
        tagged = [c for c in schema.names if isinstance(feats.get(c), dict) and feats[c].get("_type") == "Image"]
        found = tagged or [c for c in schema.names if _is_image_type(pa, schema.field(c).type)]
        if len(found) != 1:
            raise ValueError(f"hf: {'no' if not found else 'more than one'} image column in '{path}' "
                             f"({', '.join(f'{c}: {t}' for c, t in typed.items())}); name it with image_column")
        return found[0]

    def _pick_label(self, schema, features, name: str | None, path: str) -> str:
        feats = features
        if name is not None:
            if name not in schema.names:
                raise ValueError(f"hf: no label column {name!r} in '{path}'; columns: {', '.join(schema.names)}")
            return name
        tagged = [c for c in schema.names if isinstance(feats.get(c), dict) and feats[c].get("_type") == "ClassLabel"]
        if len(tagged) == 1:
            return tagged[0]
        if "label" in schema.names:
            return "label"
        others = [c for c in schema.names if c != self.image_column]
        if len(others) == 1:  # an image column and one other: nothing else it could be
            return others[0]
        raise ValueError(f"hf: cannot tell the label column of '{path}' (columns: {', '.join(schema.names)}); "
                         "name it with label_column")

    def _labels(self, pa, values, features: dict) -> tuple[list[str], np.ndarray]:
        col, t = self.label_column, values.type
        nulls = values.null_count
        if nulls:
            row = int(np.flatnonzero(values.is_null().to_numpy(zero_copy_only=False))[0])
            raise ValueError(f"hf: label column {col!r} has {nulls} empty row(s), e.g. item {row}")
        feat = features.get(col)
        if isinstance(feat, dict) and feat.get("_type") == "ClassLabel" and pa.types.is_integer(t):
            names = feat.get("names")
            if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
                raise ValueError(f"hf: the ClassLabel feature of {col!r} has no list of names")
            y = values.to_numpy().astype(np.int64)
            bad = np.flatnonzero((y < 0) | (y >= len(names)))
            if bad.size:
                raise ValueError(f"hf: label column {col!r} has {bad.size} value(s) outside 0..{len(names) - 1} "
                                 f"(e.g. {int(y[bad[0]])} at item {int(bad[0])}; -1 means unlabelled): choose a "
                                 "labelled split")
            return list(names), y
        if pa.types.is_string(t) or pa.types.is_large_string(t):
            text = np.asarray(values.to_pylist(), dtype=object)
        elif pa.types.is_integer(t):
            text = values.to_numpy().astype(np.int64)
        else:
            raise ValueError(f"hf: label column {col!r} holds {t}; expected a ClassLabel, string or integer column")
        uniq, y = np.unique(text, return_inverse=True)
        return [str(v) for v in uniq], y.astype(np.int64)

    # -- items ----------------------------------------------------------------------------------
    def path(self, i: int) -> str:
        raise TypeError("hf items live inside Arrow or parquet files; use load(i)")

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_open"] = {}  # memory maps and parquet readers are reopened in each process
        return state

    def _locate(self, i: int) -> tuple[int, int]:
        if not 0 <= i < len(self):
            raise IndexError(f"item {i} out of range 0..{len(self) - 1}")
        s = bisect.bisect_right(self._ends, i)
        return s, i - (self._ends[s - 1] if s else 0)

    def _cell(self, i: int):
        pa = _pyarrow()
        s, row = self._locate(i)
        sh = self._shards[s]
        part = bisect.bisect_right(sh.starts, row) - 1
        j = row - sh.starts[part]
        if sh.kind == "arrow":
            batches = self._open.get(s)
            if batches is None:
                batches = self._open[s] = self._batches(pa, self.root, sh)
                if sum(b.num_rows for b in batches) != sh.n:
                    raise ValueError(f"hf: '{sh.rel}' changed since the source was opened ({sh.n} rows then)")
            return batches[part].column(self.image_column)[j]
        cached = self._open.get(s)
        if cached is None or cached[0] != part:
            pf = pa.parquet.ParquetFile(os.path.join(self.root, sh.rel), memory_map=True)
            cached = self._open[s] = (part, pf.read_row_group(part, columns=[self.image_column]).column(0))
        return cached[1][j]

    def load(self, i: int) -> Image.Image:
        """Decode item ``i`` from its bytes (or the file its ``path`` names) as RGB."""
        cell = self._cell(i)
        if not cell.is_valid:
            raise BadImage("no image (empty cell)")
        pa = _pyarrow()
        if isinstance(cell, pa.StructScalar):
            data, ref = cell["bytes"], (cell["path"] if "path" in cell.keys() else None)
        elif pa.types.is_string(cell.type) or pa.types.is_large_string(cell.type):
            data, ref = None, cell  # a column of image paths
        else:
            data, ref = cell, None
        if data is not None and data.is_valid:
            buf = data.as_buffer()
            if buf.size > self.limits.max_file_bytes:
                raise BadImage(f"file too large ({buf.size} bytes > limit {self.limits.max_file_bytes})")
            return open_rgb(io.BytesIO(buf), self.limits)
        if ref is None or not ref.is_valid or not ref.as_py():
            raise BadImage("no image (neither bytes nor path)")
        file = os.path.join(self.root, ref.as_py())  # an absolute path stays absolute
        if self._confine is not None:
            real = os.path.realpath(file)
            if not is_inside(real, self._confine):
                raise BadImage(f"outside the source root (resolves to {real})")
            file = real
        return open_rgb(file, self.limits)

    def _stamp(self, h: Any) -> None:
        h.update("\n".join(self.keys).encode())
        h.update(self.labels.tobytes())
        for sh in self._shards:
            try:
                st = os.stat(os.path.join(self.root, sh.rel))
                stamp = f"{st.st_size}:{st.st_mtime_ns}"
            except OSError:
                stamp = "missing"
            h.update(f"{sh.rel}\t{sh.n}\t{stamp}\n".encode())


PATH_COLUMNS = ("image_path", "path", "file", "filename", "image")  # a column of image paths, by its name


class ParquetSource(HFSource):
    """Parquet (or Arrow IPC) files with an image-bytes or image-path column: ``--format parquet``.

    Parameters
    ----------
    path : str
        One ``.parquet`` / ``.arrow`` file, or a folder: every such file below it, in path order.
    image_column : str, optional
        A column of image bytes (binary, or an ``Image`` struct of bytes and path) or of paths
        (strings, relative to the folder). Default: the one bytes column, else the first of
        :data:`PATH_COLUMNS` present.
    label_column : str, optional
        Default: ``label`` when present; without one the rows are unlabelled (-1), as rows to
        score with ``clip-heads predict`` are.
    key_column : str, optional
        A column of unique ids (strings or integers) for the keys; default ``<file>/<row>`` (one
        file: ``<row>``).

    Rows are read a row group at a time, never whole (see :class:`HFSource`); a path column's
    files must lie inside the folder unless ``allow_outside_root``.
    """

    format = "parquet"

    def __init__(self, path: str, image_column: str | None = None, label_column: str | None = None,
                 key_column: str | None = None, allow_outside_root: bool = False) -> None:
        self.key_column = key_column
        super().__init__(path, image_column=image_column, label_column=label_column, split=None,
                         allow_outside_root=allow_outside_root)

    def _root_folder(self, path: str) -> str:
        if os.path.isdir(path):
            self._file = None
            return path
        if not path.lower().endswith((".parquet", ".arrow")):
            raise ValueError(f"parquet source must be a .parquet or .arrow file or a folder of them, got '{path}'")
        self._file = os.path.basename(path)
        return os.path.dirname(path)

    def _layout(self, path: str, split: str | None) -> tuple[list[_Shard], dict | None, str]:
        if self._file is not None:
            files = [self._file]
        else:
            files, outside = files_under(path, "", self._confine, (".parquet", ".arrow"))
            if outside:
                key, target = outside[0]
                raise ValueError(f"parquet: '{key}' resolves outside the source root '{path}' (to '{target}'); "
                                 "open it with allow_outside_root=True (--allow-outside-root) to read it anyway")
            if not files:
                raise ValueError(f"parquet source '{path}' holds no .parquet or .arrow files")
        for f in files:  # a FIFO named x.parquet would block the reader
            check_listed_file(os.path.join(path, f), f, path, f"parquet file '{f}'", self._confine)
        return [_Shard(f, "arrow" if f.lower().endswith(".arrow") else "parquet", None) for f in sorted(files)], None, "parquet"

    def _pick_image(self, pa, schema, features, name: str | None, path: str) -> str:
        strings = [c for c in schema.names if pa.types.is_string(schema.field(c).type) or pa.types.is_large_string(schema.field(c).type)]
        if name is not None and name in strings:
            return name
        if name is None and not any(_is_image_type(pa, schema.field(c).type) for c in schema.names):
            found = [c for c in PATH_COLUMNS if c in strings]
            if found:
                return found[0]
            raise ValueError(f"parquet: no image column in '{path}' (bytes, an Image struct, or paths named "
                             f"{', '.join(PATH_COLUMNS)}); columns: {', '.join(schema.names)}; name it with image_column")
        return super()._pick_image(pa, schema, features, name, path)

    def _pick_label(self, schema, features, name: str | None, path: str) -> str | None:
        if name is not None:
            return super()._pick_label(schema, features, name, path)
        tagged = [c for c in schema.names if isinstance(features.get(c), dict) and features[c].get("_type") == "ClassLabel"]
        return tagged[0] if len(tagged) == 1 else "label" if "label" in schema.names else None

    def _keys(self, pa, path: str, shards: list[_Shard], schema) -> tuple[list[str], dict]:
        if self.key_column is None:
            if len(shards) == 1:
                return [str(r) for r in range(shards[0].n)], {}
            return [f"{sh.rel}/{r}" for sh in shards for r in range(sh.n)], {}
        if self.key_column not in schema.names:
            raise ValueError(f"parquet: no key column {self.key_column!r} in '{path}'; columns: {', '.join(schema.names)}")
        values = self._column(pa, path, shards, self.key_column, schema, "key")
        if values.null_count:
            raise ValueError(f"parquet: key column {self.key_column!r} has {values.null_count} empty row(s)")
        keys = [str(v) for v in values.to_pylist()]
        if len(set(keys)) != len(keys):
            seen: set[str] = set()
            dup = next(k for k in keys if k in seen or seen.add(k))
            raise ValueError(f"parquet: key column {self.key_column!r} repeats {dup!r}; keys must be unique")
        return keys, {}

    def _options(self, layout: str, split: str | None) -> dict:
        return {"image_column": self.image_column, "label_column": self.label_column, "key_column": self.key_column,
                "file": self._file}
