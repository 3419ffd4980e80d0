"""Image decoding: any file a dataset may hold, to a fully loaded 8-bit RGB PIL image.

:func:`open_rgb` is the one decoder every :class:`clip_heads.source.Source` uses; it turns
every way a file can be unreadable into :class:`BadImage` with a short human reason. A hostile
file costs bounded time and memory: only regular files are opened (a FIFO would block, a
device never ends), reads are capped at :attr:`ImageLimits.max_file_bytes`, and the pixel
count and aspect ratio are checked from the header before anything is decoded.
:func:`read_regular` is the same bounded read for the other files a source opens (manifests,
ground-truth tables, CIFAR-100 pickles).
"""
from __future__ import annotations

import io
import logging
import os
import re
import stat
import struct
import warnings
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import IO, Iterator, Union

import numpy as np
from PIL import Image, UnidentifiedImageError

logger = logging.getLogger(__name__)

PathOrFile = Union[str, "os.PathLike[str]", IO[bytes]]


class BadImage(Exception):
    """An image that cannot be decoded; the message is a short human reason."""


class RefusedFile(ValueError):
    """A file that is not read at all (not a regular file, too large, missing); a short reason."""


@dataclass(frozen=True)
class ImageLimits:
    """What one source file may cost before it is refused.

    Attributes
    ----------
    max_file_bytes : int
        Largest file read (images, manifests, pickles, tar members); 256 MiB.
    max_pixels : int or None
        Largest ``width * height`` decoded, checked from the header before decoding;
        ``None`` follows PIL's ``Image.MAX_IMAGE_PIXELS`` (89,478,485 unless changed).
    max_aspect : float or None
        Largest long-to-short edge ratio, 50:1. A shortest-edge resize multiplies the long
        edge by ``shortest_edge / short edge``: a 202-byte 40000x1 PNG would become
        224 x 8,960,000 pixels (6 GB). ``None``: no limit.
    max_resized_pixels : int
        Largest image the preprocessing resize may produce (``2**25``, ~100 MB of RGB),
        checked against the model's own resize before it runs.
    """

    max_file_bytes: int = 256 * 2**20
    max_pixels: int | None = None
    max_aspect: float | None = 50.0
    max_resized_pixels: int = 2**25

    def pixel_limit(self) -> int | None:
        return Image.MAX_IMAGE_PIXELS if self.max_pixels is None else self.max_pixels


DEFAULT_LIMITS = ImageLimits()

_FILE_KINDS = ((stat.S_ISFIFO, "FIFO"), (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"),
               (stat.S_ISSOCK, "socket"), (stat.S_ISDIR, "folder"))


def file_kind(mode: int) -> str:
    """``"regular file"``, ``"FIFO"``, ``"character device"``, ... for an ``st_mode``."""
    if stat.S_ISREG(mode):
        return "regular file"
    return next((name for test, name in _FILE_KINDS if test(mode)), "special file")


def _check_stat(st: os.stat_result, max_bytes: int) -> None:
    if not stat.S_ISREG(st.st_mode):
        raise RefusedFile(f"not a regular file ({file_kind(st.st_mode)})")
    if st.st_size > max_bytes:
        raise RefusedFile(f"file too large ({st.st_size} bytes > limit {max_bytes})")


def open_regular(path: Union[str, "os.PathLike[str]"], max_bytes: int = DEFAULT_LIMITS.max_file_bytes) -> IO[bytes]:
    """Open ``path`` for reading only if it is a regular file of at most ``max_bytes``.

    The type is checked with ``stat`` before opening (opening a FIFO blocks until a writer
    comes) and again on the open descriptor (the path may have been swapped in between; the
    descriptor is opened non-blocking so that a swapped-in FIFO cannot block either).

    Raises
    ------
    RefusedFile
        "file not found", "not a regular file (FIFO)", "file too large (N bytes > limit M)",
        "unreadable file (Permission denied)".
    """
    try:
        _check_stat(os.stat(path), max_bytes)
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError as e:
        raise RefusedFile("file not found") from e
    except OSError as e:
        raise RefusedFile(f"unreadable file ({e.strerror or e})") from e
    try:
        _check_stat(os.fstat(fd), max_bytes)
    except BaseException:
        os.close(fd)
        raise
    return os.fdopen(fd, "rb")


def _read_capped(f: IO[bytes], max_bytes: int, size_hint: int = 1 << 20) -> bytes:
    # In steps, not read(max_bytes + 1): that would allocate the whole limit for every file.
    # A file may also grow after its stat, or be a pipe-like object, so the cap is on what comes.
    chunks, total, want = [], 0, min(size_hint, max_bytes) + 1
    while total <= max_bytes:
        chunk = f.read(min(want, max_bytes + 1 - total))
        if not chunk:
            break
        chunks.append(chunk)
        total, want = total + len(chunk), 1 << 20
    if total > max_bytes:
        raise RefusedFile(f"file too large (more than {max_bytes} bytes)")
    return b"".join(chunks)


def read_regular(path: Union[str, "os.PathLike[str]"], max_bytes: int = DEFAULT_LIMITS.max_file_bytes) -> bytes:
    """The whole content of a regular file of at most ``max_bytes`` (see :func:`open_regular`)."""
    with open_regular(path, max_bytes) as f:
        try:
            return _read_capped(f, max_bytes, os.fstat(f.fileno()).st_size)
        except OSError as e:
            raise RefusedFile(f"unreadable file ({e.strerror or e})") from e


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


# -- reduced decoding ----------------------------------------------------------------------
# A JPEG stores 8x8 DCT blocks, so libjpeg-turbo can decode it directly at 1/2, 1/4, 1/8 (PIL's
# draft) or n/8 (its own scaling, through simplejpeg) of its size for a fraction of the cost of
# a full decode followed by a resize. The loader says how far an image may be reduced: enough to
# keep its shortest side >= min_side, which is a margin above the model's resize target so that
# the resize after it still filters like the reference's (the tests and bench_encode.py hold the
# embeddings to cosine >= 0.9999 against the full decode).
DECODERS = ("exact", "draft", "simplejpeg")


@dataclass(frozen=True)
class Reduction:
    """How :func:`open_rgb` may reduce a JPEG while decoding it: ``decoder`` is "draft" (PIL's
    DCT-domain scaling) or "simplejpeg" (libjpeg-turbo's n/8 scaling; falls back to draft when
    simplejpeg is not installed); the decoded image keeps both sides >= ``min_side``."""

    decoder: str
    min_side: int


_REDUCTION: ContextVar["Reduction | None"] = ContextVar("clip_heads_jpeg_reduction", default=None)


@contextmanager
def reduced_decoding(decoder: str, min_side: int) -> Iterator[None]:
    """Within this block, :func:`open_rgb` decodes JPEGs reduced as :class:`Reduction` says
    ("exact": in full, as outside it). The loader sets it around ``Source.load``, so every source
    that decodes through :func:`open_rgb` gets it."""
    if decoder not in DECODERS:
        raise ValueError(f"unknown decoder {decoder!r}; valid: {', '.join(DECODERS)}")
    token = _REDUCTION.set(None if decoder == "exact" else Reduction(decoder, int(min_side)))
    try:
        yield
    finally:
        _REDUCTION.reset(token)


def simplejpeg_available() -> bool:
    """Whether the optional ``simplejpeg`` (extra ``fast-decode``) is importable."""
    try:
        import simplejpeg  # noqa: F401
    except ImportError:
        return False
    return True


def _decode_reduced(im: Image.Image, data: bytes, how: Reduction) -> Image.Image | None:
    """The JPEG ``im`` (opened, not loaded) decoded reduced, or None to decode it in full.
    PIL's draft happens in place (``im`` then loads reduced); simplejpeg returns a new image."""
    side = how.min_side
    if im.format not in ("JPEG", "MPO"):  # MPO: a camera's JPEG with extra frames; PIL gives the first
        return None
    if how.decoder == "simplejpeg" and im.format == "JPEG" and im.mode in ("RGB", "L") and simplejpeg_available():
        # Also at full size (an image under 2 * min_side): libjpeg-turbo's own output, the same
        # pixels as PIL's decode (same library, same IDCT and upsampling) for ~60% of its time.
        import simplejpeg

        # The scales PIL's draft takes (1/2, 1/4, 1/8): libjpeg-turbo's other n/8 ones filter
        # worse (a ViT-B/32 embedding at 3/8 fell to cosine 0.9997 against the full decode).
        w, h = im.size
        k = next(k for k in (8, 4, 2, 1) if k == 1 or min(w, h) // k >= side)
        try:
            # strict: a truncated or corrupt stream raises instead of decoding to grey; PIL's
            # full decode below then names what is wrong with it.
            a = simplejpeg.decode_jpeg(data, colorspace="RGB", min_height=-(-h // k), min_width=-(-w // k), strict=True)
        except ValueError:
            return None
        return Image.fromarray(a, "RGB")
    if min(im.size) >= 2 * side:  # else no 1/2 scale keeps min_side: nothing to gain
        im.draft(im.mode, (side, side))
    return None


_TRANSPOSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
              5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
              8: Image.Transpose.ROTATE_90}


def _orientation(im: Image.Image) -> int:
    try:
        return int(im.getexif().get(0x0112, 1) or 1)
    except (OSError, ValueError, TypeError, KeyError, IndexError, SyntaxError, ZeroDivisionError, struct.error) as e:
        logger.debug("ignoring unreadable EXIF: %s", e)  # a broken EXIF block should not cost us the pixels
        return 1


# Formats PIL can only decode by running an external program (EPS: Ghostscript), which a
# hostile file could keep busy forever.
_EXTERNAL_DECODERS = {"EPS"}


def open_rgb(path_or_file: PathOrFile, limits: ImageLimits = DEFAULT_LIMITS) -> Image.Image:
    """Decode an image fully and return it as 8-bit RGB.

    EXIF orientation is applied. Alpha (RGBA, LA, palette transparency) is composited on
    white. 16/32-bit integer images are scaled from the 16-bit range (32768 -> 128), float
    images from [0, 1], anything else by its own min-max. Multi-frame files give frame 0.

    Parameters
    ----------
    path_or_file : str, os.PathLike or binary file object
        A path is opened only if it is a regular file (see :func:`open_regular`).
    limits : ImageLimits
        File size, pixel count and aspect ratio refused before decoding.

    Returns
    -------
    PIL.Image.Image
        Mode ``"RGB"``, fully loaded, holding no open file.

    Raises
    ------
    BadImage
        With a short reason: "file not found", "zero-byte file", "not a regular file (FIFO)",
        "file too large (N bytes > limit M)", "not an image", "truncated JPEG",
        "decompression bomb (N pixels)", "extreme aspect ratio (40000x1 > 50:1)", ...
    """
    try:
        if hasattr(path_or_file, "read"):
            data = _read_capped(path_or_file, limits.max_file_bytes)  # type: ignore[arg-type]
        else:
            data = read_regular(path_or_file, limits.max_file_bytes)  # type: ignore[arg-type]
    except RefusedFile as e:
        raise BadImage(str(e)) from e
    except OSError as e:
        raise BadImage(f"unreadable file ({e.strerror or e})") from e
    if not data:
        raise BadImage("zero-byte file")
    kind = _sniff(data) or "image"
    max_pixels = limits.pixel_limit()
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
            # Everything below is known from the header alone: refuse before decoding.
            if kind in _EXTERNAL_DECODERS:
                raise BadImage(f"unsupported format {kind}")
            if max_pixels is not None and w * h > max_pixels:
                raise BadImage(f"decompression bomb ({w * h} pixels)")
            if limits.max_aspect is not None and max(w, h) > limits.max_aspect * min(w, h):
                raise BadImage(f"extreme aspect ratio ({w}x{h} > {limits.max_aspect:g}:1)")
            orientation = _orientation(im)  # from the header, before a reduced decode drops it
            how = _REDUCTION.get()
            reduced = _decode_reduced(im, data, how) if how is not None else None
            if reduced is None:
                im.load()
            else:
                im = reduced
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        m = re.search(r"\((\d+) pixels\)", str(e))
        raise BadImage(f"decompression bomb ({m.group(1) if m else 'too many'} pixels)") from e
    except UnidentifiedImageError as e:
        raise BadImage("not an image" if kind == "image" else f"corrupt {kind} header") from e
    except (OSError, SyntaxError, ValueError, EOFError, IndexError) as e:
        if "truncated" in str(e).lower() or isinstance(e, EOFError):
            raise BadImage(f"truncated {kind}") from e
        raise BadImage(f"corrupt {kind} data ({e})") from e
    if orientation in _TRANSPOSE:
        im = im.transpose(_TRANSPOSE[orientation])
    return _to_rgb(im)
