"""Reading image files as people really have them: any PIL mode, transparency, 16-bit, huge or
broken files, photos of any aspect ratio. Every function returns 8-bit RGB pixels, or raises
:class:`UnreadableImage` (one bad file, which a dataset skips) or :class:`DataError` (a path that
cannot be used at all, with the fix).
"""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")



class DataError(ValueError):
    """A dataset that cannot be used; the message names the path and the fix."""



class UnreadableImage(Exception):
    """One image file that cannot be decoded (broken, truncated, not an image, too large)."""



def _to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB; 16-bit and float images are rescaled, not clipped."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        low, high = float(array.min()), float(array.max())
        array = (array - low) / (high - low) * 255 if high > low else np.zeros_like(array)
        image = Image.fromarray(array.astype(np.uint8))
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image)
    return image.convert("RGB")



def _open_rgb(path: str | Path, size: int, whole: bool = False) -> Image.Image:
    """Decode ``path`` to 8-bit RGB, JPEGs at the smallest of 1, 1/2, 1/4 or 1/8 scale that keeps
    the short side (``whole``: the long side) at least ``size``.

    Raises :class:`UnreadableImage` for anything PIL cannot fully decode, including decompression
    bombs (images over ``PIL.Image.MAX_IMAGE_PIXELS``), so a caller can skip the file and count it.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                scale = size / (max(image.size) if whole else min(image.size))
                image.draft("RGB", (math.ceil(image.width * scale), math.ceil(image.height * scale)))
                image.load()
                return _to_rgb(image)
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError, EOFError,
            Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise UnreadableImage(f"{path}: {error}") from error



def load_image(path: str | Path, size: int) -> np.ndarray:
    """Decode ``path`` to a uint8 (size, size, 3) array: the centre square, resized to ``size``
    (how evaluation sees a photo: the resize and centre crop of the usual test transform).

    Cropping before resizing keeps the work at size x size pixels whatever the aspect ratio (a
    1 x 100000 strip would otherwise be upscaled to size x 100000 size first).
    """
    image = _open_rgb(path, size)
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) / 2, (height - side) / 2
    return np.array(image.resize((size, size), Image.Resampling.BILINEAR, box=(left, top, left + side, top + side),
                                   reducing_gap=3.0))



def load_photo(path: str | Path, size: int) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """Decode ``path`` whole, for training crops: its long side resized to ``size`` and centred in a
    uint8 (size, size, 3) square, and where it sits there, ``(left, top, width, height)`` in pixels.

    The square's other rows (or columns) repeat the photo's edge pixels, so that a crop touching
    the edge blends nothing foreign in; the crop sampler keeps every box inside the photo
    (:func:`byol_nb.augment.sample_crop_boxes`), so training crops see all of a landscape photo, not
    only its centre square. Square images come out exactly as :func:`load_image` gives them.
    """
    image = _open_rgb(path, size, whole=True)
    width, height = image.size
    scale = size / max(width, height)
    photo_w, photo_h = max(1, round(width * scale)), max(1, round(height * scale))
    photo = np.array(image.resize((photo_w, photo_h), Image.Resampling.BILINEAR, reducing_gap=3.0))
    left, top = (size - photo_w) // 2, (size - photo_h) // 2
    square = np.pad(photo, ((top, size - photo_h - top), (left, size - photo_w - left), (0, 0)), mode="edge")
    return square, (left, top, photo_w, photo_h)



def find_images(root: str | Path) -> tuple[list[Path], list[int], list[str]]:
    """Image files under ``root`` (recursive, symlink loops are followed once) and their labels.

    The folder is *labeled* when every image sits under a first-level sub-folder and there are at
    least two such folders: the label is the sub-folder's index in sorted order. Otherwise labels
    are -1 and ``classes`` is empty.
    """
    root = Path(root).expanduser()
    if not root.exists():
        raise DataError(f"data path {str(root)!r} does not exist: check the spelling, or pass "
                        f"--data shapes for the built-in dataset")
    if not root.is_dir():
        raise DataError(f"data path {str(root)!r} is a file, not a folder of images")
    files: list[Path] = []
    seen_dirs: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen_dirs:  # a symlink loop, or a second link to a folder already read
            dirnames.clear()
            continue
        seen_dirs.add(real)
        dirnames.sort()
        files.extend(Path(dirpath) / name for name in sorted(filenames)
                     if name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith("."))
    if not files:
        raise DataError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) found under {str(root)!r}: "
                        f"point --data at a folder that holds images, or at their parent folder")
    top_level = [f.relative_to(root).parts for f in files]
    classes = sorted({parts[0] for parts in top_level if len(parts) > 1})
    if len(classes) >= 2 and all(len(parts) > 1 for parts in top_level):
        index = {name: i for i, name in enumerate(classes)}
        return files, [index[parts[0]] for parts in top_level], classes
    return files, [-1] * len(files), []
