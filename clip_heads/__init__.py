"""clip-heads: one frozen-CLIP pass into an HDF5 feature store, then light heads in seconds.

Everything the CLI does is a plain call here first::

    import clip_heads as ch
    ch.encode("data/Emotion6", "cache/e6.h5")
    X, y, classes = ch.open_store("cache/e6.h5").arrays()
    head = ch.get_head("mlp")(random_state=0).fit(X, y)
"""

__version__ = "0.1.0"

from . import interrupts as _interrupts  # noqa: E402  (stdlib only: runs before the heavy imports)

if _interrupts.running_as_cli():
    _interrupts.install_cli_excepthook()

from .ablation import ablate_prompts  # noqa: E402
from .encode import encode  # noqa: E402
from .crossval import cross_validate, stratified_folds  # noqa: E402
from .evaluate import evaluate_head, run_zero_shot, train_head  # noqa: E402
from .finetune import cross_validate_finetune, finetune  # noqa: E402
from .heads import HEADS, get_head, list_heads  # noqa: E402
from .prompts import add_prompts  # noqa: E402
from .reproduce import reproduce  # noqa: E402
from .retrieval import top_k_images  # noqa: E402
from .store import FeatureStore, open_store, write_store  # noqa: E402
from .writer import merge_stores  # noqa: E402
from .wise_ft import generalisation, interpolate, interpolate_sweep  # noqa: E402

__all__ = [
    "__version__", "encode", "open_store", "write_store", "merge_stores", "FeatureStore", "add_prompts",
    "HEADS", "get_head", "list_heads", "run_zero_shot", "train_head", "evaluate_head", "cross_validate",
    "stratified_folds", "ablate_prompts", "top_k_images", "finetune", "cross_validate_finetune",
    "interpolate", "interpolate_sweep", "generalisation", "reproduce",
]
