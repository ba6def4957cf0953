"""Merge an OpenFlamingo `checkpoint.pt`, MPT (MosaicGPT) decoder weights and open_clip vision weights into one
`FlamingoForConditionalGeneration` directory (safetensors) that `from_pretrained` loads with no key left over.

    grace-hf convert-openflamingo \\
        --openflamingo-checkpoint OpenFlamingo-3B-vitl-mpt1b/checkpoint.pt \\
        --mpt-weights mpt-1b-redpajama-200b/ --clip-weights ViT-L-14-openai.pt \\
        --tokenizer gpt-neox-20b/ --preset openflamingo-3b-vitl-mpt1b --output-dir models/openflamingo-3b

Every source key is renamed by the module-level tables below; a key no rule claims, a tensor of the wrong shape,
or a model weight no source provides stops the conversion with a `GraceInputError` that names the keys.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from transformers import AutoTokenizer, CLIPImageProcessor

from grace_hf.errors import GraceInputError

from .configuration_flamingo import FlamingoConfig
from .modeling_flamingo import FlamingoForConditionalGeneration
from .processing_flamingo import FlamingoProcessor

__all__ = [
    "CLIP_RENAMES",
    "IGNORED_KEYS",
    "MPT_RENAMES",
    "OPENFLAMINGO_RENAMES",
    "OPENFLAMINGO_ROUTES",
    "convert_openflamingo",
    "convert_state_dict",
    "load_config",
    "rename_key",
]

# a gated cross-attention block, found under its decoder block and, in some checkpoints, also in a flat list
_XATTN = r"^lang_encoder\.(?:transformer\.blocks|gated_cross_attn_layers)\.(\d+)\.(?:gated_cross_attn_layer\.)?"

# OpenFlamingo checkpoint.pt (perceiver, gated cross-attention, resized embedding) -> this model
OPENFLAMINGO_RENAMES: list[tuple[str, str]] = [
    (r"^perceiver\.latents$", r"model.perceiver.latents"),
    (r"^perceiver\.layers\.(\d+)\.0\.norm_(media|latents)\.", r"model.perceiver.layers.\1.attn.norm_\2."),
    (r"^perceiver\.layers\.(\d+)\.0\.to_q\.", r"model.perceiver.layers.\1.attn.q_proj."),
    (r"^perceiver\.layers\.(\d+)\.0\.to_kv\.", r"model.perceiver.layers.\1.attn.kv_proj."),
    (r"^perceiver\.layers\.(\d+)\.0\.to_out\.", r"model.perceiver.layers.\1.attn.o_proj."),
    (r"^perceiver\.layers\.(\d+)\.1\.0\.", r"model.perceiver.layers.\1.ff.norm."),
    (r"^perceiver\.layers\.(\d+)\.1\.1\.", r"model.perceiver.layers.\1.ff.up_proj."),
    (r"^perceiver\.layers\.(\d+)\.1\.3\.", r"model.perceiver.layers.\1.ff.down_proj."),
    (r"^perceiver\.norm\.", r"model.perceiver.norm."),
    (_XATTN + r"(attn_gate|ff_gate)$", r"model.layers.\1.gated_cross_attn.\2"),
    (_XATTN + r"attn\.norm\.", r"model.layers.\1.gated_cross_attn.attn.norm."),
    (_XATTN + r"attn\.to_q\.", r"model.layers.\1.gated_cross_attn.attn.q_proj."),
    (_XATTN + r"attn\.to_kv\.", r"model.layers.\1.gated_cross_attn.attn.kv_proj."),
    (_XATTN + r"attn\.to_out\.", r"model.layers.\1.gated_cross_attn.attn.o_proj."),
    (_XATTN + r"ff\.0\.", r"model.layers.\1.gated_cross_attn.ff.norm."),
    (_XATTN + r"ff\.1\.", r"model.layers.\1.gated_cross_attn.ff.up_proj."),
    (_XATTN + r"ff\.3\.", r"model.layers.\1.gated_cross_attn.ff.down_proj."),
    (r"^lang_encoder\.transformer\.wte\.weight$", r"model.embed_tokens.weight"),
]

# full (not trainable-only) OpenFlamingo checkpoints also hold the frozen towers: (pattern, rewrite, table to use)
OPENFLAMINGO_ROUTES: list[tuple[str, str, str]] = [
    (r"^lang_encoder\.transformer\.blocks\.(\d+)\.decoder_layer\.", r"transformer.blocks.\1.", "mpt"),
    (r"^lang_encoder\.old_decoder_blocks\.(\d+)\.", r"transformer.blocks.\1.", "mpt"),
    (r"^lang_encoder\.transformer\.(ln_f|norm_f)\.", r"transformer.\1.", "mpt"),
    (r"^vision_encoder\.", r"visual.", "clip"),
]

# MosaicGPT (mpt-1b-redpajama: ln_1/mlp_up/...) and MPT (mpt-7b: norm_1/ffn.up_proj/...) decoder -> this model
MPT_RENAMES: list[tuple[str, str]] = [
    (r"^transformer\.wte\.weight$", r"model.embed_tokens.weight"),
    (r"^transformer\.blocks\.(\d+)\.(?:ln_1|norm_1)\.", r"model.layers.\1.input_layernorm."),
    (r"^transformer\.blocks\.(\d+)\.attn\.Wqkv\.", r"model.layers.\1.self_attn.qkv_proj."),
    (r"^transformer\.blocks\.(\d+)\.attn\.q_ln\.", r"model.layers.\1.self_attn.q_layernorm."),
    (r"^transformer\.blocks\.(\d+)\.attn\.k_ln\.", r"model.layers.\1.self_attn.k_layernorm."),
    (r"^transformer\.blocks\.(\d+)\.attn\.out_proj\.", r"model.layers.\1.self_attn.o_proj."),
    (r"^transformer\.blocks\.(\d+)\.(?:ln_2|norm_2)\.", r"model.layers.\1.post_attention_layernorm."),
    (r"^transformer\.blocks\.(\d+)\.(?:mlp\.mlp_up|ffn\.up_proj)\.", r"model.layers.\1.mlp.up_proj."),
    (r"^transformer\.blocks\.(\d+)\.(?:mlp\.mlp_down|ffn\.down_proj)\.", r"model.layers.\1.mlp.down_proj."),
    (r"^transformer\.(?:ln_f|norm_f)\.", r"model.norm."),
]

# open_clip CLIP state dict: only the vision tower is read
CLIP_RENAMES: list[tuple[str, str]] = [(r"^visual\.", r"model.vision_model.")]

# source keys that are known and deliberately dropped
IGNORED_KEYS: list[str] = [
    r"^visual\.(ln_post\.|proj$)",  # the pooling head: patch tokens are taken before ln_post
    r"^lm_head\.weight$",  # tied to the input embedding
    r"^(transformer\.resblocks\.|ln_final\.|token_embedding\.|positional_embedding$|text_projection$|logit_scale$)",  # CLIP text
    r"^(logit_bias|attn_mask)$",
]


def rename_key(key: str, rules: Iterable[tuple[str, str]]) -> str | None:
    """The first matching rule's rewrite of `key`, or None when no rule matches."""
    for pattern, replacement in rules:
        if re.search(pattern, key):
            return re.sub(pattern, replacement, key, count=1)
    return None


def _target_name(key: str, table: str) -> str | None:
    """This model's name for `key` of a `table` ("openflamingo", "mpt" or "clip") state dict, or None."""
    if table == "openflamingo":
        for pattern, replacement, routed_table in OPENFLAMINGO_ROUTES:
            if re.search(pattern, key):
                return _target_name(re.sub(pattern, replacement, key, count=1), routed_table)
    return rename_key(key, {"openflamingo": OPENFLAMINGO_RENAMES, "mpt": MPT_RENAMES, "clip": CLIP_RENAMES}[table])


def convert_state_dict(
    openflamingo: dict[str, torch.Tensor],
    mpt: dict[str, torch.Tensor],
    clip: dict[str, torch.Tensor],
    expected: dict[str, torch.Size],
    sources: tuple[str, str, str] = ("checkpoint", "mpt", "clip"),
) -> dict[str, torch.Tensor]:
    """Rename and merge the three state dicts into this model's names; the OpenFlamingo checkpoint wins (its
    embedding is the resized one). Raises GraceInputError naming every unexpected, mis-shaped or missing key."""
    candidates: list[tuple[str, str, str, torch.Tensor]] = []  # (target, source label, source key, tensor)
    unexpected: list[str] = []

    for label, table, state in zip(sources, ("openflamingo", "mpt", "clip"), (openflamingo, mpt, clip)):
        for key, tensor in state.items():
            target = _target_name(key, table)
            if target is not None and target in expected:
                candidates.append((target, label, key, tensor))
            elif not any(re.search(pattern, key) for pattern in IGNORED_KEYS):
                unexpected.append(f"{label}: {key}" + (f" (-> {target})" if target else ""))

    # candidates come in source order, so the checkpoint's tensor wins over the towers' (e.g. the resized wte)
    merged: dict[str, torch.Tensor] = {}
    origin: dict[str, tuple[str, str]] = {}
    misshaped: list[str] = []
    for target, label, key, tensor in candidates:
        if target in origin:
            first_label, first_key = origin[target]
            if first_label == label and target in merged and not torch.equal(merged[target], tensor):
                misshaped.append(f"{label}: {key} disagrees with {first_key} (both give {target})")
            continue
        origin[target] = (label, key)
        if tuple(tensor.shape) != tuple(expected[target]):
            misshaped.append(
                f"{label}: {key} has shape {tuple(tensor.shape)}, {target} needs {tuple(expected[target])}"
            )
        else:
            merged[target] = tensor
    missing = sorted(set(expected) - set(origin))
    problems = []
    for title, items in (("unexpected keys", unexpected), ("mis-shaped keys", misshaped), ("missing keys", missing)):
        if items:
            shown = "; ".join(items[:20]) + (f"; ... ({len(items) - 20} more)" if len(items) > 20 else "")
            problems.append(f"{len(items)} {title}: {shown}")
    if problems:
        hint = ""
        if any(k.startswith(f"{sources[1]}: ") and ".bias" in k for k in unexpected):
            hint = " (the decoder weights have biases: pass a --model-config with text_config.no_bias=false)"
        raise GraceInputError("cannot convert: " + " | ".join(problems) + hint)
    return merged


def load_state_dict_file(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from .safetensors, or from .bin/.pt/.pth read with `weights_only=True` (never unpickled)."""
    if not path.is_file():
        raise GraceInputError(f"{path}: no such weights file")
    if path.suffix == ".safetensors":
        try:
            return load_file(path)
        except (SafetensorError, OSError) as err:  # truncated or not safetensors at all
            raise GraceInputError(f"{path}: not a readable safetensors file ({err})") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a pickle with non-tensor objects, or a corrupt file: torch's text runs many lines
        raise GraceInputError(
            f"{path}: not a PyTorch checkpoint of tensors ({type(err).__name__}; read with torch.load(weights_only=True), "
            "which never unpickles other objects)"
        ) from err
    for wrapper in ("model_state_dict", "state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise GraceInputError(f"{path}: not a state dict of tensors")
    return {key.removeprefix("module."): tensor for key, tensor in state.items()}


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from one file or from every weights shard in a directory."""
    if path.is_dir():
        files = sorted(path.glob("*.safetensors")) or sorted(path.glob("pytorch_model*.bin"))
        if not files:
            raise GraceInputError(f"{path}: no *.safetensors or pytorch_model*.bin weights in this directory")
        state: dict[str, torch.Tensor] = {}
        for file in files:
            state.update(load_state_dict_file(file))
        return state
    return load_state_dict_file(path)


def load_config(preset: str | None, config_path: Path | None) -> FlamingoConfig:
    """A `FlamingoConfig` from a config.json (or its directory), else the preset (default: OpenFlamingo-3B)."""
    if config_path is not None:
        if not config_path.exists():
            raise GraceInputError(f"{config_path}: no such config file")
        return FlamingoConfig.from_pretrained(config_path if config_path.is_dir() else str(config_path))
    return FlamingoConfig.from_preset(preset or "openflamingo-3b-vitl-mpt1b")


def convert_openflamingo(
    openflamingo_checkpoint: Path,
    mpt_weights: Path,
    clip_weights: Path,
    config: FlamingoConfig,
    tokenizer: Path | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[FlamingoForConditionalGeneration, FlamingoProcessor | None]:
    """The converted model (with its generation config) and, with `tokenizer`, its processor; `save_pretrained`
    writes them (`grace-hf convert-openflamingo` into its output directory)."""
    with torch.device("meta"):
        model = FlamingoForConditionalGeneration(config)
    expected = {k: v.shape for k, v in model.state_dict().items() if k != "lm_head.weight"}
    state = convert_state_dict(
        load_weights(openflamingo_checkpoint),
        load_weights(mpt_weights),
        load_weights(clip_weights),
        expected,
        sources=(str(openflamingo_checkpoint), str(mpt_weights), str(clip_weights)),
    )
    state = {k: v.to(dtype) for k, v in state.items()}
    state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    model.tie_weights()
    model.generation_config.eos_token_id = config.end_of_chunk_token_id
    model.generation_config.pad_token_id = config.pad_token_id
    processor = None if tokenizer is None else _build_processor(tokenizer, config)
    return model, processor


def _build_processor(tokenizer_dir: Path, config: FlamingoConfig) -> FlamingoProcessor:
    """The tokenizer (special tokens added) + CLIP preprocessing; its special ids must match the config's."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    size = config.vision_config["image_size"]
    image_processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    processor = FlamingoProcessor(image_processor=image_processor, tokenizer=tokenizer)
    got = (processor.media_token_id, processor.end_of_chunk_token_id, processor.pad_token_id)
    want = (config.media_token_id, config.end_of_chunk_token_id, config.pad_token_id)
    if got != want:
        raise GraceInputError(
            f"{tokenizer_dir}: tokenizer gives (<image>, <|endofchunk|>, <PAD>) ids {got}, the config expects {want}"
        )
    if len(processor.tokenizer) > config.text_config.vocab_size:
        raise GraceInputError(
            f"{tokenizer_dir}: {len(processor.tokenizer)} tokens exceed the embedding's {config.text_config.vocab_size}"
        )
    return processor
