"""The benchmarks' synthetic collections: the demo's style and a second one nothing was chosen on, and parts of one
synthetic dataset as separate collections (a Karpathy JSON and pseudo-queries each, one image root): what the
add-images benchmark and tests add to a model trained on another part."""

from __future__ import annotations

import json
from pathlib import Path

from grace_hf.commands.demo import DEMO_STYLE
from grace_hf.data.synthetic import ORACLE_PSEUDO_QUERIES_JSON, SYNTHETIC_JSON, SyntheticStyle

# The collection nothing was chosen on: sides 48-128, PNG and JPEG, RGB, gray and RGBA, five sub-folders, the extended
# caption templates; the demo's splits.
CHECK_STYLE = SyntheticStyle(
    image_sizes=(48, 64, 96, 128),
    formats=("png", "jpeg"),
    modes=("RGB", "RGB", "RGB", "L", "RGBA"),
    subfolders=5,
    caption_style="extended",
    val_fraction=DEMO_STYLE.val_fraction,
    test_fraction=DEMO_STYLE.test_fraction,
)
CHECK_SEED = 7  # its data seed (the demo's is 0)


def write_part(raw: Path, out: Path, start: int, stop: int | None = None) -> Path:
    """Write images[start:stop] of the synthetic dataset in `raw` as `out/dataset_synthetic.json` and
    `out/oracle_pseudo_queries.json` (their images stay under `raw`); return `out`."""
    data = json.loads((raw / SYNTHETIC_JSON).read_text(encoding="utf-8"))
    queries = json.loads((raw / ORACLE_PSEUDO_QUERIES_JSON).read_text(encoding="utf-8"))
    images = data["images"][start:stop]
    names = {image["filename"] for image in images}
    out.mkdir(parents=True, exist_ok=True)
    (out / SYNTHETIC_JSON).write_text(json.dumps({**data, "images": images}), encoding="utf-8")
    part_queries = {name: texts for name, texts in queries.items() if name in names}
    (out / ORACLE_PSEUDO_QUERIES_JSON).write_text(json.dumps(part_queries), encoding="utf-8")
    return out
