"""`grace-hf train --config recipe.yaml [--field value ...]`: the Accelerate (+ DeepSpeed) training loop.

    grace-hf train --config recipes/synthetic/structured.yaml
    accelerate launch --config_file accelerate_configs/deepspeed_zero3.yaml -m grace_hf train \\
        --config recipes/flickr30k/structured.yaml --output-dir runs/flickr30k-structured
"""

from __future__ import annotations

import shlex
import sys

from grace_hf.training.args import parse_args
from grace_hf.training.loop import train


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    model_args, data_args, args = parse_args(argv)
    train(model_args, data_args, args, command=shlex.join(["grace-hf", "train", *argv]))
    return 0
