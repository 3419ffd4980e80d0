"""Which model: its files, its revision and a hash of its weights, without loading it.

Answered here once for every caller: :func:`resolve_model` finds a model's files (a directory,
or the hub snapshot: asked once with a short timeout, the cached copy used when the hub is
unreachable or HF_HUB_OFFLINE is set) and hashes its weights; :func:`check_identity` is the one
comparison of a recorded identity (``model_id``, ``model_revision``, ``model_hash``) with the
current one, used by encode's resume, prompts, fine-tune resume and WiSE-FT. Nothing here
imports torch or transformers: a store's or a run's model is identified before any is loaded.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

logger = logging.getLogger(__name__)

__all__ = ["SAFETENSORS", "SAFETENSORS_INDEX", "HUB_FILES", "HUB_PROBE_TIMEOUT", "LOCAL_REVISION", "ModelFiles",
           "weight_files", "weights_hash", "hub_offline", "resolve_model", "model_identity", "check_identity"]

# ---------------------------------------------------------------------------------------
# Which model: its files, its revision and a hash of its weights (the identity every check compares)
# ---------------------------------------------------------------------------------------
SAFETENSORS, SAFETENSORS_INDEX = "model.safetensors", "model.safetensors.index.json"
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".h5", ".msgpack")
# What a model load reads from a hub repo, for every family: config and processor JSONs,
# transformers' safetensors weights (model.safetensors or its shards, not other formats' copies
# such as open_clip's open_clip_model.safetensors), and the tokenizer's files: vocab/merges
# (*.txt), sentencepiece models (SigLIP's spiece.model, XLM-R's sentencepiece.bpe.model,
# Gemma's tokenizer.model) and tokenizer.json.
HUB_FILES = ("*.json", "model*.safetensors", "*.txt", "*.model")
HUB_PROBE_TIMEOUT = 5.0  # seconds the hub gets to answer once before the cached copy is used
LOCAL_REVISION = "local"  # the revision recorded for a model directory
_hub_down: dict[str, str] = {}  # endpoint -> why it could not be reached, for this process
_said: set[tuple[str, str]] = set()
_hashes: dict[tuple, str] = {}


@dataclass(frozen=True)
class ModelFiles:
    """Where a model's files are and which weights they hold.

    ``model_id`` is what the user named (hub id or directory), ``path`` the folder the model is
    loaded from (the directory itself, or the hub snapshot), ``revision`` the snapshot's commit
    (``"local"`` for a directory) and ``weights_hash`` a sha256 over the weight files loaded.
    """

    model_id: str
    path: Path
    revision: str
    weights_hash: str

    def identity(self) -> dict[str, str]:
        """What stores, heads, fine-tunes and WiSE-FT blends record and compare."""
        return {"model_id": self.model_id, "model_revision": self.revision, "model_hash": self.weights_hash}


def weight_files(folder: str | os.PathLike, origin: str | None = None) -> list[Path]:
    """The safetensors files transformers loads from ``folder``: ``model.safetensors``, or the
    shards its index lists. A folder with pickle weights only is refused (a pickle runs code)."""
    folder = Path(folder)
    origin = origin or str(folder)
    if (folder / SAFETENSORS).is_file():
        return [folder / SAFETENSORS]
    index = folder / SAFETENSORS_INDEX
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{index} is not a safetensors index ({type(e).__name__}: {e})") from e
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise ValueError(f"{origin} lacks weight shards {missing} listed in {SAFETENSORS_INDEX}")
        return [folder / s for s in shards]
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in _PICKLE_SUFFIXES) if folder.is_dir() else []
    if pickles:
        raise ValueError(f"{origin} holds pickle weights only ({', '.join(pickles)}); clip-heads loads safetensors "
                         f"only, since loading a pickle can run code: save the model with save_pretrained "
                         f"(safe_serialization=True) where you trust the file")
    raise ValueError(f"{origin} has no {SAFETENSORS} (nor {SAFETENSORS_INDEX}): not a model saved with save_pretrained")


def weights_hash(folder: str | os.PathLike, origin: str | None = None) -> str:
    """``"sha256:<hex>"`` over the weight files of ``folder`` in name order (one file: its sha256).

    Remembered for this process by (path, size, mtime, inode), so checking a model twice reads it once.
    """
    files = weight_files(folder, origin)
    stats = [p.stat() for p in files]
    key = tuple((str(p.resolve()), st.st_size, st.st_mtime_ns, st.st_ino) for p, st in zip(files, stats, strict=True))
    if key not in _hashes:
        h = hashlib.sha256()
        for p in files:
            with open(p, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 22), b""):
                    h.update(block)
        _hashes[key] = "sha256:" + h.hexdigest()
    return _hashes[key]


def hub_offline() -> bool:
    """Whether HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is set, read now rather than at import."""
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def resolve_model(model_id: str | os.PathLike) -> ModelFiles:
    """Find the files of ``model_id`` (a directory, or a hub id) and hash its weights. No model is loaded.

    A hub id is looked up on the hub once per process, with a short timeout; when the hub cannot
    be reached, or HF_HUB_OFFLINE is set, the cached snapshot of ``refs/main`` is used and one INFO
    line says so. Raises ``ValueError`` (one line) when no weights can be found or identified.
    """
    model_id = str(model_id)
    path = Path(model_id).expanduser()
    if path.is_dir():
        return ModelFiles(model_id, path, LOCAL_REVISION, weights_hash(path, f"model directory {model_id}"))
    if path.exists():
        raise ValueError(f"--model {model_id!r} is a file; pass a model directory saved with save_pretrained, or a hub id")
    folder = _hub_snapshot(model_id)
    return ModelFiles(model_id, folder, folder.name,
                      weights_hash(folder, f"the cached copy of {model_id} at revision {folder.name}"))


def model_identity(model_id: str | os.PathLike) -> dict[str, str]:
    """``{"model_id", "model_revision", "model_hash"}`` of a model, without loading it."""
    return resolve_model(model_id).identity()


def _hub_snapshot(repo_id: str) -> Path:
    from huggingface_hub import HfApi, constants, snapshot_download
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise ValueError(f"cannot load model {repo_id!r}: no such directory, and not a hub id (org/name); "
                         "pass --model PATH to a directory saved with save_pretrained") from e
    if hub_offline():
        return _cached_snapshot(repo_id, "offline (HF_HUB_OFFLINE)")
    endpoint = constants.ENDPOINT
    if endpoint in _hub_down:
        return _cached_snapshot(repo_id, _hub_down[endpoint])
    try:
        sha = HfApi().model_info(repo_id, timeout=HUB_PROBE_TIMEOUT).sha
    except _network_errors() as e:
        from huggingface_hub.errors import HfHubHTTPError

        why = f"hub {endpoint} unreachable ({type(e).__name__})"
        if isinstance(e, HfHubHTTPError) and getattr(e, "response", None) is not None:
            why = f"hub {endpoint} answered {e.response.status_code} for {repo_id}"
        else:
            _hub_down[endpoint] = why  # ask once per process, not once per file
        return _cached_snapshot(repo_id, why)
    return Path(snapshot_download(repo_id, revision=sha, allow_patterns=list(HUB_FILES)))


def _network_errors() -> tuple[type[BaseException], ...]:
    # huggingface_hub raises OSError subclasses for HTTP and offline errors; its HTTP client's
    # transport errors (connection refused, timeouts) are not OSErrors.
    import importlib

    errors: list[type[BaseException]] = [OSError]
    for name in ("httpx2", "httpx"):
        try:
            errors.append(importlib.import_module(name).TransportError)
        except (ImportError, AttributeError):
            pass
    return tuple(errors)


def _cached_snapshot(repo_id: str, why: str) -> Path:
    from huggingface_hub import constants, try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, "config.json")
    if not isinstance(found, str):
        raise ValueError(f"cannot load model {repo_id!r}: {why}, and it is not in the local cache "
                         f"({constants.HF_HUB_CACHE}); run once with the hub reachable, or pass --model PATH "
                         "to a directory saved with save_pretrained")
    folder = Path(found).parent
    if (repo_id, folder.name) not in _said:
        _said.add((repo_id, folder.name))
        logger.info("%s: using the cached copy of %s at revision %s", why, repo_id, folder.name)
    return folder


def check_identity(recorded: Mapping[str, Any], current: Mapping[str, str], what: str, remedy: str,
                   accept_declared: bool = False) -> None:
    """Refuse unless ``recorded`` (a store's or a run's attributes) names the model ``current``
    identifies: same ``model_id``, same non-empty ``model_hash``, same ``model_revision`` where
    both are recorded. ``accept_declared`` lets a hash declared by a user (``declared:<id>``,
    from :func:`clip_heads.store.write_store`) pass with a warning, since it cannot be checked."""
    rid, rhash, rrev = recorded.get("model_id"), str(recorded.get("model_hash") or ""), recorded.get("model_revision")
    if str(rid) != str(current["model_id"]):
        raise ValueError(f"{what} was made with model_id={rid!r}, but this run has model_id={current['model_id']!r}; {remedy}")
    if not rhash:
        raise ValueError(f"{what} records no model_hash (an older clip-heads recorded none for a hub id), so the "
                         f"weights it was made with cannot be verified; {remedy}")
    if rhash.startswith("declared:") and accept_declared:
        logger.warning("%s declares its model (%s) rather than hashing it: trusting that %s at %s is that model",
                       what, rhash, current["model_id"], current["model_hash"][:19])
        return
    if rhash != current["model_hash"] or (rrev and str(rrev) != str(current["model_revision"])):
        raise ValueError(f"{what} was made with {rid} at model_revision={rrev!r}, model_hash={rhash!r}, but {rid} "
                         f"is now model_revision={current['model_revision']!r}, model_hash={current['model_hash']!r}; "
                         f"{remedy}")
