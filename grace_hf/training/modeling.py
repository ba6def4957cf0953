"""The model side of a run: build or load the Flamingo and its processor, add identifier tokens, group parameters."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence

import torch
from torch import nn
from transformers.integrations import is_deepspeed_zero3_enabled

from grace_hf.dense.open_clip_loading import load_open_clip_vision_tower
from grace_hf.errors import GraceInputError
from grace_hf.model_dir import read_model_dir
from grace_hf.models.flamingo import FlamingoConfig, FlamingoForConditionalGeneration, FlamingoProcessor
from grace_hf.training.args import ModelArguments

__all__ = [
    "build_model_and_processor",
    "count_parameters",
    "initialize_token_embeddings",
    "optimizer_parameter_groups",
]


def _gathered(parameters: list[nn.Parameter]) -> contextlib.AbstractContextManager:
    """Under ZeRO-3, the full `parameters` on every process (changes made on process 0 kept); else nothing."""
    if not is_deepspeed_zero3_enabled():
        return contextlib.nullcontext()
    import deepspeed  # only under ZeRO-3, where it is loaded already

    return deepspeed.zero.GatheredParameters(parameters, modifier_rank=0)


def initialize_token_embeddings(
    model: FlamingoForConditionalGeneration, processor: FlamingoProcessor, token_texts: Mapping[str, Sequence[str]]
) -> None:
    """Start each token of `token_texts` from the mean input embedding of its texts' tokens (and, when the output
    embeddings are not tied to the input ones, its output row from the mean of theirs), not from noise: a new atomic
    identifier `<img_n>` begins near the words of its image's captions. A token whose texts are empty is left as is."""
    tokenizer = processor.tokenizer
    tables = [model.get_input_embeddings().weight]
    output = model.get_output_embeddings()
    if output is not None and output.weight is not tables[0]:
        tables.append(output.weight)
    with _gathered(tables), torch.no_grad():
        for token, texts in token_texts.items():
            ids = (
                [i for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"] for i in ids]
                if texts
                else []
            )
            if not ids:
                continue
            row = tokenizer.convert_tokens_to_ids(token)
            for table in tables:
                table[row] = table[ids].mean(dim=0)


def build_model_and_processor(
    model_args: ModelArguments,
    tokenizer_texts: Sequence[str],
    new_tokens: Sequence[str] = (),
    token_texts: Mapping[str, Sequence[str]] | None = None,
) -> tuple[FlamingoForConditionalGeneration, FlamingoProcessor]:
    """A fresh preset model with a tokenizer trained on `tokenizer_texts`, or a pretrained model and its processor;
    then the identifier tokens (structured/atomic/rq) are added whole and the embeddings resized, and the tokens of
    `token_texts` start from their texts (`initialize_token_embeddings`).

    Build it after creating the `Accelerator`, so that ZeRO-3 can partition `from_pretrained` weights on load.
    """
    if model_args.model_preset is not None:
        config = FlamingoConfig.from_preset(model_args.model_preset, **(model_args.config_overrides or {}))
        tower = None
        if model_args.vision_tower is not None:  # the encoder's own shape, replacing the preset's tower whole
            config.vision_config, config.vision_quick_gelu, tower = load_open_clip_vision_tower(
                model_args.vision_tower, model_args.vision_tower_weights
            )
        processor = FlamingoProcessor.from_texts(
            tokenizer_texts, image_size=config.vision_config["image_size"], vocab_size=model_args.tokenizer_vocab_size
        )
        processor.add_identifier_tokens(list(new_tokens))
        config.text_config.vocab_size = len(processor.tokenizer)
        config.media_token_id = processor.media_token_id
        config.end_of_chunk_token_id = config.eos_token_id = processor.end_of_chunk_token_id
        config.pad_token_id = processor.pad_token_id
        config.freeze_vision = model_args.freeze_vision
        model = FlamingoForConditionalGeneration(config)
        if tower is not None:
            _load_vision_tower(model, tower, model_args.vision_tower)
    else:
        pretrained = read_model_dir(model_args.model, retriever=False, weights=False)  # checked, as evaluate does
        processor = pretrained.processor
        model = FlamingoForConditionalGeneration.from_pretrained(
            pretrained.path, freeze_vision=model_args.freeze_vision
        )
        if (
            processor.add_identifier_tokens(list(new_tokens))
            or len(processor.tokenizer) > model.get_input_embeddings().num_embeddings
        ):
            model.resize_token_embeddings(len(processor.tokenizer))
    if token_texts:
        initialize_token_embeddings(model, processor, token_texts)
    model.generation_config.eos_token_id = processor.end_of_chunk_token_id
    model.generation_config.pad_token_id = processor.pad_token_id
    if model_args.gradient_checkpointing:
        # non-reentrant: two forwards (i2id, t2id) feed one backward, also under DDP
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model, processor


def _load_vision_tower(model: FlamingoForConditionalGeneration, state: dict[str, torch.Tensor], source: str) -> None:
    """Copy an open_clip encoder's visual weights into the model's vision tower; every tower weight must be given."""
    result = model.model.vision_model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise GraceInputError(
            f"vision_tower {source}: its weights do not fit the tower (missing {result.missing_keys[:3]}, "
            f"unexpected {result.unexpected_keys[:3]})"
        )
    model.model.freeze_vision_tower()


def optimizer_parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: weight decay on the gated cross-attention matrices only (not their gates, norms or biases),
    as OpenFlamingo did; every other trainable parameter without decay."""
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        in_cross_attention = ".gated_cross_attn." in f".{name}"
        (decay if in_cross_attention and parameter.ndim >= 2 else no_decay).append(parameter)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [group for group in groups if group["params"]]


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Trainable and total parameter counts (full sizes, also when ZeRO-3 has partitioned them)."""
    sizes = [(getattr(p, "ds_numel", p.numel()), p.requires_grad) for p in model.parameters()]
    return {"trainable": sum(n for n, trained in sizes if trained), "total": sum(n for n, _ in sizes)}
