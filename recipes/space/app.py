"""Hugging Face Space entry point: `grace-hf serve` on the folders beside this file, as `prepare_space.py` lays them
out: `model/` (the trained model directory), `images/` (thumbnails by image key) and, if present, `queries.jsonl`
(test captions with their gold image: the examples, and the gold image marked).

A Space must listen on 0.0.0.0 (its proxy forwards to port 7860); run locally, this serves the network too.
"""

import os
import sys
from pathlib import Path

from grace_hf.commands.serve import main

HERE = Path(__file__).resolve().parent

if __name__ == "__main__":
    argv = ["--model", str(HERE / "model"), "--image-root", str(HERE / "images"), "--host", "0.0.0.0"]
    argv += ["--port", os.environ.get("GRADIO_SERVER_PORT", "7860")]
    if (HERE / "queries.jsonl").is_file():
        argv += ["--queries", str(HERE / "queries.jsonl")]
    sys.exit(main(argv))
