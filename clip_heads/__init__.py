"""clip-heads: one frozen-CLIP pass into an HDF5 feature store, then light heads in seconds.

Everything the CLI does is a plain call here first::

    import clip_heads as ch
    ch.encode("data/Emotion6", "cache/e6.h5")
    X, y, classes = ch.open_store("cache/e6.h5").arrays()
    head = ch.get_head("mlp")(random_state=0).fit(X, y)

``import clip_heads`` is cheap: the names below are loaded from their modules the first time
they are used (PEP 562), so torch and scikit-learn are imported only by what needs them. The
package layout and where new code goes: docs/architecture.md.
"""
from __future__ import annotations

import importlib
import sys
import types

from . import interrupts as _interrupts  # stdlib only: runs before anything else
from .version import __version__

if _interrupts.running_as_cli():
    _interrupts.install_cli_excepthook()

# Public name -> the module that defines it.
_EXPORTS = {
    "encode": "encode",
    "open_store": "store", "FeatureStore": "store",
    "write_store": "writer", "merge_stores": "writer",
    "add_prompts": "prompts",
    "HEADS": "heads", "get_head": "heads", "list_heads": "heads",
    "run_zero_shot": "evaluate", "train_head": "evaluate", "evaluate_head": "evaluate",
    "cross_validate": "crossval", "stratified_folds": "crossval",
    "ablate_prompts": "ablation",
    "top_k_images": "retrieval",
    "Report": "results",
    "finetune": "finetune", "FinetuneConfig": "finetune_config",
    "cross_validate_finetune": "finetune_cv",
    "interpolate": "wise_ft", "interpolate_sweep": "wise_ft", "generalisation": "wise_ft",
    "reproduce": "reproduce",
}
# Functions named like the module that defines them: ``clip_heads.encode`` is the function
# (as README shows), whether or not the module ``clip_heads.encode`` was imported first.
_SHADOWED = frozenset(name for name, module in _EXPORTS.items() if name == module)

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


class _Package(types.ModuleType):
    """The package module, so that importing submodule ``encode`` does not replace the
    function ``clip_heads.encode`` (the import system sets a package attribute per submodule)."""

    def __setattr__(self, name: str, value) -> None:
        if name in _SHADOWED and isinstance(value, types.ModuleType) and value.__name__ == f"{__name__}.{name}":
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
