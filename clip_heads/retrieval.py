"""Top-k retrieval (B&P Fig. 1): the images of a store nearest each class prompt, and their grid."""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Callable

import numpy as np

from clip_heads import zeroshot
from clip_heads.fsutil import atomic_write_text
from clip_heads.images import BadImage
from clip_heads.metrics import json_default
from clip_heads.results import PathLike
from clip_heads.store import open_store

logger = logging.getLogger(__name__)

__all__ = ["top_k_images"]


def top_k_images(store_path: PathLike, k: int = 8, prompt_set: str | None = None, template_ids: Any = None,
                 out_dir: PathLike | None = None, thumb: int = 96) -> dict[str, list[tuple[str, float]]]:
    """The ``k`` images most similar (cosine) to each class prompt: ``{class: [(key, score), ...]}``.

    Classes are the prompt set's (its ``template_ids``, default all: the ensemble); within a class, best first (ties by store order). The score is the
    cosine, which every scoring rule ranks by. With ``out_dir``, writes ``top_k.json`` and,
    when the images can be found again from the store's recorded source, ``top_k.png`` (one
    row per class, its name and how many of its k images carry its label at the left; each
    image captioned with its cosine and its own label, green where that is the row's class).
    """
    with open_store(store_path) as s:
        X, keys, source = s.embeddings(), s.keys, s.attrs.get("source") or {}
        labels, store_classes = s.labels, s.classes
        ps = s.prompt_set(prompt_set)
    S = zeroshot.cosine(X, zeroshot.class_vectors(ps, zeroshot.resolve_template_ids(ps, template_ids)))
    k = max(1, min(int(k), len(keys)))
    result = {}
    for c, name in enumerate(ps.classes):
        col = S[:, c]
        idx = np.argpartition(-col, k - 1)[:k] if k < len(col) else np.arange(len(col))
        idx = idx[np.lexsort((idx, -col[idx]))]
        result[name] = [(keys[i], float(col[i])) for i in idx]
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        doc = {"prompt_set": ps.name, "k": k, "top_k": result}
        atomic_write_text(out / "top_k.json", json.dumps(doc, indent=2, default=json_default))
        index = {key: i for i, key in enumerate(keys)}
        own = {key: (store_classes[labels[index[key]]] if labels[index[key]] >= 0 else None)
               for row in result.values() for key, _ in row}
        _write_grid(result, source, out / "top_k.png", thumb, own, f"prompt set {ps.name!r}")
    return result


def _image_loader(source: dict) -> Callable[[str], Any] | None:
    """key -> PIL image, by reopening the recorded source, else as a file under its root."""
    from clip_heads.datasets import open_source
    from clip_heads.images import open_rgb

    root = source.get("root")
    if not root or not os.path.exists(root):
        return None
    try:
        src = open_source(root, format=source.get("format", "auto"), **(source.get("options") or {}))
    except (ValueError, OSError, TypeError) as e:  # an arrays-only store, a moved dataset...: fall back to root/key
        logger.debug("reopening source %s failed (%s); looking for files under it", root, e)
    else:
        pos = {key: i for i, key in enumerate(src.keys)}
        return lambda key: src.load(pos[key]) if key in pos else None

    def load(key: str):
        p = Path(root) / key
        return open_rgb(p) if p.is_file() else None

    return load


def _fit(draw: Any, text: str, font: Any, width: int) -> str:
    """``text`` cut (with an ellipsis) to ``width`` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"


def _font(size: int) -> Any:
    """DejaVu Sans (the font matplotlib ships, so the figures and the grid match), else PIL's own."""
    import importlib.util

    from PIL import ImageFont

    spec = importlib.util.find_spec("matplotlib")
    if spec is not None and spec.origin:
        path = Path(spec.origin).parent / "mpl-data" / "fonts" / "ttf" / "DejaVuSans.ttf"
        if path.is_file():
            return ImageFont.truetype(str(path), size)
    return ImageFont.load_default(size=size)


GRID_DPI = 96  # one image pixel per CSS pixel in the report page
GRID_PAD, GRID_CAPTION = 4, 26  # pixels between tiles; under each tile, two caption lines


def _write_grid(result: dict[str, list[tuple[str, float]]], source: dict, path: Path, thumb: int,
                own: dict[str, str | None] | None = None, what: str = "") -> Path | None:
    """The grid: one row per class prompt (its name, and how many of the row carry its label, at
    the left), each tile captioned with the image's cosine to the prompt and its own label
    (green: the row's class, red: another, grey: unlabelled)."""
    from PIL import Image, ImageDraw, ImageOps

    own = own or {}
    load = _image_loader(source)
    images = {}
    if load is not None:
        for key in {key for row in result.values() for key, _ in row}:
            try:
                images[key] = load(key)
            except (BadImage, OSError, ValueError) as e:  # a grid tile drawn grey, not a failed retrieval
                logger.debug("cannot read %s: %s", key, e)
    found = sum(v is not None for v in images.values())
    if not found:
        logger.info("top-k grid skipped: the images of source %r are not reachable (only top_k.json written)",
                    source.get("root"))
        return None
    font, small = _font(12), _font(10)
    draw0 = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    k = max(len(r) for r in result.values())
    hits = {cls: sum(own.get(key) == cls for key, _ in row) for cls, row in result.items()}
    label_w = 12 + max(int(max(draw0.textlength(c, font=font), draw0.textlength(f"{len(r)}/{len(r)} its own", font=small)))
                       for c, r in result.items())
    label_w = min(label_w, 220)
    pad, cap = GRID_PAD, GRID_CAPTION
    grid = Image.new("RGB", (label_w + k * (thumb + pad), len(result) * (thumb + cap + pad) + pad), "white")
    draw = ImageDraw.Draw(grid)
    for r, (cls, row) in enumerate(result.items()):
        top = pad + r * (thumb + cap + pad)
        draw.text((6, top + thumb // 2 - 12), _fit(draw, cls, font, label_w - 10), fill="black", font=font)
        draw.text((6, top + thumb // 2 + 4), f"{hits[cls]}/{len(row)} its own", fill="#555555", font=small)
        for j, (key, score) in enumerate(row):
            img = images.get(key)
            tile = Image.new("RGB", (thumb, thumb), "lightgray") if img is None else ImageOps.fit(img, (thumb, thumb))
            x = label_w + j * (thumb + pad)
            grid.paste(tile, (x, top))
            label = own.get(key)
            color = "#888888" if label is None else "#1a7f37" if label == cls else "#c62828"
            draw.text((x, top + thumb + 1), f"cos {score:.3f}", fill="black", font=small)
            draw.text((x, top + thumb + 13), _fit(draw, label if label is not None else "unlabelled", small, thumb),
                      fill=color, font=small)
    grid.save(path, dpi=(GRID_DPI, GRID_DPI))
    if found < len(images):
        logger.info("top-k grid: %d of %d images not found, drawn grey", len(images) - found, len(images))
    return path
