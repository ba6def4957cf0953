"""`grace-hf add-images --model DIR --karpathy-json NEW.json --image-root ROOT --output-dir NEWDIR [--config recipe.yaml]
[--field value ...]`: new images into a trained retriever, by continued training with replay.

    grace-hf add-images --config recipes/synthetic/add_images.yaml --model runs/synthetic-structured \\
        --karpathy-json data/new/dataset_synthetic.json --image-root data/new \\
        --pseudo-queries data/new/pseudo_queries.json --output-dir runs/synthetic-structured-added
    grace-hf add-images ... --captioner runs/synthetic-captioner   # new val/test images with no text at all
    accelerate launch --config_file accelerate_configs/deepspeed_zero3.yaml -m grace_hf add-images \\
        --config recipes/flickr30k/add_images.yaml --model runs/flickr30k-structured ... --output-dir runs/added
"""

from __future__ import annotations

import shlex
import sys

from grace_hf.training.adding import add_images
from grace_hf.training.args import ADD_IMAGES_ARGUMENT_CLASSES, parse_args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    model_args, data_args, args = parse_args(
        argv, ADD_IMAGES_ARGUMENT_CLASSES, "grace-hf add-images", __doc__.split("\n\n")[0]
    )
    add_images(model_args, data_args, args, command=shlex.join(["grace-hf", "add-images", *argv]))
    return 0
