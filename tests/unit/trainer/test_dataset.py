"""A kohya dataset folder is read with its captions, concepts and repeats."""

from __future__ import annotations

import pytest
import torch

from services.training.worker.trainer import InvalidDataset, read_dataset
from services.training.worker.trainer.dataset import load_pixels
from tests.unit.trainer.conftest import write_image


def test_captions_concepts_and_repeats(dataset):
    images = {image.path.name: image for image in read_dataset(dataset)}
    assert set(images) == {"cat.png", "dog.jpg", "red.png", "blue.webp"}
    assert (images["cat.png"].caption, images["cat.png"].repeats, images["cat.png"].folder) == (
        "a photo of a cat",
        1,
        "",
    )
    assert (images["red.png"].caption, images["red.png"].repeats) == ("red house, sky", 2)
    # no caption file: the concept of its `<repeats>_<concept>` folder is the caption
    assert (images["blue.webp"].caption, images["blue.webp"].repeats, images["blue.webp"].folder) == (
        "concept",
        2,
        "2_concept",
    )


def test_nested_folders_hidden_files_and_caption_extension(tmp_path):
    write_image(tmp_path / "mydata" / "10_technic" / "a.png", 1)
    (tmp_path / "mydata" / "10_technic" / "a.caption").write_text("\n  first line \nsecond line\n")
    write_image(tmp_path / ".cache" / "b.png", 2)
    write_image(tmp_path / "__MACOSX" / "c.png", 3)
    write_image(tmp_path / "0_left_out" / "d.png", 4)
    (tmp_path / "notes.txt").write_text("not an image")
    [image] = read_dataset(tmp_path, caption_extension=".caption")
    assert (image.path.name, image.caption, image.repeats, image.folder) == ("a.png", "first line", 10, "10_technic")


def test_an_empty_dataset_is_refused(tmp_path):
    (tmp_path / "readme.txt").write_text("no images here")
    with pytest.raises(InvalidDataset, match=r"dataset: no images \(png, jpg, jpeg, webp, bmp\) were found"):
        read_dataset(tmp_path)
    with pytest.raises(InvalidDataset, match="is not a folder"):
        read_dataset(tmp_path / "missing")


def test_images_are_scaled_to_cover_and_centre_cropped(tmp_path):
    wide = write_image(tmp_path / "wide.png", 1, size=(160, 64))
    [image] = read_dataset(tmp_path)
    pixels, enlarged = load_pixels(image, (64, 64))
    assert pixels.shape == (3, 64, 64) and not enlarged
    assert pixels.min() >= -1 and pixels.max() <= 1
    pixels, enlarged = load_pixels(image, (128, 96))
    assert pixels.shape == (3, 96, 128) and enlarged
    wide.write_bytes(b"not a png")
    with pytest.raises(InvalidDataset, match="wide.png could not be read as an image"):
        load_pixels(image, (64, 64))
    assert torch.is_tensor(pixels)
