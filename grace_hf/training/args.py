"""Training arguments: three dataclasses filled from a YAML recipe, then from command-line flags of the same names.

`--config recipe.yaml` sets the defaults, every other flag overrides one field (the TRL / alignment-handbook
pattern): `--output-dir runs/x` (or the recipe key's own spelling, `--output_dir`). A key that names no field, in
the recipe or on the command line, and a value of the wrong type are errors that name them.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
import yaml
from transformers import HfArgumentParser, SchedulerType

from grace_hf.errors import GraceInputError, renamed_flag
from grace_hf.models.flamingo import FLAMINGO_PRESETS, FlamingoConfig, FlamingoForConditionalGeneration
from grace_hf.training.views import ImageViews

REPORT_TO_CHOICES = ("all", "none", "tensorboard", "wandb")


@dataclass
class ModelArguments:
    """Which Flamingo to train and how to build it."""

    model: str | None = field(
        default=None,
        metadata={"help": "A model directory or Hub id to start from (e.g. converted OpenFlamingo-3B weights)."},
    )
    model_preset: str | None = field(
        default=None,
        metadata={"help": "Build a fresh model from this FlamingoConfig preset (e.g. 'tiny') instead of loading one."},
    )
    config_overrides: str | None = field(
        default=None,
        metadata={"help": "FlamingoConfig fields to override on the preset: a JSON object (a mapping in YAML)."},
    )
    tokenizer_vocab_size: int = field(
        default=2000,
        metadata={"help": "With `model_preset`: size of the BPE tokenizer trained on the dataset's texts."},
    )
    vision_tower: str | None = field(
        default=None,
        metadata={
            "help": "With `model_preset`: start the vision tower from an open_clip image encoder: a `baseline-clip` "
            "output directory, or an open_clip config (a JSON file or a built-in name such as 'ViT-L-14') whose "
            "weights file is `vision_tower_weights`. The tower's shape and image size come from that encoder."
        },
    )
    vision_tower_weights: str | None = field(
        default=None, metadata={"help": "With a config as `vision_tower`: its open_clip weights file."}
    )
    freeze_vision: bool = field(default=True, metadata={"help": "Keep the vision tower frozen."})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "Recompute activations in backward."})

    def __post_init__(self) -> None:
        if (self.model is None) == (self.model_preset is None):
            raise GraceInputError("give exactly one of model and model_preset")
        if isinstance(self.config_overrides, str):
            try:
                self.config_overrides = json.loads(self.config_overrides)
            except json.JSONDecodeError as err:
                raise GraceInputError(f"config_overrides: not a JSON object: {err}") from None
        if self.config_overrides is not None and not isinstance(self.config_overrides, dict):
            raise GraceInputError(f"config_overrides: expected a mapping, got {self.config_overrides!r}")
        if self.config_overrides and self.model_preset is None:
            raise GraceInputError("config_overrides only applies to a model_preset")
        if self.model_preset is not None:
            check_model_preset(self.model_preset, self.config_overrides or {})
        if self.vision_tower is not None and self.model_preset is None:
            raise GraceInputError("vision_tower starts a fresh model_preset; a pretrained model keeps its own tower")
        if self.vision_tower_weights is not None and self.vision_tower is None:
            raise GraceInputError("vision_tower_weights needs vision_tower (the open_clip config it belongs to)")

    def input_paths(self) -> list[str | None]:
        """The local files and folders the model is built from (an output may not hold them)."""
        return [self.model, self.vision_tower, self.vision_tower_weights]


@dataclass
class DataArguments:
    """What to train on: a prepared dataset (retrieval) or a Karpathy JSON (captioner)."""

    task: Literal["retrieval", "captioner"] = field(
        default="retrieval",
        metadata={"help": "'retrieval': i2id + t2id on a prepared dataset; 'captioner': train image -> caption."},
    )
    data: str | None = field(
        default=None, metadata={"help": "A prepared dataset (`grace-hf prepare`): a directory or a Hub dataset id."}
    )
    karpathy_json: str | None = field(default=None, metadata={"help": "captioner: the Karpathy-format JSON."})
    image_root: str | None = field(default=None, metadata={"help": "captioner: the folder the JSON's paths start in."})
    t2id_image: Literal["none", "blank"] = field(
        default="none",
        metadata={"help": "Image input of t2id samples: 'none' (text only) or 'blank' (the original's pad image)."},
    )
    max_query_words: int = field(default=25, metadata={"help": "Queries are cut to this many words in training."})
    i2id_flip: bool = field(default=True, metadata={"help": "Random horizontal flip of the images (deterministic)."})
    i2id_crop_scale: float = field(
        default=1.0,
        metadata={
            "help": "i2id: a random crop keeping between this fraction and all of each side, resized back "
            "(deterministic; 1 = none). Memorizing varied views is what lets an altered copy find its image."
        },
    )
    i2id_jpeg_quality: int = field(
        default=0,
        metadata={
            "help": "i2id: re-encode as JPEG of a random quality between this and 95 (deterministic; 0 = none)."
        },
    )
    i2id_original_share: float = field(
        default=0.0,
        metadata={
            "help": "i2id: the share of rows shown without crop or JPEG (deterministic; keeps the exact pixels)."
        },
    )
    eval_num_queries: int = field(
        default=1000, metadata={"help": "Test queries used for Recall@K (evenly spread; 0 = no evaluation)."}
    )
    eval_split: Literal["test", "val"] = field(
        default="test",
        metadata={
            "help": "Recall@K of training: 'test' (the test captions rank the collection) or 'val' (the val captions "
            "rank the val images: for choosing settings without reading a test query)."
        },
    )

    def __post_init__(self) -> None:
        if self.task == "retrieval" and self.data is None:
            raise GraceInputError("task 'retrieval' needs data (a dataset written by `grace-hf prepare`)")
        if self.task == "captioner" and (self.karpathy_json is None or self.image_root is None):
            raise GraceInputError("task 'captioner' needs karpathy_json and image_root")
        self._check_values()

    def input_paths(self) -> list[str | None]:
        """The files and folders the run reads (an output may not hold them)."""
        return [self.data, self.karpathy_json, self.image_root]

    def _check_values(self) -> None:
        if self.max_query_words < 1:
            raise GraceInputError(f"max_query_words must be >= 1, got {self.max_query_words}")
        if self.eval_num_queries < 0:
            raise GraceInputError(f"eval_num_queries must be >= 0, got {self.eval_num_queries}")
        try:
            self.i2id_views()
        except ValueError as error:
            raise GraceInputError(f"i2id views: {error}") from None

    def i2id_views(self) -> ImageViews:
        """The views of the i2id images."""
        return ImageViews(self.i2id_flip, self.i2id_crop_scale, self.i2id_jpeg_quality, self.i2id_original_share)


@dataclass
class AddImagesArguments(DataArguments):
    """What `add-images` reads besides the model: the new images, the old rows it replays with them, and the mix."""

    data: list[str] | None = field(
        default=None,
        metadata={
            "help": "Prepared dataset(s) whose rows are replayed with the new ones (default: what the model was "
            "trained on, as its training_args.json records)."
        },
    )
    karpathy_json: str | None = field(
        default=None, metadata={"help": "The new images: a Karpathy-format JSON (its train, val and test images)."}
    )
    image_root: str | None = field(default=None, metadata={"help": "The folder the new JSON's image paths start in."})
    pseudo_queries: str | None = field(
        default=None, metadata={"help": "Pseudo-queries of the new val and test images ({file name: [query, ...]})."}
    )
    captioner: str | None = field(
        default=None,
        metadata={
            "help": "A captioner directory (`task: captioner`) that writes the new val and test images' pseudo-queries "
            "from their pixels, instead of a pseudo_queries file."
        },
    )
    captioner_filter: str | None = field(
        default=None,
        metadata={
            "help": "With a captioner: a dense-baseline directory whose model keeps, of the captioner's beams and "
            "20 sampled queries per image, the five closest to the image (as the demo writes its pseudo-queries)."
        },
    )
    t2id_image: Literal["none", "blank"] | None = field(
        default=None, metadata={"help": "The model's own (its grace_config.json); another value is an error."}
    )
    replay_ratio: float | None = field(
        default=None,
        metadata={
            "help": "Replayed old rows per new row in every batch (default: as many as the replayed data holds old "
            "rows per new row, so batches mirror the whole collection and the model does not favour the new "
            "images; half that for rq and structured models, which then learn the new images better; 0: new rows "
            "only, which forgets)."
        },
    )
    image_features: str | None = field(
        default=None,
        metadata={
            "help": "structured, rq: a features file holding the new images, or a dense-baseline directory whose "
            "encoder embeds them (default: the source prepare recorded)."
        },
    )

    def __post_init__(self) -> None:
        if self.task != "retrieval":
            raise GraceInputError(f"add-images trains retrieval, not task {self.task!r}")
        if self.karpathy_json is None or self.image_root is None:
            raise GraceInputError("add-images needs karpathy_json and image_root (the new images)")
        if self.pseudo_queries is not None and self.captioner is not None:
            raise GraceInputError("give pseudo_queries or a captioner that writes them, not both")
        if self.captioner_filter is not None and self.captioner is None:
            raise GraceInputError("captioner_filter keeps some of a captioner's queries: give a captioner too")
        if self.replay_ratio is not None and not (math.isfinite(self.replay_ratio) and self.replay_ratio >= 0):
            raise GraceInputError(f"replay_ratio must be a finite number >= 0, got {self.replay_ratio}")
        if self.eval_split != "test":
            raise GraceInputError(f"add-images evaluates on the test captions, not eval_split {self.eval_split!r}")
        self._check_values()

    def input_paths(self) -> list[str | None]:
        return [
            *(self.data or []),
            self.karpathy_json,
            self.image_root,
            self.pseudo_queries,
            self.captioner,
            self.captioner_filter,
            self.image_features,
        ]


@dataclass
class GraceTrainingArguments:
    """The optimisation, its schedule and what the run writes (defaults: the original GRACE's, on 4 GPUs)."""

    output_dir: str = field(metadata={"help": "The model directory; checkpoints go to <output_dir>/checkpoints."})
    seed: int = field(default=42, metadata={"help": "Seeds the model init, the data order and the augmentation."})
    max_steps: int = field(default=-1, metadata={"help": "Optimizer steps; overrides num_epochs when > 0."})
    num_epochs: float = field(
        default=5.0, metadata={"help": "Passes over the i2id rows (the t2id rows when i2id is off; captions)."}
    )
    batch_size_i2id: int = field(default=16, metadata={"help": "i2id samples per process per step."})
    batch_size_t2id: int = field(default=48, metadata={"help": "t2id samples per process per step."})
    batch_size_caption: int = field(default=32, metadata={"help": "captioner: samples per process per step."})
    loss_weight_i2id: float = field(default=1.0, metadata={"help": "Weight of the i2id loss; 0 switches it off."})
    loss_weight_t2id: float = field(default=1.0, metadata={"help": "Weight of the t2id loss; 0 switches it off."})
    learning_rate: float = field(default=1e-4, metadata={"help": "AdamW peak learning rate."})
    lr_scheduler_type: str = field(default="linear", metadata={"help": "A `transformers.get_scheduler` name."})
    warmup_steps: int = field(default=500, metadata={"help": "Linear warm-up steps."})
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW weight decay, on gated cross-attention only."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping (0 = off)."})
    logging_steps: int = field(default=10, metadata={"help": "Log losses every N steps."})
    eval_steps: int = field(default=0, metadata={"help": "Recall@K every N steps (0 = only at the end)."})
    eval_batch_size: int = field(default=16, metadata={"help": "Queries per beam-search batch in evaluation."})
    num_beams: int = field(default=10, metadata={"help": "Beams of the constrained search in evaluation."})
    save_steps: int = field(default=500, metadata={"help": "Checkpoint every N steps (0 = never)."})
    save_total_limit: int = field(default=2, metadata={"help": "Keep the last K checkpoints (0 = keep all)."})
    resume_from_checkpoint: str | None = field(
        default=None, metadata={"help": "'latest' or a checkpoint directory to continue from."}
    )
    dataloader_num_workers: int = field(default=0, metadata={"help": "Worker processes per data stream."})
    torch_num_threads: int = field(
        default=0,
        metadata={"help": "CPU threads of each process's torch ops (0 = half the cores, at most 8)."},
    )
    report_to: list[str] = field(
        default_factory=lambda: ["tensorboard"],
        metadata={
            "help": f"Trackers, any of {REPORT_TO_CHOICES} ('all' = every one installed); missing ones skipped."
        },
    )
    overwrite: bool = field(
        default=False,
        metadata={
            "help": "Replace an output_dir that is not a finished grace_hf model (never the working directory)."
        },
    )
    push_to_hub: str | None = field(default=None, metadata={"help": "Push the final directory to this Hub repo."})
    recipe: ClassVar[str | None] = None  # the `--config` file the run read (an input; set by `parse_args`)

    def __post_init__(self) -> None:
        if isinstance(self.report_to, str):
            self.report_to = [self.report_to]
        unknown = sorted(set(self.report_to) - set(REPORT_TO_CHOICES))
        if unknown:
            raise GraceInputError(f"report_to: unknown tracker(s) {unknown}; choose from {list(REPORT_TO_CHOICES)}")
        for name in ("num_epochs", "loss_weight_i2id", "loss_weight_t2id", "learning_rate", "weight_decay"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise GraceInputError(f"{name} must be a finite number >= 0, got {value}")
        if not math.isfinite(self.max_grad_norm) or self.max_grad_norm < 0:
            raise GraceInputError(f"max_grad_norm must be a finite number >= 0 (0 = off), got {self.max_grad_norm}")
        if self.max_steps <= 0 and self.num_epochs <= 0:
            raise GraceInputError("set max_steps > 0 or num_epochs > 0")
        if min(self.loss_weight_i2id, self.loss_weight_t2id) < 0:
            raise GraceInputError("loss weights must be >= 0")
        if self.loss_weight_i2id == 0 and self.loss_weight_t2id == 0:
            raise GraceInputError("both loss weights are 0: nothing to train")
        for name in ("batch_size_i2id", "batch_size_t2id", "batch_size_caption", "eval_batch_size", "num_beams"):
            if getattr(self, name) < 1:
                raise GraceInputError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in (
            "warmup_steps",
            "logging_steps",
            "eval_steps",
            "save_steps",
            "save_total_limit",
            "torch_num_threads",
            "dataloader_num_workers",
        ):
            if getattr(self, name) < 0:
                raise GraceInputError(f"{name} must be >= 0, got {getattr(self, name)}")
        schedulers = [s.value for s in SchedulerType]
        if self.lr_scheduler_type not in schedulers:
            raise GraceInputError(f"lr_scheduler_type: unknown {self.lr_scheduler_type!r}; choose from {schedulers}")


ARGUMENT_CLASSES = (ModelArguments, DataArguments, GraceTrainingArguments)
ADD_IMAGES_ARGUMENT_CLASSES = (ModelArguments, AddImagesArguments, GraceTrainingArguments)
RENAMED = {"model_name_or_path": "model", "data_dir": "data"}


def check_model_preset(preset: str, overrides: dict[str, Any]) -> None:
    """The preset exists and the overrides name its fields and give a model that can be built (checked on the meta
    device, so no memory is spent)."""
    try:
        config = FlamingoConfig.from_preset(preset, **overrides)
        with torch.device("meta"):
            FlamingoForConditionalGeneration(config)
    except (ValueError, TypeError, KeyError, RuntimeError, AssertionError) as err:
        what = "model_preset" if preset not in FLAMINGO_PRESETS else f"config_overrides {json.dumps(overrides)}"
        raise GraceInputError(f"{what}: {err}") from None


def _load_recipe(path: str) -> dict:
    try:
        recipe = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as err:
        raise GraceInputError(f"{path}: cannot read the recipe: {err}") from None
    except (yaml.YAMLError, RecursionError) as err:
        raise GraceInputError(f"{path}: not valid YAML: {str(err)[:300]}") from None
    if recipe is None:
        return {}
    if not isinstance(recipe, dict):
        raise GraceInputError(f"{path}: a recipe is a mapping of argument names to values")
    return recipe


def _describe(hint: Any) -> str:
    """A field type in words: `one of 'none', 'blank'`, `int or null`, `a list of str`."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        return "one of " + ", ".join(map(repr, args))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(arg) for arg in args)
    if origin is list:
        return f"a list of {_describe(args[0])}"
    return "null" if hint is type(None) else getattr(hint, "__name__", str(hint))


def _coerce(value: Any, hint: Any) -> tuple[bool, Any]:
    """`(ok, value)`: whether a recipe value fits the field type `hint`, and the value as the field holds it."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return True, None
        for option in (a for a in args if a is not type(None)):
            ok, coerced = _coerce(value, option)
            if ok:
                return True, coerced
        return False, value
    if origin is Literal:
        return value in args, value
    if origin is list:
        values = value if isinstance(value, list) else [value]
        checked = [_coerce(item, args[0]) for item in values]
        return all(ok for ok, _ in checked), [item for _, item in checked]
    if hint is bool:
        return isinstance(value, bool), value
    if hint in (int, float):
        if isinstance(value, str):  # YAML 1.1 reads `1e-3` as a string
            try:
                value = hint(value)
            except ValueError:
                return False, value
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False, value
        if hint is int and not float(value).is_integer():
            return False, value
        return True, hint(value)
    return isinstance(value, hint), value


def _checked_recipe(path: str, recipe: dict[str, Any], classes: tuple[type, ...]) -> dict[str, Any]:
    """The recipe's values, each checked against its field's type; unknown and renamed keys are errors."""
    hints = {}
    for cls in classes:
        hints.update(typing.get_type_hints(cls))
    hints["config_overrides"] = dict | str | None  # a mapping in YAML, a JSON string on the command line
    checked = {}
    for key, value in recipe.items():
        if key in RENAMED:
            raise GraceInputError(f"{path}: {renamed_flag(repr(key), repr(RENAMED[key]))}")
        if key not in hints:
            raise GraceInputError(f"{path}: unknown key {key!r}")
        ok, checked[key] = _coerce(value, hints[key])
        if not ok:
            raise GraceInputError(f"{path}: {key}: {value!r} is not {_describe(hints[key])}")
    return checked


def _check_renamed_flags(argv: list[str]) -> None:
    for arg in argv:
        name = arg.split("=", 1)[0].lstrip("-").replace("-", "_")
        if arg.startswith("--") and name in RENAMED:
            raise GraceInputError(renamed_flag(arg.split("=", 1)[0], f"--{RENAMED[name]}"))


def build_parser(
    classes: tuple[type, ...] = ARGUMENT_CLASSES,
    prog: str = "grace-hf train",
    description: str = "Train GRACE (or its captioner) with Accelerate.",
) -> HfArgumentParser:
    """The parser of the three argument dataclasses (plus `--config`); each field's flag is shown kebab-case first."""
    parser = HfArgumentParser(classes, prog=prog, description=description, allow_abbrev=False)
    parser.add_argument("--config", help="A YAML recipe: its keys set the defaults, flags override them.")
    for action in parser._actions:
        action.option_strings.sort(key=lambda flag: "_" in flag)
    return parser


def parse_args(
    argv: list[str] | None = None,
    classes: tuple[type, ...] = ARGUMENT_CLASSES,
    prog: str = "grace-hf train",
    description: str = "Train GRACE (or its captioner) with Accelerate.",
) -> tuple[ModelArguments, DataArguments, GraceTrainingArguments]:
    """Parse `--config recipe.yaml` plus overrides into (model, data, training) arguments; `classes` are the three
    argument dataclasses (add-images: `ADD_IMAGES_ARGUMENT_CLASSES`).

    Example:
        >>> parse_args(["--config", "recipes/synthetic/structured.yaml", "--max-steps", "10"])
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    _check_renamed_flags(argv)
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(argv)
    parser = build_parser(classes, prog, description)
    if known.config is not None:
        recipe = _checked_recipe(known.config, _load_recipe(known.config), classes)
        for action in parser._actions:
            if action.dest in recipe:
                action.required = False
        parser.set_defaults(**recipe)
    *parsed, remaining = parser.parse_args_into_dataclasses(
        args=argv, return_remaining_strings=True, look_for_args_file=False
    )
    if remaining:
        raise GraceInputError(f"unknown argument(s): {' '.join(remaining)}")
    model_args, data_args, training_args = (obj for obj in parsed if not isinstance(obj, argparse.Namespace))
    training_args.recipe = known.config
    return model_args, data_args, training_args
