"""Training views of images: flip, crop and JPEG, each a pure function of (seed, epoch, row), and their plumbing."""

import numpy as np
import pytest
from PIL import Image

from grace_hf.errors import GraceInputError
from grace_hf.training.args import DataArguments
from grace_hf.training.sampling import EpochRows
from grace_hf.training.views import ImageViews, flip_decision


def _image(size=(32, 24)):
    """Left half red, right half blue, with a gradient so that crops differ."""
    pixels = np.zeros((size[1], size[0], 3), dtype=np.uint8)
    pixels[:, : size[0] // 2, 0] = 255
    pixels[:, size[0] // 2 :, 2] = 255
    pixels[:, :, 1] = np.linspace(0, 255, size[1], dtype=np.uint8)[:, None]
    return Image.fromarray(pixels)


def _flipped_row(seed=0, epoch=0):
    return next(i for i in range(100) if flip_decision(seed, epoch, i))


def test_flip_mirrors_the_rows_it_chooses():
    image, views = _image(), ImageViews(flip=True)
    flipped, kept = _flipped_row(), next(i for i in range(100) if not flip_decision(0, 0, i))
    assert np.array_equal(np.asarray(views(image, 0, 0, flipped)), np.asarray(image)[:, ::-1])
    assert np.array_equal(np.asarray(views(image, 0, 0, kept)), np.asarray(image))
    assert 30 < sum(flip_decision(0, 0, i) for i in range(100)) < 70


def test_crop_and_jpeg_keep_the_size_change_the_pixels_and_repeat_exactly():
    image = _image()
    views = ImageViews(crop_scale=0.6, jpeg_quality=30)
    view = views(image, seed=1, epoch=2, index=3)
    assert view.size == image.size and view.mode == "RGB"
    assert not np.array_equal(np.asarray(view), np.asarray(image))
    assert np.array_equal(np.asarray(view), np.asarray(views(image, seed=1, epoch=2, index=3)))
    others = [np.asarray(views(image, seed=1, epoch=e, index=3)) for e in range(3, 8)]
    assert any(not np.array_equal(other, np.asarray(view)) for other in others)


def test_the_crop_keeps_at_least_its_scale_of_each_side():
    # a one-pixel white frame: a crop that keeps the whole width keeps both vertical edges
    pixels = np.zeros((40, 40, 3), dtype=np.uint8)
    pixels[:, 0] = pixels[:, -1] = 255
    image = Image.fromarray(pixels)
    for epoch in range(20):
        view = np.asarray(ImageViews(crop_scale=1.0)(image, 0, epoch, 0))
        assert np.array_equal(view, pixels)
    # at scale 0.5 the centre column (x = 20) is in every crop: a crop of >= 20 of 40 columns reaches it
    pixels = np.zeros((40, 40, 3), dtype=np.uint8)
    pixels[:, 19:21] = 255
    for epoch in range(20):
        view = np.asarray(ImageViews(crop_scale=0.5)(Image.fromarray(pixels), 0, epoch, 0))
        assert view.max() > 100, epoch


def test_no_change_is_the_image_itself_in_rgb():
    image = _image().convert("L")
    views = ImageViews()
    assert not views.changes_images
    assert np.array_equal(np.asarray(views(image, 0, 0, 0)), np.asarray(image.convert("RGB")))


def test_an_original_share_of_the_rows_keeps_its_pixels_and_the_others_their_views():
    image, changed = _image(), ImageViews(crop_scale=0.6, jpeg_quality=30)
    mixed = ImageViews(crop_scale=0.6, jpeg_quality=30, original_share=0.25)
    exact = [np.array_equal(np.asarray(mixed(image, 0, 0, i)), np.asarray(image)) for i in range(400)]
    assert 70 < sum(exact) < 130
    for i in range(400):  # a row not kept exact gets the very view it gets without the share
        if not exact[i]:
            assert np.array_equal(np.asarray(mixed(image, 0, 0, i)), np.asarray(changed(image, 0, 0, i)))
    always = ImageViews(crop_scale=0.6, jpeg_quality=30, original_share=1)
    assert all(
        np.array_equal(np.asarray(always(image, 0, e, i)), np.asarray(image)) for e in range(3) for i in range(9)
    )


@pytest.mark.parametrize(
    "fields",
    [{"crop_scale": 0}, {"crop_scale": 1.5}, {"jpeg_quality": 96}, {"jpeg_quality": -1}, {"original_share": 1.5}],
)
def test_bad_settings_are_refused(fields):
    with pytest.raises(ValueError):
        ImageViews(**fields)


def test_bad_training_flags_are_a_clear_input_error(tmp_path):
    with pytest.raises(GraceInputError, match="i2id views: crop scale"):
        DataArguments(data=str(tmp_path), i2id_crop_scale=0)
    with pytest.raises(GraceInputError, match="i2id views: original share"):
        DataArguments(data=str(tmp_path), i2id_original_share=-0.1)
    views = DataArguments(
        data=str(tmp_path), i2id_flip=False, i2id_crop_scale=0.8, i2id_jpeg_quality=50, i2id_original_share=0.2
    ).i2id_views()
    assert views == ImageViews(flip=False, crop_scale=0.8, jpeg_quality=50, original_share=0.2)


def test_epoch_rows_give_each_epoch_its_view():
    import datasets

    rows = datasets.Dataset.from_dict({"image": [_image()], "identifier": ["1 2"]}).cast_column(
        "image", datasets.Image()
    )
    views = ImageViews(crop_scale=0.5)
    epoch_rows = EpochRows(rows, seed=4, views=views)
    for epoch in range(3):
        expected = views(rows[0]["image"], 4, epoch, 0)
        assert np.array_equal(np.asarray(epoch_rows[0, epoch]["image"]), np.asarray(expected))
    assert np.array_equal(np.asarray(EpochRows(rows, seed=4)[0, 0]["image"]), np.asarray(rows[0]["image"]))
    assert epoch_rows[0, 0]["identifier"] == "1 2"


def test_i2id_batches_carry_the_views_and_captions_only_the_flip(prepared):
    from grace_hf.data.prepared import load_prepared
    from grace_hf.models.flamingo import FlamingoProcessor
    from grace_hf.training.data import TaskStream, stream_batches

    data = prepared("numeric")
    rows = load_prepared(data)["i2id"].select(range(4))
    processor = FlamingoProcessor.from_texts(["id 1 2", "caption:a circle"], image_size=16, vocab_size=300)
    plain = DataArguments(data=str(data), i2id_flip=False)
    changed = DataArguments(data=str(data), i2id_flip=False, i2id_crop_scale=0.5, i2id_jpeg_quality=20)

    def first_pixels(name, data_args, columns):
        stream = TaskStream(name, rows.rename_columns(columns), batch_size=4, weight=1.0)
        return next(stream_batches(stream, processor, data_args, seed=0, rank=0, world_size=1, start_step=0))[
            "pixel_values"
        ]

    i2id = {"identifier": "identifier"}
    assert not np.allclose(first_pixels("i2id", plain, i2id), first_pixels("i2id", changed, i2id))
    caption = {"identifier": "caption"}
    assert np.allclose(first_pixels("caption", plain, caption), first_pixels("caption", changed, caption))
