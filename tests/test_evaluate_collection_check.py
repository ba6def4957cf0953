"""`grace-hf evaluate` refuses a prepared dataset that names the images it ranks otherwise than the model does (the
same file names in another collection, another identifier kind, an edited identifiers.json), before the model is
loaded and with nothing written; and still takes every dataset that belongs to the model: its own, the original
collection's or the added images' after add-images, `--split val`, one without identifiers.json."""

import json
import shutil
from pathlib import Path

import pytest

from grace_hf.commands.cli import main as cli_main
from grace_hf.identifiers import IDENTIFIERS_FILE
from tests.helpers import COLLECTION, QUERIES, reset_accelerate, write_prepared

ADDED = ["images/100.png", "images/101.png"]  # the images a grown copy of the tiny model learned later


def _evaluate(model, data, output, *extra) -> int:
    argv = ["evaluate", "--model", str(model), "--data", str(data), "--output-dir", str(output)]
    try:
        return cli_main([*argv, "--batch-size", "8", "--num-threads", "1", *extra])
    finally:
        reset_accelerate()


def _edit_identifiers(directory: Path, edit) -> Path:
    path = directory / IDENTIFIERS_FILE
    index = json.loads(path.read_text())
    edit(index)
    path.write_text(json.dumps(index))
    return path


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    """A hand-made prepared dataset of the tiny model's own images and identifiers (queries over its collection)."""
    queries = [f"{query} number {n}" for n, query in enumerate(QUERIES * 3)]
    gold = [COLLECTION[n % len(COLLECTION)] for n in range(len(queries))]
    return write_prepared(tmp_path_factory.mktemp("collection-check") / "prepared", queries, gold)


def _swap_two(index: dict) -> None:
    """Two collection images trade identifiers: the same file names, named otherwise."""
    images = index["images"]
    images[COLLECTION[0]], images[COLLECTION[1]] = images[COLLECTION[1]], images[COLLECTION[0]]


def _unknown_image(index: dict) -> None:
    index["images"]["images/999.png"] = ["9 9 9"]
    index["collection"].append("images/999.png")


def _other_kind(index: dict) -> None:
    index["kind"] = "string"  # single digits read the same as numeric ones: only the kind tells them apart


@pytest.mark.parametrize(
    "edit, message",
    [
        (_swap_two, "image 'images/004.png' is '5' in {data} but '4' in {model} (2 of the 8 images the test split"),
        (_unknown_image, "image 'images/999.png' ('9 9 9' in {data}) is not in {model} (1 of the 9 images"),
        (_other_kind, "{data} holds string identifiers, {model} numeric ones"),
    ],
    ids=["swapped-identifiers", "image-the-model-lacks", "other-kind"],
)
def test_identifiers_other_than_the_models_are_refused(tiny_model, tiny_data, tmp_path, capsys, edit, message):
    model = tiny_model()
    data = shutil.copytree(tiny_data, tmp_path / "data")
    data_file = _edit_identifiers(data, edit)
    assert _evaluate(model, data, tmp_path / "eval") == 2
    err = capsys.readouterr().err
    assert f"--data {data} was not prepared for --model {model}: " in err
    assert message.format(data=data_file, model=model / IDENTIFIERS_FILE) in err
    assert "Traceback" not in err and not (tmp_path / "eval").exists()


@pytest.fixture
def grown_model(tiny_model, tmp_path) -> Path:
    """The tiny model as add-images leaves it: the same identifiers for its images, two more images in its
    collection (numeric identifiers need no new token)."""
    model = shutil.copytree(tiny_model(), tmp_path / "grown")

    def grow(index: dict) -> None:
        index["images"].update({key: [" ".join(key[-7:-4])] for key in ADDED})
        index["collection"] += ADDED

    _edit_identifiers(model, grow)
    return model


def test_the_models_own_and_grown_collections_evaluate_and_a_renamed_image_does_not(
    tiny_model, grown_model, tiny_data, tmp_path
):
    # the dataset the model was trained on
    assert _evaluate(tiny_model(), tiny_data, tmp_path / "own") == 0
    assert json.loads((tmp_path / "own" / "metrics.json").read_text())["num_candidates"] == len(COLLECTION)
    # after add-images: the original collection's dataset ranks the old images, the added rows' dataset (the model's
    # whole identifier index, as add-images writes it into added_images/) the grown collection
    assert _evaluate(grown_model, tiny_data, tmp_path / "original") == 0
    assert json.loads((tmp_path / "original" / "metrics.json").read_text())["num_candidates"] == len(COLLECTION)
    added = shutil.copytree(tiny_data, tmp_path / "added_images")
    shutil.copy(grown_model / IDENTIFIERS_FILE, added / IDENTIFIERS_FILE)
    assert _evaluate(grown_model, added, tmp_path / "added") == 0
    assert json.loads((tmp_path / "added" / "metrics.json").read_text())["num_candidates"] == len(COLLECTION) + 2
    # one of the old images renamed in the original collection's dataset: refused, whatever the model grew
    renamed = shutil.copytree(tiny_data, tmp_path / "renamed")
    _edit_identifiers(renamed, lambda index: index["images"].update({COLLECTION[-1]: ["1 0 0"]}))
    assert _evaluate(grown_model, renamed, tmp_path / "refused") == 2
    assert not (tmp_path / "refused").exists()


def test_the_same_file_names_in_another_collection_are_refused(trained_model, prepared, tmp_path, capsys):
    """The trained model's synthetic set and another seed's (or another kind's) share every file name."""
    model, data, _ = trained_model
    other_collection = prepared("structured", num_images=60, seed=1)
    other_kind = prepared("numeric", num_images=60)
    for split in ("test", "val"):
        for other in (other_collection, other_kind):
            assert _evaluate(model, other, tmp_path / "eval", "--split", split) == 2
            err = capsys.readouterr().err
            assert f"--data {other} was not prepared for --model {model}: " in err
            assert f"{other / IDENTIFIERS_FILE}" in err and f"{model / IDENTIFIERS_FILE}" in err
            assert ("image '" in err) == (other is other_collection) and "Traceback" not in err
            assert not (tmp_path / "eval").exists()
    # its own dataset; and a dataset without identifiers.json is not checked (the val split reads none)
    assert _evaluate(model, data, tmp_path / "test", "--limit", "4") == 0
    bare = shutil.copytree(data, tmp_path / "bare")
    (bare / IDENTIFIERS_FILE).unlink()
    assert _evaluate(model, bare, tmp_path / "val", "--split", "val", "--limit", "4") == 0


@pytest.mark.parametrize("command", ["retrieve", "serve"])
def test_retrieve_and_serve_refuse_data_of_another_collection(
    tiny_model, tiny_data, tmp_path, capsys, monkeypatch, command
):
    """`retrieve --data` and `serve --data` rank the dataset's test images with the model as evaluate does: the same
    refusal, before the model loads (or the app starts)."""
    import grace_hf.serving.app

    def never_served(*args, **kwargs):
        raise AssertionError("serve built its app on a dataset of another collection")

    monkeypatch.setattr(grace_hf.serving.app, "build_app", never_served)  # a missing check fails, never serves
    model = tiny_model()
    data = shutil.copytree(tiny_data, tmp_path / "data")
    data_file = _edit_identifiers(data, _swap_two)
    argv = [command, "--model", str(model), "--data", str(data), "--num-threads", "1"]
    assert cli_main(argv + (["--num-queries", "2"] if command == "retrieve" else [])) == 2
    err = capsys.readouterr().err
    assert f"--data {data} was not prepared for --model {model}: " in err
    assert f"is '5' in {data_file} but '4' in {model / IDENTIFIERS_FILE}" in err and "Traceback" not in err
