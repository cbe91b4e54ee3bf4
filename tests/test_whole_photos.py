"""Training crops come from the whole photo, as RandomResizedCrop on the original would cut them,
not from its centre square: photos are letterboxed in their square and the crop sampler stays
inside each photo's box."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

from byol_nb import datamodule
from byol_nb.augment import AugmentConfig, TwoViewAugment, ViewRecipe, denormalize, sample_crop_boxes
from byol_nb.datasets import ImageFolder
from byol_nb.images import load_image, load_photo

LANDSCAPE = (0.0, 0.125, 1.0, 0.875)  # a 4:3 photo letterboxed in its square


def _write_photos(folder, sizes, seed: int = 0) -> None:
    """Photos of the given (width, height), in two class folders so that the folder is labeled."""
    rng = np.random.default_rng(seed)
    for i, (width, height) in enumerate(sizes):
        path = folder / f"class{i % 2}" / f"{i:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)


def test_a_photo_is_letterboxed_whole_with_its_edges_repeated(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "landscape.png")
    square, box = load_photo(tmp_path / "landscape.png", 16)
    assert square.shape == (16, 16, 3) and box == (0, 2, 16, 12)
    whole = np.array(Image.fromarray(pixels).resize((16, 12), Image.Resampling.BILINEAR, reducing_gap=3.0))
    np.testing.assert_array_equal(square[2:14], whole)  # all of the photo, not its centre square
    np.testing.assert_array_equal(square[:2], np.broadcast_to(whole[:1], (2, 16, 3)))
    np.testing.assert_array_equal(square[14:], np.broadcast_to(whole[-1:], (2, 16, 3)))


def test_a_square_photo_is_the_same_whole_or_centred(tmp_path):
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(tmp_path / "sq.png")
    square, box = load_photo(tmp_path / "sq.png", 16)
    assert box == (0, 0, 16, 16)
    np.testing.assert_array_equal(square, load_image(tmp_path / "sq.png", 16))


def test_crops_stay_inside_the_photo_and_reach_its_sides():
    scale, ratio = (0.08, 1.0), (3 / 4, 4 / 3)
    content = torch.tensor(LANDSCAPE).expand(4000, 4)
    boxes = sample_crop_boxes(4000, scale, ratio, content=content)
    x0, y0, x1, y1 = boxes.unbind(1)
    assert (x0 >= 0).all() and (x1 <= 1 + 1e-6).all() and (y0 >= 0.125 - 1e-6).all() and (y1 <= 0.875 + 1e-6).all()
    area = (x1 - x0) * (y1 - y0) / (1.0 * 0.75)  # as a fraction of the photo, as torchvision draws it
    assert area.min() >= scale[0] - 1e-4 and area.max() <= scale[1] + 1e-4
    aspect = (x1 - x0) / (y1 - y0)
    assert aspect.min() >= ratio[0] - 1e-4 and aspect.max() <= ratio[1] + 1e-4
    # The photo's centre square spans x in [0.125, 0.875]: many crops reach beyond it on each side.
    assert (x0 < 0.125).float().mean() > 0.2 and (x1 > 0.875).float().mean() > 0.2
    # A crop as wide as the photo is possible, as on the original (wider than its centre square).
    assert (x1 - x0).max() > 0.9


def test_a_photo_filling_its_square_gets_the_boxes_it_always_got():
    generator_state = torch.random.get_rng_state()
    plain = sample_crop_boxes(300, (0.08, 1.0), (3 / 4, 4 / 3))
    torch.random.set_rng_state(generator_state)
    filling = torch.tensor([0.0, 0.0, 1.0, 1.0]).expand(300, 4)
    whole = sample_crop_boxes(300, (0.08, 1.0), (3 / 4, 4 / 3), content=filling)
    assert torch.equal(plain, whole)


def test_a_panorama_with_no_fitting_crop_falls_back_to_a_centred_box_of_allowed_aspect():
    content = torch.tensor([0.0, 0.45, 1.0, 0.55]).expand(3, 4)  # 10:1
    boxes = sample_crop_boxes(3, (0.9, 1.0), (3 / 4, 4 / 3), content=content)
    expected = torch.tensor([0.5 - 0.1 * 4 / 3 / 2, 0.45, 0.5 + 0.1 * 4 / 3 / 2, 0.55])
    torch.testing.assert_close(boxes, expected.expand(3, 4))


def test_views_of_letterboxed_photos_show_the_photo_not_the_padding():
    """A grey photo letterboxed on black: views cut inside its box are grey but for the bilinear
    filter's half pixel at the photo's edge (which :func:`load_photo` fills with the photo's own
    edge pixels); the same views without the box are often black."""
    square = torch.zeros(64, 3, 32, 32, dtype=torch.uint8)
    square[:, :, 4:28] = 200  # the photo: rows 4 to 27
    plain = ViewRecipe(blur_p=0.0, solarize_p=0.0)
    augment = TwoViewAugment(AugmentConfig(image_size=16, jitter_p=0.0, grayscale_p=0.0, views=(plain, plain)))
    content = torch.tensor([0.0, 4 / 32, 1.0, 28 / 32]).expand(64, 4)
    grey = 200 / 255
    for view in augment(square, seed=0, content=content):
        pixels = denormalize(view.images)
        assert pixels.min() > grey / 2 and (pixels < grey - 1e-3).float().mean() < 0.01
    uncropped = denormalize(augment(square, seed=0)[0].images)
    assert (uncropped < grey / 2).float().mean() > 0.05


def test_cached_and_streamed_folders_give_the_same_whole_photos(tmp_path):
    _write_photos(tmp_path, [(40, 30), (30, 40), (25, 25), (50, 20)])
    cached = ImageFolder(tmp_path, 16, cache=True, whole_photos=True)
    streamed = ImageFolder(tmp_path, 16, cache=False, whole_photos=True)
    for (a_image, a_label, a_box), (b_image, b_label, b_box) in zip(cached, streamed):
        assert torch.equal(a_image, b_image) and a_label == b_label and torch.equal(a_box, b_box)
    assert torch.equal(cached[3][2], torch.tensor([0.0, 5 / 16, 1.0, 11 / 16]))  # 50 x 20 -> 16 x 6 (rounded)
    assert len(ImageFolder(tmp_path, 16, cache=True)[0]) == 2  # the centre squares: (image, label)


def test_training_cuts_crops_from_whole_photos_and_the_monitor_sees_centre_squares(tmp_path):
    _write_photos(tmp_path / "train", [(40, 30)] * 8)
    _write_photos(tmp_path / "test", [(40, 30)] * 4, seed=1)
    module = datamodule.SSLDataModule(str(tmp_path / "train"), str(tmp_path / "test"), 8, batch_size=4)
    module.prepare_data()
    module.setup()
    images, labels, content = next(iter(module.train_dataloader()))
    assert images.shape == (4, 3, 16, 16)  # decoded at twice the view size
    torch.testing.assert_close(content, torch.tensor([0.0, 2 / 16, 1.0, 14 / 16]).expand(4, 4))
    assert all(len(batch) == 2 for batch in module.val_dataloader()[0])


def test_device_batches_carry_the_photos_boxes_like_a_dataloader(tmp_path):
    _write_photos(tmp_path, [(40, 30), (30, 40), (25, 25), (50, 20)] * 2)
    dataset = ImageFolder(tmp_path, 16, cache=True, whole_photos=True)
    batches = []
    for make in (lambda s: DataLoader(dataset, batch_size=2, sampler=s, drop_last=True),
                 lambda s: datamodule.DeviceBatches(dataset, s, 2, torch.device("cpu"))):
        batches.append(list(make(datamodule.ResumableSampler(dataset, seed=3))))
    for a, b in zip(*batches):
        assert len(a) == len(b) == 3 and all(torch.equal(x, y) for x, y in zip(a, b))
