"""Parts of one synthetic dataset as separate collections (a Karpathy JSON and pseudo-queries each, one image root):
what the add-images benchmark and tests add to a model trained on another part."""

from __future__ import annotations

import json
from pathlib import Path

from grace_hf.data.synthetic import ORACLE_PSEUDO_QUERIES_JSON, SYNTHETIC_JSON


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
