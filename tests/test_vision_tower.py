"""A Flamingo vision tower started from an open_clip image encoder (`vision_tower` in a recipe)."""

import json

import pytest
import torch
from safetensors.torch import save_file

from grace_hf.dense.model import DualEncoder
from grace_hf.errors import GraceInputError
from grace_hf.models.flamingo import FlamingoForConditionalGeneration
from grace_hf.training.args import ModelArguments
from grace_hf.training.modeling import build_model_and_processor

TEXTS = ["a red star at the top", "id 1 2 3", "a blue circle in the middle"]


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory):
    """A `baseline-clip`-style directory holding a tiny open_clip encoder with non-default weights."""
    torch.manual_seed(0)
    encoder = DualEncoder.from_config("tiny")
    with torch.no_grad():
        for parameter in encoder.model.visual.parameters():
            parameter.add_(0.01 * torch.randn_like(parameter))
    directory = tmp_path_factory.mktemp("dense")
    encoder.save(directory)
    return directory, encoder


def _tower_matches(model: FlamingoForConditionalGeneration, encoder: DualEncoder) -> None:
    tower = model.model.vision_model.state_dict()
    source = encoder.model.visual.state_dict()
    assert set(tower) == set(source) - {"ln_post.weight", "ln_post.bias", "proj"}
    for key, value in tower.items():
        torch.testing.assert_close(value, source[key], msg=key)


def test_tower_from_a_baseline_directory_is_copied_frozen_and_saved(encoder_dir, tmp_path):
    directory, encoder = encoder_dir
    model, processor = build_model_and_processor(
        ModelArguments(model_preset="tiny", vision_tower=str(directory)), TEXTS
    )
    assert model.config.vision_config["image_size"] == encoder.config["vision_cfg"]["image_size"] == 64
    assert processor.image_size == 64
    _tower_matches(model, encoder)
    assert not any(parameter.requires_grad for parameter in model.model.vision_model.parameters())
    # the model directory is self-contained: it loads with the tower's weights and without the encoder's directory
    model.save_pretrained(tmp_path / "model")
    loaded = FlamingoForConditionalGeneration.from_pretrained(tmp_path / "model")
    _tower_matches(loaded, encoder)


def test_tower_from_an_open_clip_config_and_weights_file(encoder_dir, tmp_path):
    directory, encoder = encoder_dir
    config = tmp_path / "tiny_clip.json"
    config.write_text(json.dumps(encoder.config))
    weights = tmp_path / "weights.safetensors"
    save_file({key: value.contiguous() for key, value in encoder.model.state_dict().items()}, str(weights))
    args = ModelArguments(model_preset="tiny", vision_tower=str(config), vision_tower_weights=str(weights))
    model, _ = build_model_and_processor(args, TEXTS)
    _tower_matches(model, encoder)
    fresh = build_model_and_processor(ModelArguments(model_preset="tiny"), TEXTS)[0]  # a random tower differs
    assert not torch.equal(
        model.model.vision_model.conv1.weight, fresh.model.vision_model.conv1.weight.to(torch.float32)
    )


def test_tower_that_does_not_fit_is_refused(encoder_dir, tmp_path):
    directory, encoder = encoder_dir
    other = dict(encoder.config, vision_cfg={**encoder.config["vision_cfg"], "width": 32, "head_width": 16})
    config = tmp_path / "other.json"
    config.write_text(json.dumps(other))
    with pytest.raises(GraceInputError, match="other.json"):
        args = ModelArguments(
            model_preset="tiny",
            vision_tower=str(config),
            vision_tower_weights=str(directory / "open_clip_model.safetensors"),
        )
        build_model_and_processor(args, TEXTS)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"model": "some/model", "vision_tower": "dense"}, "keeps its own tower"),
        ({"model_preset": "tiny", "vision_tower_weights": "w.safetensors"}, "needs vision_tower"),
    ],
)
def test_bad_vision_tower_arguments(kwargs, message):
    with pytest.raises(GraceInputError, match=message):
        ModelArguments(**kwargs)


def test_a_repeated_image_is_encoded_once_with_the_same_latents(encoder_dir):
    """The t2id pad image repeated over a batch gives the latents each copy would get alone."""
    directory, _ = encoder_dir
    model, processor = build_model_and_processor(
        ModelArguments(model_preset="tiny", vision_tower=str(directory)), TEXTS
    )
    model.eval()
    pixels = processor(text=["<image>a"] * 3, images=[processor.blank_image()] * 3, return_tensors="pt")[
        "pixel_values"
    ]
    with torch.no_grad():
        shared = model.model.get_image_features(pixels)  # (3, 1, L, D)
        alone = model.model.get_image_features(pixels[:1])
    assert shared.shape[0] == 3
    for row in shared:
        torch.testing.assert_close(row, alone[0])


@pytest.mark.parametrize(
    ("source", "weights", "message"),
    [
        ("nowhere", None, "neither a `baseline-clip` directory"),
        ("ViT-B-32", None, "needs its weights"),
        ("ViT-B-32", "missing.safetensors", "not found: missing.safetensors"),
    ],
)
def test_a_vision_tower_that_cannot_be_loaded_is_named(source, weights, message):
    args = ModelArguments(model_preset="tiny", vision_tower=source, vision_tower_weights=weights)
    with pytest.raises(GraceInputError, match=f"vision_tower {source}: .*{message}"):
        build_model_and_processor(args, TEXTS)
