"""Robust image decoding (open_rgb): every kind of broken file gets a short reason, every mode becomes RGB."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageFile

from clip_heads.images import BadImage, open_rgb


def _img(path, color=(10, 20, 30), size=(8, 6), fmt=None, **save):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path, fmt, **save)
    return path


def test_bad_images_give_reasons(tmp_path):
    (tmp_path / "zero.jpg").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("this is not a picture\n")
    buf = io.BytesIO()
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(buf, "JPEG", quality=95)
    (tmp_path / "cut.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (tmp_path / "header.jpg").write_bytes(buf.getvalue()[:40])
    (tmp_path / "garbled.jpg").write_bytes(b"\xff\xd8\xff" + b"garbage" * 10)
    reasons = {}
    for name in ("zero.jpg", "text.jpg", "cut.jpg", "header.jpg", "garbled.jpg", "absent.jpg"):
        with pytest.raises(BadImage) as e:
            open_rgb(tmp_path / name)
        reasons[name] = str(e.value)
    assert reasons == {"zero.jpg": "zero-byte file", "text.jpg": "not an image", "cut.jpg": "truncated JPEG",
                       "header.jpg": "truncated JPEG", "garbled.jpg": "corrupt JPEG header",
                       "absent.jpg": "file not found"}
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False  # never papered over globally


def test_decompression_bomb(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    _img(tmp_path / "warn.png", size=(40, 40))  # 1600 px: PIL only warns; we refuse
    _img(tmp_path / "err.png", size=(50, 50))  # 2500 px > 2x limit: PIL raises
    for name, n in (("warn.png", 1600), ("err.png", 2500)):
        with pytest.raises(BadImage, match=rf"^decompression bomb \({n} pixels\)$"):
            open_rgb(tmp_path / name)


def test_conversions(tmp_path):
    Image.new("L", (4, 3), 77).save(tmp_path / "grey.png")
    assert open_rgb(tmp_path / "grey.png").getpixel((0, 0)) == (77, 77, 77)

    p = Image.new("P", (2, 1))
    p.putpalette([0, 0, 0, 200, 10, 20] + [0] * 762)
    p.putpixel((1, 0), 1)
    p.save(tmp_path / "pal.png", transparency=0)
    im = open_rgb(tmp_path / "pal.png")
    assert im.mode == "RGB" and [im.getpixel((x, 0)) for x in range(2)] == [(255, 255, 255), (200, 10, 20)]

    rgba = Image.new("RGBA", (3, 1))
    rgba.putdata([(255, 0, 0, 0), (0, 0, 255, 255), (0, 0, 0, 128)])
    rgba.save(tmp_path / "rgba.png")
    px = [open_rgb(tmp_path / "rgba.png").getpixel((x, 0)) for x in range(3)]
    assert px[0] == (255, 255, 255) and px[1] == (0, 0, 255)  # transparent -> white background
    assert all(abs(c - 127) <= 1 for c in px[2])

    Image.new("LA", (1, 1), (0, 0)).save(tmp_path / "la.png")
    assert open_rgb(tmp_path / "la.png").getpixel((0, 0)) == (255, 255, 255)

    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg", quality=95)
    r, g, b = open_rgb(tmp_path / "cmyk.jpg").getpixel((4, 4))
    assert r > 240 and g < 15 and b < 15


def test_high_bit_depth_scaled_not_clipped(tmp_path):
    a = np.array([[0, 32768, 65535]], dtype=np.uint16)
    Image.fromarray(a).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    im = open_rgb(tmp_path / "g16.png")
    assert [im.getpixel((x, 0))[0] for x in range(3)] == [0, 128, 255]
    Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32)).save(tmp_path / "f.tif")
    im = open_rgb(tmp_path / "f.tif")
    assert [im.getpixel((x, 0)) for x in range(3)] == [(0, 0, 0), (128, 128, 128), (255, 255, 255)]


def test_exif_orientation_applied(tmp_path):
    a = np.zeros((20, 40, 3), np.uint8)
    a[:, :20] = (255, 0, 0)
    a[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    Image.fromarray(a).save(tmp_path / "rot.jpg", exif=exif.tobytes(), quality=95)
    im = open_rgb(tmp_path / "rot.jpg")
    assert im.size == (20, 40)
    top, bottom = im.getpixel((10, 5)), im.getpixel((10, 35))
    assert top[0] > 200 and top[2] < 50 and bottom[2] > 200 and bottom[0] < 50


def test_open_rgb_file_object_and_gif(tmp_path):
    frames = [Image.new("P", (3, 3), i) for i in range(2)]
    for f in frames:
        f.putpalette([9, 8, 7, 1, 2, 3] + [0] * 762)
    frames[0].save(tmp_path / "a.gif", save_all=True, append_images=frames[1:])
    with open(tmp_path / "a.gif", "rb") as f:
        im = open_rgb(f)
    assert im.mode == "RGB" and im.getpixel((0, 0)) == (9, 8, 7)
