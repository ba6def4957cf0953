"""Plain helpers the test modules share; the fixtures built on them (`synthetic`, `prepared`, `tiny_model`,
`trained_model`) are in conftest.py. Test modules import from here, never from each other."""

import copy
import json
from pathlib import Path

import pytest
import torch
import yaml
from accelerate.state import AcceleratorState, GradientState, PartialState
from datasets import Dataset, DatasetDict, Features, Image, Value
from PIL import Image as PILImage

from benchmarks.synthetic_split import write_part
from benchmarks.tiny_model import save_random_model_dir
from grace_hf.commands import train as train_command
from grace_hf.data.synthetic import ORACLE_PSEUDO_QUERIES_JSON, SYNTHETIC_JSON, write_synthetic
from grace_hf.identifiers import IdentifierIndex
from grace_hf.models.flamingo import FlamingoConfig, FlamingoForConditionalGeneration
from grace_hf.training.preparation import prepare

# a tiny random model directory: 12 images, the last 8 the collection, and three queries
IMAGES = [f"images/{n:03d}.png" for n in range(12)]
QUERIES = ["a red square", "two blue circles on a green field", "a small yellow triangle"]
COLLECTION = IMAGES[4:]

# a dense dual encoder smaller than the `tiny` preset: one layer per tower, so a run takes about a second
MICRO = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "patch_size": 16, "layers": 1, "width": 32, "head_width": 16},
    "text_cfg": {"context_length": 24, "width": 32, "heads": 2, "layers": 1},
}

# add-images: one 30-image synthetic set, a model trained on the first 22, the last 8 (2 test images) added
NUM_IMAGES, NUM_OLD = 30, 22
KIND_OPTIONS = {
    "structured": {"pixel_features": True, "k": 3, "leaf_size": 4},
    # 2 codes of at most 11 of the 22 old images: every new image takes a position after them, a new token
    "rq": {"pixel_features": True, "levels": 1, "codebook_size": 2},
}


def tiny_flamingo(
    vocab_size: int = 64, seed: int = 0, open_gates: bool = True, config: FlamingoConfig | None = None
) -> FlamingoForConditionalGeneration:
    """The `tiny` preset (or `config`) with random weights, in eval mode; `open_gates` sets the cross-attention gates
    (0 at the start, which would hide the images from the decoder) to 0.7."""
    config = copy.deepcopy(config) or FlamingoConfig.from_preset("tiny", text_config={"vocab_size": vocab_size})
    torch.manual_seed(seed)
    model = FlamingoForConditionalGeneration(config)
    if open_gates:
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith("_gate"):
                    param.fill_(0.7)
    return model.eval()


def build_tiny_model_dir(directory: Path, kind: str = "numeric", query_image: str = "none", seed: int = 0) -> Path:
    """A complete GRACE model directory with random weights over `IMAGES`: model, processor, identifiers.json,
    grace_config.json."""
    if kind == "numeric":  # identifiers share prefixes and one is a prefix of others ("1" / "1 0", "1 1")
        images = {key: [" ".join(str(n))] for n, key in enumerate(IMAGES)}
    else:  # semantic: several identifiers per image, of different lengths
        images = {key: [f"shape {n}", f"a picture of shape number {n}"] for n, key in enumerate(IMAGES)}
    save_random_model_dir(directory, images, QUERIES, COLLECTION, kind=kind, seed=seed)
    (directory / "grace_config.json").write_text(json.dumps({"query_image": query_image, "identifier_kind": kind}))
    return directory


def write_prepared(directory: Path, queries: list[str], gold: list[str], collection=COLLECTION) -> Path:
    """A hand-made prepared dataset over `IMAGES` as `grace-hf prepare` writes it (i2id, t2id, queries +
    identifiers.json), numeric identifiers like `build_tiny_model_dir`'s."""
    images = [PILImage.new("RGB", (16, 16), (20 * n, 100, 200 - 10 * n)) for n in range(len(IMAGES))]
    identifiers = [" ".join(str(n)) for n in range(len(IMAGES))]
    text = Value("string")
    DatasetDict(
        {
            "i2id": Dataset.from_dict(
                {"image": images, "image_key": IMAGES, "identifier": identifiers},
                features=Features({"image": Image(), "image_key": text, "identifier": text}),
            ),
            "t2id": Dataset.from_dict({"query": QUERIES, "image_key": IMAGES[:3], "identifier": identifiers[:3]}),
            "queries": Dataset.from_dict({"query": queries, "image_key": gold}),
        }
    ).save_to_disk(str(directory))
    IdentifierIndex("numeric", {k: [i] for k, i in zip(IMAGES, identifiers)}, [], list(collection)).save(directory)
    return directory


def tiny_recipe(data, output_dir, **overrides) -> dict:
    """A recipe that trains the tiny preset for a few steps on a small synthetic set."""
    recipe = {
        "model_preset": "tiny",
        "tokenizer_vocab_size": 300,
        "data": str(data),
        "output_dir": str(output_dir),
        "max_steps": 6,
        "batch_size_i2id": 4,
        "batch_size_t2id": 8,
        "learning_rate": 2e-3,
        "warmup_steps": 1,
        "logging_steps": 1,
        "save_steps": 2,
        "save_total_limit": 0,
        "eval_num_queries": 4,
        "num_beams": 2,
        "report_to": "none",
        "seed": 0,
        "torch_num_threads": 1,  # the same reduction order in every process, so runs compare bit for bit
    }
    recipe.update(overrides)
    return recipe


def write_recipe(path, recipe: dict) -> str:
    Path(path).write_text(yaml.safe_dump(recipe), encoding="utf-8")
    return str(path)


def reset_accelerate() -> None:
    """Forget the Accelerate singletons so the next in-process run starts like a fresh process."""
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    PartialState._reset_state()


def run_training(argv: list[str]) -> None:
    try:
        assert train_command.main(argv) == 0
    finally:
        reset_accelerate()


def write_collections(root: Path) -> tuple[Path, Path]:
    """The add-images set-up under `root`: the synthetic images in `raw`, and the collections `old` (the first
    `NUM_OLD` images) and `new` (the rest) beside it, as `add_argv` expects."""
    write_synthetic(root / "raw", num_images=NUM_IMAGES, seed=0, num_workers=1, oracle_pseudo_queries=True)
    return write_part(root / "raw", root / "old", 0, NUM_OLD), write_part(root / "raw", root / "new", NUM_OLD)


def train_old(root: Path, old: Path, kind: str) -> tuple[Path, Path]:
    """Prepare the `old` collection with `kind` identifiers and train a tiny model on it for 2 steps: (prepared
    dataset, model directory)."""
    prepared = root / "prepared"
    options = KIND_OPTIONS.get(kind, {})
    prepare(
        old / SYNTHETIC_JSON,
        old.parent / "raw",
        kind,
        prepared,
        pseudo_queries=old / ORACLE_PSEUDO_QUERIES_JSON,
        **options,
    )
    recipe = tiny_recipe(prepared, root / "model", max_steps=2, save_steps=0, eval_num_queries=2)
    run_training(["--config", write_recipe(root / "recipe.yaml", recipe)])
    return prepared, root / "model"


def add_argv(model, new, output, *extra) -> list[str]:
    """`grace-hf add-images` arguments adding the collection `new` (beside its image root `raw`) to `model`."""
    return [
        "--model", str(model), "--karpathy-json", str(new / SYNTHETIC_JSON), "--image-root", str(new.parent / "raw"),
        "--pseudo-queries", str(new / ORACLE_PSEUDO_QUERIES_JSON), "--output-dir", str(output), "--max-steps", "2",
        "--batch-size-i2id", "4", "--batch-size-t2id", "8", "--learning-rate", "2e-3", "--warmup-steps", "1",
        "--logging-steps", "1", "--save-steps", "0", "--eval-num-queries", "4", "--num-beams", "2",
        "--report-to", "none", "--torch-num-threads", "1", *extra,
    ]  # fmt: skip


def usage_error(main, argv: list[str], capsys) -> str:
    """`main(argv)` ends as a usage error (exit status 2, no traceback); its stderr."""
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2, err
    assert "Traceback" not in err
    return err
