"""Lay out a Hugging Face Space for a trained GRACE model: the app, the `grace_hf` library, the model directory,
thumbnails of the collection's images and, optionally, its test captions (README.md beside this file).

    python recipes/space/prepare_space.py --model runs/synthetic-structured --image-root data/synthetic \\
        --queries runs/synthetic-structured/eval_queries.jsonl --output-dir space/
    hf upload <user>/grace-synthetic space/ . --repo-type space
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import gradio
from PIL import Image

from grace_hf.data.karpathy import image_file
from grace_hf.errors import GraceInputError
from grace_hf.identifiers import IdentifierIndex
from grace_hf.outputs import output_directory
from grace_hf.serving.app import read_test_captions

HERE = Path(__file__).resolve().parent
LIBRARY = HERE.parents[1] / "grace_hf"
NOT_COPIED = ("checkpoints", "logs", "__pycache__", ".grace*")  # training state, caches, markers: not served
SPACE = "space"  # the output kind of a Space folder

CARD = """---
title: {title}
sdk: gradio
sdk_version: {gradio_version}
app_file: app.py
pinned: false
---

GRACE generative cross-modal retrieval: the model writes the identifier of the image a query describes, by beam
search constrained to the identifiers of this collection's {num_images:,} images. Type a query, or pick a test
caption: its gold image is framed in green when it is retrieved. The `/search` endpoint answers `gradio_client` and
plain HTTP calls.
"""


def prepare_space(
    model: str | os.PathLike,
    image_root: str | os.PathLike,
    output_dir: str | os.PathLike,
    queries: str | os.PathLike | None = None,
    thumbnail_size: int = 256,
) -> Path:
    """Write the Space folder `output_dir` (replacing only an earlier Space folder); return it."""
    model, image_root, output_dir = Path(model), Path(image_root), Path(output_dir)
    collection = IdentifierIndex.load(model).collection
    if not collection:
        raise GraceInputError(f"{model}: the identifiers name no collection (test images) to serve")
    with output_directory(output_dir, SPACE, inputs=[model, image_root, queries]) as tmp:
        shutil.copytree(model, tmp / "model", ignore=shutil.ignore_patterns(*NOT_COPIED))
        for key in collection:
            source = image_file(image_root, key)
            if not source.is_file():
                raise GraceInputError(f"{source}: the image of collection key {key!r} is missing")
            with Image.open(source) as image:
                image.thumbnail((thumbnail_size, thumbnail_size))
                (tmp / "images" / key).parent.mkdir(parents=True, exist_ok=True)
                image.save(tmp / "images" / key)
        if queries is not None:
            members = set(collection)
            lines = [
                json.dumps({"query": query, "gold": gold}, ensure_ascii=False) + "\n"
                for query, gold in read_test_captions(queries)
                if gold in members
            ]
            (tmp / "queries.jsonl").write_text("".join(lines), encoding="utf-8")
        shutil.copytree(LIBRARY, tmp / "grace_hf", ignore=shutil.ignore_patterns(*NOT_COPIED))
        for name in ("app.py", "requirements.txt"):
            shutil.copy(HERE / name, tmp / name)
        card = CARD.format(title=model.name, gradio_version=gradio.__version__, num_images=len(collection))
        (tmp / "README.md").write_text(card, encoding="utf-8")
    return output_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="trained model directory")
    parser.add_argument("--image-root", required=True, help="folder of the image files (`<root>/<image key>`)")
    parser.add_argument("--queries", default=None, help="test captions: JSON lines with 'query' and 'gold'")
    parser.add_argument("--output-dir", required=True, help="the Space folder to write")
    parser.add_argument("--thumbnail-size", type=int, default=256, help="longest side of the images kept (256)")
    args = parser.parse_args(argv)
    path = prepare_space(args.model, args.image_root, args.output_dir, args.queries, args.thumbnail_size)
    print(f"wrote {path}; try it with `python {path / 'app.py'}`, push it with `hf upload <user>/<space> {path} .`")
    return 0


if __name__ == "__main__":
    sys.exit(main())
