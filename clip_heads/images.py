"""Image decoding: any file a dataset may hold, to a fully loaded 8-bit RGB PIL image.

:func:`open_rgb` is the one decoder every :class:`clip_heads.source.Source` uses; it turns
every way a file can be unreadable into :class:`BadImage` with a short human reason.
"""
from __future__ import annotations

import io
import logging
import os
import re
import warnings
from typing import IO, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

logger = logging.getLogger(__name__)

PathOrFile = Union[str, "os.PathLike[str]", IO[bytes]]


class BadImage(Exception):
    """An image that cannot be decoded; the message is a short human reason."""


_SIGNATURES = [
    (b"\xff\xd8", "JPEG"), (b"\x89PNG", "PNG"), (b"GIF8", "GIF"), (b"BM", "BMP"),
    (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"),
]
_ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}


def _sniff(data: bytes) -> str | None:
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return next((name for magic, name in _SIGNATURES if data.startswith(magic)), None)


def _high_depth_to_l(im: Image.Image) -> Image.Image:
    # PIL's own convert() clips 16/32-bit values at 255, so a 16-bit PNG comes out white.
    a = np.asarray(im).astype(np.float64)
    a = np.nan_to_num(a, nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
    if im.mode == "F" and lo >= 0.0 and hi <= 1.0:
        a = a * 255.0
    elif im.mode != "F" and lo >= 0 and hi <= 65535:
        a = a / 257.0  # 16-bit range; PNG's 16-bit greyscale decodes to "I;16" or "I"
    else:
        a = (a - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(a)
    return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L")


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode == "RGB" and "transparency" not in im.info:
        return im
    if im.mode in ("I", "F") or im.mode.startswith("I;16"):
        return _high_depth_to_l(im).convert("RGB")
    if im.mode in _ALPHA_MODES or "transparency" in im.info:
        # Composite on white rather than drop alpha: transparent pixels often store black
        # (or arbitrary) colour, which would turn e.g. a dark logo into a black square.
        rgba = im.convert("RGBA")
        if rgba.getextrema()[3][0] == 255:
            return rgba.convert("RGB")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    try:
        return im.convert("RGB")  # L, 1, P, CMYK (Adobe-inverted JPEGs handled by PIL), YCbCr
    except ValueError as e:
        raise BadImage(f"unsupported colour mode {im.mode}") from e


def open_rgb(path_or_file: PathOrFile) -> Image.Image:
    """Decode an image fully and return it as 8-bit RGB.

    EXIF orientation is applied. Alpha (RGBA, LA, palette transparency) is composited on
    white. 16/32-bit integer images are scaled from the 16-bit range (32768 -> 128), float
    images from [0, 1], anything else by its own min-max. Multi-frame files give frame 0.

    Parameters
    ----------
    path_or_file : str, os.PathLike or binary file object

    Returns
    -------
    PIL.Image.Image
        Mode ``"RGB"``, fully loaded, holding no open file.

    Raises
    ------
    BadImage
        With a short reason: "file not found", "zero-byte file", "not an image",
        "truncated JPEG", "decompression bomb (N pixels)", ...
    """
    try:
        if hasattr(path_or_file, "read"):
            data = path_or_file.read()  # type: ignore[union-attr]
        else:
            with open(path_or_file, "rb") as f:  # type: ignore[arg-type]
                data = f.read()
    except FileNotFoundError as e:
        raise BadImage("file not found") from e
    except OSError as e:
        raise BadImage(f"unreadable file ({e.strerror or e})") from e
    if not data:
        raise BadImage("zero-byte file")
    kind = _sniff(data) or "image"
    try:
        # Escalate PIL's bomb warning (MAX_IMAGE_PIXELS < n <= 2x) to an error: a worker
        # that decodes a 20k x 20k image can take the whole machine down.
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
            kind = im.format or kind
            w, h = im.size
            if w <= 0 or h <= 0:
                raise BadImage(f"empty {kind} ({w}x{h} pixels)")
            im.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        m = re.search(r"\((\d+) pixels\)", str(e))
        raise BadImage(f"decompression bomb ({m.group(1) if m else 'too many'} pixels)") from e
    except UnidentifiedImageError as e:
        raise BadImage("not an image" if kind == "image" else f"corrupt {kind} header") from e
    except (OSError, SyntaxError, ValueError, EOFError, IndexError) as e:
        if "truncated" in str(e).lower() or isinstance(e, EOFError):
            raise BadImage(f"truncated {kind}") from e
        raise BadImage(f"corrupt {kind} data ({e})") from e
    try:
        orientation = im.getexif().get(0x0112, 1)
        if orientation not in (1, None):
            im = ImageOps.exif_transpose(im)
    except Exception as e:  # a broken EXIF block should not cost us the pixels
        logger.debug("ignoring unreadable EXIF: %s", e)
    return _to_rgb(im)

