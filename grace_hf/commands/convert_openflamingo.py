"""`grace-hf convert-openflamingo`: merge an OpenFlamingo `checkpoint.pt`, MPT (MosaicGPT) decoder weights and open_clip
vision weights into one safetensors model directory that `from_pretrained` loads.

    grace-hf convert-openflamingo \\
        --openflamingo-checkpoint OpenFlamingo-3B-vitl-mpt1b/checkpoint.pt \\
        --mpt-weights mpt-1b-redpajama-200b/ --clip-weights ViT-L-14-openai.pt \\
        --tokenizer gpt-neox-20b/ --preset openflamingo-3b-vitl-mpt1b --output-dir models/openflamingo-3b
"""

from __future__ import annotations

from pathlib import Path

import torch

from grace_hf.commands.common import add_overwrite, command_parser
from grace_hf.models.flamingo import FLAMINGO_PRESETS
from grace_hf.models.flamingo.convert_openflamingo import convert_openflamingo, load_config
from grace_hf.outputs import MODEL, check_output_dir, output_directory


def main(argv: list[str] | None = None) -> int:
    parser = command_parser("convert-openflamingo", __doc__.split("\n\n")[0], renamed={"--config": "--model-config"})
    parser.add_argument("--openflamingo-checkpoint", type=Path, required=True, help="OpenFlamingo checkpoint.pt")
    parser.add_argument("--mpt-weights", type=Path, required=True, help="MPT/MosaicGPT weights: a file or directory")
    parser.add_argument("--clip-weights", type=Path, required=True, help="open_clip state dict (visual.* keys)")
    parser.add_argument("--tokenizer", type=Path, help="tokenizer directory (e.g. GPT-NeoX-20B) to save beside it")
    preset = parser.add_mutually_exclusive_group()
    preset.add_argument("--preset", choices=sorted(FLAMINGO_PRESETS), default=None, help="model shape")
    preset.add_argument("--model-config", type=Path, help="a FlamingoConfig config.json (or its directory)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    parser.add_argument("--output-dir", type=Path, required=True, help="the model directory to write")
    add_overwrite(parser)
    args = parser.parse_args(argv)
    inputs = [args.openflamingo_checkpoint, args.mpt_weights, args.clip_weights, args.tokenizer]
    check_output_dir(args.output_dir, MODEL, inputs, args.overwrite)  # before any weight is read
    model, processor = convert_openflamingo(
        args.openflamingo_checkpoint,
        args.mpt_weights,
        args.clip_weights,
        load_config(args.preset, args.model_config),
        tokenizer=args.tokenizer,
        dtype=getattr(torch, args.dtype),
    )
    command = "grace-hf convert-openflamingo"
    with output_directory(args.output_dir, MODEL, inputs, args.overwrite, command) as tmp:
        model.save_pretrained(tmp)
        if processor is not None:
            processor.save_pretrained(tmp)
    print(f"wrote {args.output_dir}")
    return 0
