"""The image loader against hostile and odd files: it returns a valid image or skips the file with
a counted warning, never a traceback. Fuzzed with hypothesis; a folder of hostile files trains."""

from __future__ import annotations

import io
import struct
import subprocess
import sys
import zlib
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from PIL import Image

from byol_nb.datasets import ImageFolder
from byol_nb.images import DataError, UnreadableImage, find_images, load_image

SIZE = 16
FUZZ = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
MODES = ("1", "L", "LA", "P", "PA", "RGB", "RGBA", "CMYK", "I;16", "I", "F", "YCbCr")
FORMATS = ("PNG", "JPEG", "BMP", "GIF", "TIFF", "WEBP")


def _valid(array: np.ndarray) -> None:
    assert array.shape == (SIZE, SIZE, 3) and array.dtype == np.uint8


def _load_or_skip(path: Path) -> None:
    """The contract: a valid image, or UnreadableImage that names the file."""
    try:
        _valid(load_image(path, SIZE))
    except UnreadableImage as error:
        assert str(path) in str(error)


def _encode(mode: str, width: int, height: int, fmt: str, seed: int) -> bytes | None:
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    if mode == "I;16":
        image = Image.fromarray(rng.integers(0, 65536, (height, width), dtype=np.uint16))
    elif mode == "F":
        image = Image.fromarray(rng.normal(size=(height, width)).astype(np.float32))
    elif mode == "P":
        image = image.quantize(colors=16)
    elif mode == "PA":
        image = image.quantize(colors=16).convert("PA")
    else:
        image = image.convert(mode)
    buffer = io.BytesIO()
    try:
        image.save(buffer, format=fmt)
    except (OSError, ValueError, KeyError):
        return None  # this format cannot store this mode
    return buffer.getvalue()


def _png_header(width: int, height: int) -> bytes:
    """A PNG that claims ``width`` x ``height`` pixels in a few dozen bytes: a decompression bomb."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


# ---- single files ----------------------------------------------------------------------------
@FUZZ
@given(content=st.binary(max_size=2000), suffix=st.sampled_from([".png", ".jpg", ".gif", ".tiff", ".webp", ".bmp"]))
def test_random_bytes(tmp_path, content, suffix):
    path = tmp_path / f"fuzz{suffix}"
    path.write_bytes(content)
    _load_or_skip(path)


@FUZZ
@given(mode=st.sampled_from(MODES), fmt=st.sampled_from(FORMATS), width=st.integers(1, 48),
       height=st.integers(1, 48), seed=st.integers(0, 2**16), cut=st.floats(0, 1), flip=st.integers(0, 2**16))
def test_every_mode_and_format_whole_truncated_or_damaged(tmp_path, mode, fmt, width, height, seed, cut, flip):
    encoded = _encode(mode, width, height, fmt, seed)
    assume(encoded is not None)
    path = tmp_path / f"image.{fmt.lower()}"
    path.write_bytes(encoded)
    _valid(load_image(path, SIZE))  # whole files of every mode decode to RGB
    path.write_bytes(encoded[: int(len(encoded) * cut)])
    _load_or_skip(path)
    damaged = bytearray(encoded)
    damaged[flip % len(damaged)] ^= 0xFF
    path.write_bytes(bytes(damaged))
    _load_or_skip(path)


@pytest.mark.parametrize("width, height", [(30_000, 30_000), (10_000, 10_000)])
def test_decompression_bomb_is_refused_with_a_message(tmp_path, width, height):
    path = tmp_path / "bomb.png"
    path.write_bytes(_png_header(width, height))
    with pytest.raises(UnreadableImage, match=r"bomb.png: .*(decompression bomb|exceeds limit)"):
        load_image(path, SIZE)


def test_extreme_aspect_ratio_is_cropped_before_resizing(tmp_path, monkeypatch):
    """A 1 x 40000 strip must not be upscaled to 16 x 640000 pixels before cropping (with a
    strip near PIL's pixel limit that is gigabytes)."""
    path = tmp_path / "strip.png"
    Image.new("L", (40_000, 1), 128).save(path)
    sizes, resize = [], Image.Image.resize

    def spy(self, size, *args, **kwargs):
        sizes.append(size)
        return resize(self, size, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "resize", spy)
    _valid(load_image(path, SIZE))
    assert sizes and max(w * h for w, h in sizes) <= SIZE * SIZE


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "CMYK", "I;16", "1", "LA"])
def test_issue2_modes_give_rgb(tmp_path, mode):
    path = tmp_path / "image.tiff"
    path.write_bytes(_encode(mode, 40, 30, "TIFF", 0))
    _valid(load_image(path, SIZE))


def test_transparent_pixels_become_white_not_black(tmp_path):
    path = tmp_path / "clear.png"
    Image.new("RGBA", (8, 8), (0, 0, 0, 0)).save(path)
    assert (load_image(path, SIZE) == 255).all()


def test_image_smaller_than_the_crop_is_upscaled(tmp_path):
    path = tmp_path / "tiny.png"
    Image.new("RGB", (3, 5), (10, 20, 30)).save(path)
    array = load_image(path, SIZE)
    _valid(array)
    assert (array == (10, 20, 30)).all()


# ---- folders ---------------------------------------------------------------------------------
def _good(path: Path, seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(_encode("RGB", 24, 24, "PNG", seed))


def _hostile_folder(root: Path, good: int) -> int:
    """``good`` readable images plus every kind of bad file; returns how many bad image files."""
    for i in range(good):
        _good(root / f"ok{i:02d}.png", seed=i)
    bad = {
        "empty.png": b"",
        "random.jpg": bytes(np.random.default_rng(1).integers(0, 256, 3000, dtype=np.uint8)),
        "text.png": b"this is not an image\n",
        "truncated.png": _encode("RGB", 40, 40, "PNG", 2)[:200],
        "truncated.jpg": _encode("RGB", 40, 40, "JPEG", 3)[:300],
        "bomb.png": _png_header(30_000, 30_000),
    }
    for name, content in bad.items():
        (root / name).write_bytes(content)
    (root / "broken-link.png").symlink_to(root / "nowhere.png")
    (root / "sub").mkdir()
    (root / "sub" / "loop").symlink_to(root, target_is_directory=True)  # a symlink loop
    (root / "notes.txt").write_text("ignored: not an image extension")
    return len(bad) + 1


def test_symlink_loop_is_walked_once(tmp_path):
    _good(tmp_path / "a" / "x.png")
    (tmp_path / "a" / "loop").symlink_to(tmp_path, target_is_directory=True)
    (tmp_path / "b").symlink_to(tmp_path / "a", target_is_directory=True)
    files, _, _ = find_images(tmp_path)
    assert [f.name for f in files] == ["x.png"]


@pytest.mark.parametrize("cache", [True, False])
def test_hostile_folder_keeps_good_images_and_counts_the_rest(tmp_path, cache):
    bad = _hostile_folder(tmp_path, good=5)
    with pytest.warns(UserWarning, match=rf"skipped {bad} unreadable file\(s\)"):
        dataset = ImageFolder(tmp_path, SIZE, cache=cache)
    assert len(dataset) == 5
    for index in range(len(dataset)):
        image, label = dataset[index]
        assert image.shape == (3, SIZE, SIZE) and label == -1


@pytest.mark.parametrize("setup, message", [
    (lambda root: None, "no image files"),
    (lambda root: (root / "a.png").write_bytes(b""), r"none of the 1 image file\(s\)"),
    (lambda root: (root / "a.png").write_text("hello"), r"none of the 1 image file\(s\)"),
])
def test_folder_problems_get_a_message(tmp_path, setup, message):
    setup(tmp_path)
    with pytest.raises(DataError, match=message), pytest.warns(UserWarning) if "none" in message else nullcontext():
        ImageFolder(tmp_path, SIZE)


def test_missing_path_gets_a_message(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        ImageFolder(tmp_path / "nowhere", SIZE)


@pytest.mark.slow
def test_hostile_folder_trains_without_a_traceback(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    bad = _hostile_folder(data, good=12)
    result = subprocess.run(
        [sys.executable, "-m", "byol_nb.train", "--data", str(data), "--out", str(tmp_path / "out"),
         "--max-steps", "2", "--batch-size", "4", "--image-size", "16", "--proj-hidden", "32", "--proj-dim", "16",
         "--accelerator", "cpu", "--no-progress"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert f"skipped {bad} unreadable file(s)" in result.stderr
    assert (tmp_path / "out" / "backbone.pt").is_file()
