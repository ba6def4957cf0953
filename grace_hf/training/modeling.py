"""The model side of a run: build or load the Flamingo and its processor, add identifier tokens, group parameters."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from grace_hf.models.flamingo import FlamingoConfig, FlamingoForConditionalGeneration, FlamingoProcessor
from grace_hf.training.args import ModelArguments

__all__ = ["build_model_and_processor", "count_parameters", "optimizer_parameter_groups"]


def build_model_and_processor(
    model_args: ModelArguments, tokenizer_texts: Sequence[str], new_tokens: Sequence[str] = ()
) -> tuple[FlamingoForConditionalGeneration, FlamingoProcessor]:
    """A fresh preset model with a tokenizer trained on `tokenizer_texts`, or a pretrained model and its processor;
    then the identifier tokens (structured/atomic) are added whole and the embeddings resized.

    Build it after creating the `Accelerator`, so that ZeRO-3 can partition `from_pretrained` weights on load.
    """
    if model_args.model_preset is not None:
        config = FlamingoConfig.from_preset(model_args.model_preset, **(model_args.config_overrides or {}))
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
    else:
        processor = FlamingoProcessor.from_pretrained(model_args.model)
        model = FlamingoForConditionalGeneration.from_pretrained(
            model_args.model, freeze_vision=model_args.freeze_vision
        )
        if (
            processor.add_identifier_tokens(list(new_tokens))
            or len(processor.tokenizer) > model.get_input_embeddings().num_embeddings
        ):
            model.resize_token_embeddings(len(processor.tokenizer))
    model.generation_config.eos_token_id = processor.end_of_chunk_token_id
    model.generation_config.pad_token_id = processor.pad_token_id
    if model_args.gradient_checkpointing:
        # non-reentrant: two forwards (i2id, t2id) feed one backward, also under DDP
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model, processor


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
