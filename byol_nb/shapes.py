"""The built-in dataset: coloured shapes on cluttered, textured backgrounds.

It exists so that every lesson and test runs offline and so that learning is *measurable*: colour,
size, position, rotation and background are nuisances that the augmentations teach the network to
ignore, and the shape is the label. Each image comes with a per-pixel mask (0 = background,
1 + class index = shape) for the segmentation probe.

Layout written by :func:`generate_shapes`::

    ROOT/train/<class>/00000.png      RGB image
    ROOT/test/<class>/00000.png
    ROOT/masks/train/<class>/00000.png  uint8 mask, same name as its image
    ROOT/masks/test/<class>/00000.png

Generation is deterministic from the seed: the same call always writes the same pixels.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from byol_nb.paths import DATA

SHAPE_CLASSES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "ring")
DEFAULT_ROOT = DATA / "shapes"
_SUPERSAMPLE = 4  # draw large, then downsample: smooth edges without an anti-aliasing library
# Size and position vary within what two views teach a network to ignore. The views' crops (a
# quarter of the image to all of it with --data shapes) zoom the shape by at most 2x and shift it
# within the view; a nuisance that varies more than the views do is one they cannot teach the network to
# ignore: with shapes of any size anywhere in the image, trained features kept size and position,
# and two images of one class stayed as far apart as two images alike in those. The position
# mattered most.
RADIUS_RANGE = (0.3, 0.4)  # circumradius, as a fraction of the image side
CENTRE_JITTER = 0.1  # the centre lies within this fraction of the side from the middle, both axes
VERSION = 3  # of the generator: a dataset written by another version is written again


def _polygon(kind: str, cx: float, cy: float, radius: float, angle: float) -> list[tuple[float, float]]:
    """Vertices of a shape centred at (cx, cy) and rotated by ``angle`` radians."""
    if kind == "square":
        points = [(math.cos(a), math.sin(a)) for a in np.arange(4) * math.pi / 2 + math.pi / 4]
    elif kind == "triangle":
        points = [(math.cos(a), math.sin(a)) for a in np.arange(3) * 2 * math.pi / 3 - math.pi / 2]
    elif kind == "star":
        points = [
            (r * math.cos(a), r * math.sin(a))
            for i, (a, r) in enumerate(zip(np.arange(10) * math.pi / 5 - math.pi / 2, [1.0, 0.45] * 5))
        ]
    elif kind == "cross":
        w = 0.33
        points = [(w, 1), (w, w), (1, w), (1, -w), (w, -w), (w, -1),
                  (-w, -1), (-w, -w), (-1, -w), (-1, w), (-w, w), (-w, 1)]
    else:
        raise ValueError(f"no polygon for shape {kind!r}")
    cos, sin = math.cos(angle), math.sin(angle)
    return [(cx + radius * (x * cos - y * sin), cy + radius * (x * sin + y * cos)) for x, y in points]


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A cluttered background (float, HxWx3): a colour gradient under "dead leaves" (many small
    overlapping rectangles and discs of random colours), plus pixel noise.

    The clutter changes from place to place, so two crops of one image share little of it: the
    shape is what the two views have in common, which is what makes learning measurable here.
    A global pattern (stripes, say) would be shared by every crop and learned instead of the shape.
    """
    yy, xx = np.mgrid[0:size, 0:size] / size
    c1, c2 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    theta = rng.uniform(0, 2 * math.pi)
    ramp = np.clip(0.5 + (np.cos(theta) * (xx - 0.5) + np.sin(theta) * (yy - 0.5)), 0, 1)
    img = c1 * (1 - ramp[..., None]) + c2 * ramp[..., None]
    for _ in range(rng.integers(15, 40)):
        x0, y0 = rng.uniform(-0.1, 1.0, 2) * size
        w, h = rng.uniform(0.05, 0.25, 2) * size
        colour = rng.uniform(0, 255, 3)
        if rng.random() < 0.5:
            inside = (xx * size >= x0) & (xx * size < x0 + w) & (yy * size >= y0) & (yy * size < y0 + h)
        else:
            inside = ((xx * size - x0) / w) ** 2 + ((yy * size - y0) / h) ** 2 < 1
        img[inside] = colour
    return img + rng.normal(0, rng.uniform(5, 20), img.shape)


def render_shape_image(rng: np.random.Generator, label: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """One sample: (uint8 image HxWx3, uint8 mask HxW with 0 = background, 1 + label = shape)."""
    big = size * _SUPERSAMPLE
    canvas = Image.fromarray(np.clip(_background(rng, size), 0, 255).astype(np.uint8)).resize((big, big))
    mask = Image.new("L", (big, big), 0)
    draw, mask_draw = ImageDraw.Draw(canvas), ImageDraw.Draw(mask)

    for _ in range(rng.integers(3, 9)):  # clutter: thin lines and dots that belong to no class
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        x0, y0, x1, y1 = (float(v) for v in rng.uniform(0, big, 4))
        if rng.random() < 0.5:
            draw.line((x0, y0, x1, y1), fill=colour, width=int(rng.integers(1, 3)) * _SUPERSAMPLE)
        else:
            r = rng.uniform(1, 3) * _SUPERSAMPLE
            draw.ellipse((x0 - r, y0 - r, x0 + r, y0 + r), fill=colour)

    kind = SHAPE_CLASSES[label]
    radius = rng.uniform(*RADIUS_RANGE) * big
    cx, cy = (float(v) for v in (0.5 + rng.uniform(-CENTRE_JITTER, CENTRE_JITTER, 2)) * big)
    colour = tuple(int(c) for c in rng.integers(0, 256, 3))
    box = (cx - radius, cy - radius, cx + radius, cy + radius)
    for target, fill in ((draw, colour), (mask_draw, 1 + label)):
        if kind == "circle":
            target.ellipse(box, fill=fill)
        elif kind == "ring":
            target.ellipse(box, outline=fill, width=max(1, int(radius * 0.35)))
        else:
            target.polygon(_polygon(kind, cx, cy, radius, rng.uniform(0, 2 * math.pi)), fill=fill)

    image = np.asarray(canvas.resize((size, size), Image.Resampling.LANCZOS))
    return image, np.asarray(mask.resize((size, size), Image.Resampling.NEAREST))


def generate_shapes(
    root: str | Path = DEFAULT_ROOT,
    train_per_class: int = 500,
    test_per_class: int = 100,
    size: int = 64,
    seed: int = 0,
) -> Path:
    """Write the built-in dataset under ``root`` (skipped when an identical one is already there).

    A small ``meta.json`` records the arguments, so a call with other arguments regenerates.
    """
    root = Path(root)
    meta = {"train_per_class": train_per_class, "test_per_class": test_per_class, "size": size,
            "seed": seed, "classes": list(SHAPE_CLASSES), "version": VERSION}
    meta_file = root / "meta.json"
    if meta_file.exists() and json.loads(meta_file.read_text()) == meta:
        return root
    for split, per_class, split_seed in (("train", train_per_class, seed), ("test", test_per_class, seed + 1)):
        rng = np.random.default_rng(split_seed)
        for label, name in enumerate(SHAPE_CLASSES):
            image_dir, mask_dir = root / split / name, root / "masks" / split / name
            image_dir.mkdir(parents=True, exist_ok=True)
            mask_dir.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                image, mask = render_shape_image(rng, label, size)
                Image.fromarray(image).save(image_dir / f"{i:05d}.png")
                Image.fromarray(mask).save(mask_dir / f"{i:05d}.png")
    meta_file.write_text(json.dumps(meta))
    return root


def ensure_shapes(root: str | Path = DEFAULT_ROOT) -> Path:
    """The built-in dataset at ``root``: kept as it is when this version of the generator wrote it
    (at any size: the lessons' FAST data is a small one), else written with the defaults."""
    meta_file = Path(root) / "meta.json"
    if meta_file.exists() and json.loads(meta_file.read_text()).get("version") == VERSION:
        return Path(root)
    return generate_shapes(root)


def mask_path(image_path: str | Path) -> Path:
    """The mask file that belongs to a built-in image: ROOT/<split>/<cls>/f -> ROOT/masks/<split>/<cls>/f."""
    image_path = Path(image_path)
    split_dir = image_path.parent.parent
    return split_dir.parent / "masks" / split_dir.name / image_path.parent.name / image_path.name


if __name__ == "__main__":
    print(generate_shapes())
