"""A head's folder on disk: ``config.json`` + ``model.safetensors``, written whole, read with suspicion.

Writing (:func:`save_head`): both files are built in a staging folder beside the destination
and swapped in at once under the folder's writer lock (:mod:`clip_heads.fsutil`), so an
interrupted or out-of-space rewrite leaves the previous head exactly as it was. The config
records the sha256 of the weights file it belongs to.

Reading (:func:`load_head`): everything in the folder is checked before it is used - the
config's every key and type, the head's parameters, the weights file's checksum against the
config, its tensor names, shapes and dtypes against what the head's classes, dimension and
parameters imply - and each problem is one :class:`HeadFileError` naming the file and what is
wrong with it. Nothing is unpickled: the weights are read by ``safetensors`` only.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import reprlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

from clip_heads.fsutil import exclusive_lock, staged_dir
from clip_heads.heads.params import ParameterError, check_names
from clip_heads.heads.registry import head_class
from clip_heads.version import __version__

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
# A config holds parameters, classes and training curves: far below this. A bigger file is not one.
MAX_CONFIG_BYTES = 64 * 2**20
FLOAT_DTYPES = {"F16", "BF16", "F32", "F64"}
INT_DTYPES = {"I32", "I64"}
_short = reprlib.Repr()
_short.maxstring, _short.maxother, _short.maxlist = 60, 60, 6


class HeadFileError(ValueError):
    """A head folder whose config or weights are malformed, inconsistent or not a pair."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(2**20), b""):
            h.update(block)
    return h.hexdigest()


def _jsonable(v: Any) -> Any:
    """numpy scalars and arrays, tuples and dicts into plain JSON values."""
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    return v


# -- writing ---------------------------------------------------------------------------------
def save_head(head: Any, save_directory: str | Path) -> Path:
    """Write ``head`` to a folder: ``config.json`` (head name, params, classes, backbone,
    training data, learned scalars, package version, weights' sha256) + ``model.safetensors``.

    The folder is replaced whole: the two files are written to a staging copy of it (other
    files already there, such as reports, are kept) that is swapped in at the end, under the
    folder's lock, so a second writer fails at once and a killed or failed write changes nothing.
    """
    from safetensors.torch import save as safetensors_bytes
    from sklearn.utils.validation import check_is_fitted

    check_is_fitted(head)
    out = Path(save_directory)
    tensors = {k: v.detach().cpu().contiguous() for k, v in head._get_tensors().items()}
    blob = safetensors_bytes(tensors, metadata={"head": head.name})
    params = {k: _jsonable(v) for k, v in head.get_params(deep=False).items() if k not in head._tensor_params}
    if not isinstance(params.get("device", "cpu"), str):
        params["device"] = str(params["device"])
    config = {"head": head.name, "params": params, "classes": _jsonable(head.classes_),
              "n_features_in": int(head.n_features_in_), "backbone": getattr(head, "backbone_", None),
              "training_data": getattr(head, "training_data_", None),
              "extra": _jsonable(head._extra_config()), "clip_heads_version": __version__,
              "weights_sha256": hashlib.sha256(blob).hexdigest()}
    text = json.dumps(config, indent=2)
    with exclusive_lock(out, f"saving a {head.name} head"), staged_dir(out, copy_existing=True) as stage:
        (stage / WEIGHTS_NAME).write_bytes(blob)
        (stage / CONFIG_NAME).write_text(text)
    logger.info("saved %s head to %s", head.name, out)
    return out


# -- reading ---------------------------------------------------------------------------------
def _bad(path: Path, what: str) -> HeadFileError:
    return HeadFileError(f"{path}: {what}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _read_config(path: Path) -> dict:
    with open(path, "rb") as f:
        data = f.read(MAX_CONFIG_BYTES + 1)
    if len(data) > MAX_CONFIG_BYTES:
        raise _bad(path, f"larger than {MAX_CONFIG_BYTES // 2**20} MiB: not a head config")
    try:
        config = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _bad(path, f"not valid JSON ({e})") from None
    except RecursionError:
        raise _bad(path, "not a head config (JSON nested too deeply)") from None
    if not isinstance(config, dict):
        raise _bad(path, f"must hold a JSON object, got {type(config).__name__}")
    required = ("head", "params", "classes", "n_features_in", "backbone", "extra", "weights_sha256")
    missing = [k for k in required if k not in config]
    if missing:
        hint = (" (written before clip-heads recorded a checksum of the weights: retrain the head)"
                if missing == ["weights_sha256"] else "")
        raise _bad(path, f"lacks {', '.join(repr(k) for k in missing)}{hint}")
    return config


def _check_classes(path: Path, classes: Any) -> list:
    valid = "a non-empty list of unique strings, or of unique numbers"
    if not isinstance(classes, list) or not classes:
        raise _bad(path, f"'classes' must be {valid}, got {_short.repr(classes)}")
    if all(isinstance(c, str) for c in classes):
        pass
    elif all(_is_int(c) for c in classes) or all(isinstance(c, float) and math.isfinite(c) for c in classes):
        pass
    else:
        raise _bad(path, f"'classes' must be {valid} (one type, no null, lists or NaN), got {_short.repr(classes)}")
    if len(set(classes)) != len(classes):
        raise _bad(path, f"'classes' has duplicates: {_short.repr(classes)}")
    return classes


def _check_backbone(path: Path, backbone: Any, n_features: int) -> dict:
    valid = "an object with a non-empty 'model_id', a 'model_hash' and the vector 'dim'"
    if not isinstance(backbone, dict):
        raise _bad(path, f"'backbone' must be {valid}, got {_short.repr(backbone)}: a head that does not say which "
                         f"model its vectors came from cannot be matched to a store")
    if not isinstance(backbone.get("model_id"), str) or not backbone["model_id"]:
        raise _bad(path, f"'backbone.model_id' must be a non-empty string, got {_short.repr(backbone.get('model_id'))}")
    if "model_hash" not in backbone or not isinstance(backbone["model_hash"], (str, type(None))):
        raise _bad(path, f"'backbone.model_hash' must be a string, got {_short.repr(backbone.get('model_hash'))}")
    if not isinstance(backbone.get("model_revision"), (str, type(None))):
        raise _bad(path, f"'backbone.model_revision' must be a string, got {_short.repr(backbone['model_revision'])}")
    if backbone.get("dim") != n_features or not _is_int(backbone.get("dim")):
        raise _bad(path, f"'backbone.dim' must equal n_features_in ({n_features}), got {_short.repr(backbone.get('dim'))}")
    unknown = set(backbone) - {"model_id", "model_hash", "dim", "model_revision"}
    if unknown:
        raise _bad(path, f"'backbone' has unknown keys {sorted(unknown)}")
    return backbone


def _check_training_data(path: Path, data: Any) -> dict | None:
    if data is None:
        return None
    if (not isinstance(data, dict) or set(data) != {"store", "fingerprint"}
            or not all(isinstance(v, str) for v in data.values())):
        raise _bad(path, f"'training_data' must be null or {{\"store\": str, \"fingerprint\": str}}, "
                         f"got {_short.repr(data)}")
    return data


def _check_extra(path: Path, extra: Any, types: dict[str, tuple[type, ...]]) -> dict:
    if not isinstance(extra, dict):
        raise _bad(path, f"'extra' must be an object, got {_short.repr(extra)}")
    for key, allowed in types.items():
        if key not in extra:
            raise _bad(path, f"'extra' lacks {key!r}")
        v = extra[key]
        ok = isinstance(v, allowed) and not (isinstance(v, bool) and bool not in allowed)
        if not ok or (isinstance(v, float) and not math.isfinite(v)):
            names = " or ".join("null" if t is type(None) else t.__name__ for t in allowed)
            raise _bad(path, f"'extra.{key}' must be {names}, got {_short.repr(v)}")
    unknown = set(extra) - set(types)
    if unknown:
        raise _bad(path, f"'extra' has unknown keys {sorted(unknown)}")
    return extra


def _resolve_device(path: Path, saved: Any, override: str | None) -> Any:
    """The device to load on: the override, else the saved one if this machine has it, else cpu."""
    if override is not None:
        return override
    if isinstance(saved, str) and saved.startswith("cuda") and not torch.cuda.is_available():
        logger.warning("%s was saved for device %r, which this machine lacks: loading it on cpu", path, saved)
        return "cpu"
    if saved == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        logger.warning("%s was saved for device 'mps', which this machine lacks: loading it on cpu", path)
        return "cpu"
    return saved


def _read_tensors(path: Path, head: Any) -> dict[str, torch.Tensor]:
    """Tensors of ``path`` after checking names, shapes and dtypes against what ``head`` implies."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}
            expected = head._expected_tensors({k: s for k, (s, _) in meta.items()})
            missing, unknown = sorted(set(expected) - set(meta)), sorted(set(meta) - set(expected))
            if missing or unknown:
                raise _bad(path, f"a {head.name} head needs the tensors {sorted(expected)}; "
                                 f"{'missing ' + str(missing) if missing else ''}"
                                 f"{'; ' if missing and unknown else ''}{'unexpected ' + str(unknown) if unknown else ''}")
            tensors = {}
            for name, want in expected.items():
                shape, dtype = meta[name]
                if shape != tuple(want):
                    free = " (-1: inconsistent with the other tensors)" if -1 in want else ""
                    raise _bad(path, f"tensor {name!r} has shape {list(shape)}, but a {head.name} head with "
                                     f"{len(head.classes_)} classes, dim {head.n_features_in_} and its parameters "
                                     f"needs {list(want)}{free}")
                integer = name in head._int_tensors
                allowed = INT_DTYPES if integer else FLOAT_DTYPES
                if dtype not in allowed:
                    raise _bad(path, f"tensor {name!r} has dtype {dtype}; it must be {' or '.join(sorted(allowed))}"
                                     f"{'' if integer else ' (quantised weights are not supported)'}")
                t = f.get_tensor(name)
                t = t.long() if integer else t.float()
                if not integer and not torch.isfinite(t).all():
                    raise _bad(path, f"tensor {name!r} holds NaN or infinite values")
                tensors[name] = t
    except SafetensorError as e:
        raise _bad(path, f"not a safetensors file ({e})") from None
    return tensors


def load_head(directory: str | Path, device: str | None = None, expect: type | None = None) -> Any:
    """Load a head folder written by :func:`save_head`, checking everything in it first.

    Parameters
    ----------
    directory : the head folder.
    device : load onto this device instead of the saved one (a saved GPU device this machine
        lacks falls back to cpu, with a warning).
    expect : a head class the folder must hold.

    Raises
    ------
    FileNotFoundError : the folder or one of its two files is missing (or not a regular file).
    HeadFileError : anything in them is malformed, inconsistent, or the two are not a pair.
    """
    directory = Path(directory)
    cfg_path, w_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    for p in (cfg_path, w_path):
        if not p.is_file():  # also refuses a FIFO or device under these names
            raise FileNotFoundError(f"{directory} lacks {CONFIG_NAME} or {WEIGHTS_NAME} ({p.name} is missing or not "
                                    f"a regular file): not a saved head")
    config = _read_config(cfg_path)
    if not isinstance(config["head"], str):
        raise _bad(cfg_path, f"'head' must be a head name, got {_short.repr(config['head'])}")
    try:
        head_cls = head_class(config["head"])
    except ValueError as e:
        raise _bad(cfg_path, str(e)) from None
    if expect is not None and head_cls is not expect:
        raise HeadFileError(f"{directory} holds a {config['head']!r} head, not {expect.name!r}")
    params = config["params"]
    if not isinstance(params, dict):
        raise _bad(cfg_path, f"'params' must be an object, got {_short.repr(params)}")
    names = [n for n in head_cls._get_param_names() if n not in head_cls._tensor_params]
    try:
        check_names(f"the {head_cls.name!r} head", params, names)
        params = dict(params, device=_resolve_device(cfg_path, params.get("device", "cpu"), device))
        head = head_cls(**params)
        head._check_params()
    except ParameterError as e:
        raise _bad(cfg_path, str(e)) from None
    classes = _check_classes(cfg_path, config["classes"])
    n = config["n_features_in"]
    if not _is_int(n) or n < 1:
        raise _bad(cfg_path, f"'n_features_in' must be a positive integer, got {_short.repr(n)}")
    backbone = _check_backbone(cfg_path, config["backbone"], n)
    training_data = _check_training_data(cfg_path, config.get("training_data"))
    extra = _check_extra(cfg_path, config["extra"], head_cls._extra_types)
    sha = config["weights_sha256"]
    if not isinstance(sha, str) or len(sha) != 64:
        raise _bad(cfg_path, f"'weights_sha256' must be a sha256 hex digest, got {_short.repr(sha)}")
    actual = sha256_file(w_path)
    if actual != sha:
        raise HeadFileError(f"{w_path} does not belong to {cfg_path}: its sha256 is {actual[:16]}..., the config "
                            f"records {sha[:16]}... (a torn or mixed write?); retrain or restore the head")
    head.classes_ = np.asarray(classes)
    head.n_features_in_ = n
    head.backbone_ = backbone
    if training_data is not None:
        head.training_data_ = training_data
    tensors = _read_tensors(w_path, head)
    try:
        head._set_tensors(tensors, extra)
    except ValueError as e:
        raise _bad(w_path, str(e)) from None
    return head
