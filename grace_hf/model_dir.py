"""The model directory: its one writer and its one reader.

A trained GRACE model directory (local, or a Hub model repo) is a complete retriever:

    config.json, generation_config.json, model.safetensors   the Flamingo (`save_pretrained`)
    tokenizer.json, tokenizer_config.json, processor_config.json   the processor
    identifiers.json                                         the identifier index the model memorized
    grace_config.json                                        how it retrieves (query image mode, identifier kind)
    identifier_trie.safetensors                              the trie of the default candidates' identifiers
    identifier_codebooks.safetensors                         what coding more images needs (structured's tree)
    training_args.json                                       the run's arguments and the datasets it trained on
    rerank.json                                              optional: the re-ranking weight fitted on val
                                                             (`grace-hf evaluate --rerank DENSE --split val`)
    metrics.json, README.md                                  final scores and train time; the model card
    checkpoints/, logs/                                      training's resumable states and logs (never pushed)
    added_images/                                            add-images: the new images' rows (never pushed)

The reader checks every file before loading and names the one that is missing, corrupt or does not belong.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from huggingface_hub import snapshot_download
from safetensors import SafetensorError, safe_open

from grace_hf.data.prepared import optional_prepared_file
from grace_hf.errors import GraceInputError
from grace_hf.evaluation.metrics import METRICS_FILE
from grace_hf.identifiers import CODEBOOKS_FILE, IDENTIFIERS_FILE, Codebooks, IdentifierIndex
from grace_hf.io_utils import atomic_write_json, atomic_write_text, read_json
from grace_hf.models.flamingo import FlamingoConfig, FlamingoForConditionalGeneration, FlamingoProcessor
from grace_hf.outputs import MARKER_FILE, read_marker

__all__ = [
    "ADDED_IMAGES_DIR",
    "CHECKPOINTS_DIR",
    "GRACE_CONFIG_FILE",
    "LOGS_DIR",
    "METRICS_FILE",
    "MODEL_CARD_FILE",
    "NOT_PUSHED",
    "RERANK_FILE",
    "TRAINING_ARGS_FILE",
    "TRIE_FILE",
    "GraceConfig",
    "ModelDirectory",
    "check_prepared_identifiers",
    "read_captioner",
    "read_codebooks",
    "read_model_dir",
    "read_retrieval_files",
    "resolve_model_dir",
    "training_data_sources",
    "write_model_dir",
]

GRACE_CONFIG_FILE = "grace_config.json"
TRIE_FILE = "identifier_trie.safetensors"
MODEL_CARD_FILE = "README.md"
CHECKPOINTS_DIR = "checkpoints"
LOGS_DIR = "logs"
TRAINING_ARGS_FILE = "training_args.json"
RERANK_FILE = "rerank.json"
ADDED_IMAGES_DIR = "added_images"
NOT_PUSHED = [f"{CHECKPOINTS_DIR}/*", f"{LOGS_DIR}/*", f"{ADDED_IMAGES_DIR}/*", MARKER_FILE, ".grace-*"]
WEIGHTS_FILES = ("model.safetensors", "model.safetensors.index.json")
REQUIRED_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "processor_config.json")
QUERY_IMAGE_MODES = ("none", "blank")


class SavesToFile(Protocol):
    """What writes itself to a file (the identifier trie)."""

    def save(self, path: str | os.PathLike) -> None: ...


@dataclass
class GraceConfig:
    """How a trained model retrieves (`grace_config.json`).

    Args:
        query_image: "none" (text-only prompts) or "blank" (the constant gray image, as trained with
            `t2id_image: blank`).
        identifier_kind: the kind of the identifiers the model memorized.
        num_identifiers: how many identifiers it memorized: an `identifiers.json` of another model is refused.
    """

    query_image: str = "none"
    identifier_kind: str | None = None
    num_identifiers: int | None = None

    def __post_init__(self) -> None:
        if self.query_image not in QUERY_IMAGE_MODES:
            raise GraceInputError(f"query_image must be one of {QUERY_IMAGE_MODES}, got {self.query_image!r}")

    @classmethod
    def for_index(cls, index: IdentifierIndex, query_image: str = "none") -> GraceConfig:
        return cls(query_image, index.kind, sum(len(ids) for ids in index.images.values()))

    @classmethod
    def load(cls, path: Path) -> GraceConfig:
        data = read_json(path, "GRACE config")
        if not isinstance(data, dict):
            raise GraceInputError(f"{path}: expected a JSON object")
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in data.items() if key in known})


@dataclass
class ModelDirectory:
    """What a model directory holds, loaded: the model (eval mode, on CPU; None when read without weights), its
    processor, and for a retriever the identifier index and the GRACE config (the saved trie is the retriever's to
    read: `grace_hf.retrieval.collection.load_saved_trie`)."""

    path: Path
    model: FlamingoForConditionalGeneration | None
    processor: FlamingoProcessor
    index: IdentifierIndex | None
    grace_config: GraceConfig


def resolve_model_dir(model: str | os.PathLike) -> Path:
    """A local model directory, or the local snapshot of a Hub repo (downloaded unless HF_HUB_OFFLINE=1)."""
    path = Path(model)
    if path.is_dir():
        return path
    if path.exists():
        raise GraceInputError(f"{model}: not a model directory (a file)")
    try:
        return Path(snapshot_download(str(model)))
    except (ValueError, OSError) as err:
        raise GraceInputError(
            f"{model}: not a model directory, and not a Hub model that can be fetched ({err})"
        ) from None


def write_model_dir(
    directory: str | os.PathLike,
    model: Any,
    processor: Any,
    *,
    index: IdentifierIndex | None = None,
    grace_config: GraceConfig | None = None,
    metrics: dict[str, Any] | None = None,
    model_card: str | None = None,
    state_dict: dict[str, torch.Tensor] | None = None,
    codebooks: Codebooks | None = None,
    training_args: dict[str, Any] | None = None,
    trie: SavesToFile | None = None,
) -> None:
    """Write the model directory's files into the existing directory `directory` (the caller makes it atomic).

    `state_dict`: the gathered weights when the model is sharded (ZeRO-3); a retriever's directory needs `index`
    (and its `codebooks`, when its kind keeps them) and the `trie` of its default candidates; `training_args`: what training ran on (`training_args.json`,
    with `data`: the prepared datasets it trained on).
    """
    directory = Path(directory)
    model.save_pretrained(directory, state_dict=state_dict)
    processor.save_pretrained(directory)
    if index is not None:
        index.save(directory / IDENTIFIERS_FILE)
        atomic_write_json(
            directory / GRACE_CONFIG_FILE, dataclasses.asdict(grace_config or GraceConfig.for_index(index))
        )
    if trie is not None:
        trie.save(directory / TRIE_FILE)
    if codebooks is not None:
        codebooks.save(directory / CODEBOOKS_FILE)
    if training_args is not None:
        atomic_write_json(directory / TRAINING_ARGS_FILE, training_args)
    if metrics is not None:
        atomic_write_json(directory / METRICS_FILE, metrics)
    if model_card is not None:
        atomic_write_text(directory / MODEL_CARD_FILE, model_card)


def _check_files(directory: Path, retriever: bool) -> None:
    marker = read_marker(directory)
    if marker is not None and not marker.get("complete", True):
        raise GraceInputError(
            f"{directory}: the run that writes this model has not finished (killed or still running); resume it "
            "with `grace-hf train ... --resume-from-checkpoint latest`"
        )
    missing = [name for name in REQUIRED_FILES if not (directory / name).is_file()]
    if not any((directory / name).is_file() for name in WEIGHTS_FILES):
        missing.append(WEIGHTS_FILES[0])
    if retriever and not (directory / IDENTIFIERS_FILE).is_file():
        missing.append(IDENTIFIERS_FILE)
    if missing:
        raise GraceInputError(f"{directory}: not a complete model directory: missing {', '.join(missing)}")


def _check_weights(directory: Path) -> None:
    """Every weights file opens as safetensors (a truncated or foreign file is named)."""
    index_file = directory / WEIGHTS_FILES[1]
    files = [directory / WEIGHTS_FILES[0]]
    if index_file.is_file():
        shards = read_json(index_file, "weights index").get("weight_map", {})
        files = sorted({directory / name for name in shards.values()})
    for path in files:
        try:
            with safe_open(os.fspath(path), framework="pt") as f:
                f.keys()
        except (SafetensorError, OSError) as err:
            raise GraceInputError(f"{path}: corrupt or truncated weights file ({err})") from None


def _load_config(directory: Path) -> FlamingoConfig:
    path = directory / "config.json"
    data = read_json(path, "model config")
    if not isinstance(data, dict) or data.get("model_type") != FlamingoConfig.model_type:
        found = data.get("model_type") if isinstance(data, dict) else type(data).__name__
        raise GraceInputError(f"{path}: not a grace_hf Flamingo config (model_type {found!r})")
    try:
        return FlamingoConfig.from_pretrained(directory)
    except (ValueError, TypeError, KeyError) as err:
        raise GraceInputError(f"{path}: invalid Flamingo config ({err})") from None


def _load_processor(directory: Path, config: FlamingoConfig) -> FlamingoProcessor:
    try:
        processor = FlamingoProcessor.from_pretrained(directory)
    except (OSError, ValueError, TypeError, KeyError, json.JSONDecodeError) as err:
        raise GraceInputError(f"{directory}: the processor files (tokenizer.json, ...) do not load ({err})") from None
    ids = (processor.media_token_id, processor.end_of_chunk_token_id, processor.pad_token_id)
    want = (config.media_token_id, config.end_of_chunk_token_id, config.pad_token_id)
    if ids != want or len(processor.tokenizer) > config.text_config.vocab_size:
        raise GraceInputError(
            f"{directory / 'tokenizer.json'}: the tokenizer does not belong to this model: special ids "
            f"(<image>, <|endofchunk|>, <PAD>) {ids} vs {want} in config.json, {len(processor.tokenizer)} tokens "
            f"for an embedding of {config.text_config.vocab_size}"
        )
    return processor


def _load_model(directory: Path, dtype: torch.dtype | str | None) -> FlamingoForConditionalGeneration:
    _check_weights(directory)
    try:
        model, info = FlamingoForConditionalGeneration.from_pretrained(
            directory, dtype=dtype, output_loading_info=True
        )
    except (RuntimeError, ValueError, OSError, KeyError) as err:
        raise GraceInputError(f"{directory}: the weights do not match config.json ({err})") from None
    for problem in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        keys = sorted(str(key[0] if isinstance(key, tuple) else key) for key in info.get(problem) or ())
        if keys:  # loading would leave those weights randomly initialised, or drop what the file holds
            weights = next(directory / name for name in WEIGHTS_FILES if (directory / name).is_file())
            raise GraceInputError(
                f"{weights}: the weights do not fit the model of config.json: {len(keys)} "
                f"{problem.replace('_', ' ')}, e.g. {', '.join(keys[:3])}"
            )
    return model.eval()


def _check_index(directory: Path, index: IdentifierIndex, processor: Any, config: GraceConfig) -> None:
    """The identifier index belongs to this model: its new tokens are whole tokens of the tokenizer, and it holds as
    many identifiers as the model memorized."""
    path = directory / IDENTIFIERS_FILE
    vocabulary = processor.tokenizer.get_vocab()
    missing = [token for token in index.new_tokens if token not in vocabulary]
    if missing:
        raise GraceInputError(
            f"{path}: identifier token {missing[0]!r} is not in the model's tokenizer ({len(missing)} missing): "
            "this identifiers.json belongs to another model"
        )
    count = sum(len(ids) for ids in index.images.values())
    if config.num_identifiers is not None and count != config.num_identifiers:
        raise GraceInputError(
            f"{path}: {count} identifiers, but the model memorized {config.num_identifiers} "
            f"({GRACE_CONFIG_FILE}): this identifiers.json belongs to another model"
        )
    if config.identifier_kind is not None and index.kind != config.identifier_kind:
        raise GraceInputError(f"{path}: {index.kind} identifiers for a model trained on {config.identifier_kind} ones")


def read_retrieval_files(directory: Path, processor: Any) -> tuple[IdentifierIndex, GraceConfig]:
    """The identifier index (checked against the model's tokenizer) and the GRACE config of a model directory."""
    grace_config = GraceConfig()
    if (directory / GRACE_CONFIG_FILE).is_file():
        grace_config = GraceConfig.load(directory / GRACE_CONFIG_FILE)
    index = IdentifierIndex.load(directory / IDENTIFIERS_FILE)
    _check_index(directory, index, processor, grace_config)
    return index, grace_config


def read_model_dir(
    model: str | os.PathLike, dtype: torch.dtype | str | None = None, retriever: bool = True, weights: bool = True
) -> ModelDirectory:
    """Check and load a model directory (or Hub repo); `retriever=False` for a captioner (no identifiers);
    `weights=False` checks the weights files without loading them (`model` is then None).

    Raises `GraceInputError` naming the file that is missing, corrupt or belongs to another model.
    """
    directory = resolve_model_dir(model)
    _check_files(directory, retriever)
    config = _load_config(directory)
    processor = _load_processor(directory, config)
    index, grace_config = None, GraceConfig()
    if retriever:
        index, grace_config = read_retrieval_files(directory, processor)
    if weights:
        loaded = _load_model(directory, dtype)
    else:
        _check_weights(directory)
        loaded = None
    return ModelDirectory(directory, loaded, processor, index, grace_config)


def read_captioner(model: str | os.PathLike, flag: str) -> ModelDirectory:
    """Check and load a captioner directory (`task: captioner`); a retrieval model is a `GraceInputError` naming
    `flag`, the option that gave it."""
    directory = resolve_model_dir(model)
    if (directory / IDENTIFIERS_FILE).is_file():
        raise GraceInputError(
            f"{flag} {model}: a retrieval model (it has {IDENTIFIERS_FILE}), not a captioner; train one with "
            "`task: captioner`"
        )
    return read_model_dir(directory, retriever=False)


def read_codebooks(directory: Path) -> Codebooks | None:
    """The identifier codebooks of a model directory, or None when it has none."""
    path = directory / CODEBOOKS_FILE
    return Codebooks.load(path) if path.is_file() else None


def training_data_sources(directory: Path) -> list[str] | None:
    """The prepared datasets a model was trained on, as its `training_args.json` records them (a relative path,
    `./x` inside the model directory or `../x` beside it, made absolute), or None when it has no record."""
    path = directory / TRAINING_ARGS_FILE
    if not path.is_file():
        return None
    record = read_json(path, "training record")
    sources = record.get("data") if isinstance(record, dict) else None
    if not isinstance(sources, list) or not all(isinstance(source, str) for source in sources):
        raise GraceInputError(f"{path}: 'data' must be a list of prepared datasets")
    return [str(directory / source) if source.startswith(("./", "../")) else source for source in sources]


def _shown(identifiers: list[str]) -> str:
    """An image's identifiers as a message shows them: the one, or the list."""
    return repr(identifiers[0]) if len(identifiers) == 1 else repr(identifiers)


def check_prepared_identifiers(
    model: str | os.PathLike, data: str | os.PathLike, image_keys: Sequence[str], images: str = "images ranked"
) -> None:
    """The prepared dataset `data` names the images `image_keys` (those an evaluation ranks) as the model `model`
    does: its identifiers.json has the model's identifier kind and gives each of them the identifiers the model
    memorized for it, so that a beam's identifier and a gold image key mean the same image on both sides.

    Only `image_keys` are compared: the model may know more images (add-images grew its collection, and the prepared
    dataset of the original collection still evaluates it). A dataset without identifiers.json is not checked; a
    model directory without one is the `read_model_dir` error. Raises a `GraceInputError` naming both files and the
    first image whose identifiers differ or that one side lacks (e.g. the same file names in another collection).
    """
    directory = resolve_model_dir(model)
    _check_files(directory, retriever=True)
    data_file = optional_prepared_file(data, IDENTIFIERS_FILE)
    if data_file is None:
        return
    model_file = directory / IDENTIFIERS_FILE
    ours, theirs = IdentifierIndex.load(model_file), IdentifierIndex.load(data_file)
    problem = f"--data {data} was not prepared for --model {model}"
    advice = "use the prepared dataset the model was trained on (or the added_images/ of add-images)"
    if theirs.kind != ours.kind:
        raise GraceInputError(
            f"{problem}: {data_file} holds {theirs.kind} identifiers, {model_file} {ours.kind} ones; {advice}"
        )
    differing = []
    for key in image_keys:
        model_ids, data_ids = ours.images.get(key), theirs.images.get(key)
        if model_ids is None or data_ids is None or set(model_ids) != set(data_ids):
            differing.append((key, model_ids, data_ids))
    if not differing:
        return
    key, model_ids, data_ids = differing[0]
    if model_ids is None:
        detail = f"image {key!r} ({_shown(data_ids)} in {data_file}) is not in {model_file}"
    elif data_ids is None:
        detail = f"image {key!r} ({_shown(model_ids)} in {model_file}) is not in {data_file}"
    else:
        detail = f"image {key!r} is {_shown(data_ids)} in {data_file} but {_shown(model_ids)} in {model_file}"
    raise GraceInputError(f"{problem}: {detail} ({len(differing)} of the {len(image_keys)} {images} differ); {advice}")
