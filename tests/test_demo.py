"""The end-to-end demo, shrunk to 120 images and 300 steps (~1.5 min): every stage runs, every promised file is there
and well-formed, and the figures land in the band this size reaches (rq alone ~0.68 R@1 over 12 test images,
re-ranked ~0.75, the dense baseline ~0.47: a broken stage drops them to chance, 1 / 12)."""

import base64
import io
import json
import re

from PIL import Image

from grace_hf.commands.demo import main


def test_demo_writes_metrics_gallery_plot_and_table(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["--output-dir", str(out), "--num-images", "120", "--max-steps", "300"]) == 0
    serve = f"grace-hf serve --model {out / 'model-rq'} --rerank {out / 'dense-clip'} --image-root {out / 'data'}"
    assert capsys.readouterr().out.rstrip().endswith(f"{serve} --queries {out / 'queries.jsonl'}")

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["identifier_kind"] == "rq"
    assert metrics["num_queries"] == 60  # 12 test images x 5 captions, every one counted
    assert 0.5 <= metrics["recall@1"] <= metrics["recall@5"] <= metrics["recall@10"] <= 1.0
    assert metrics["recall@1"] <= 0.85 and metrics["recall@10"] >= 0.9
    reranked = metrics["rerank"]
    assert 0.0 <= reranked["weight"] <= 1.0 and reranked["num_beams"] == 30
    assert 0.6 <= reranked["recall@1"] <= 0.9 and reranked["recall@1"] >= metrics["recall@1"] - 0.05
    rerank_config = json.loads((out / "model-rq" / "rerank.json").read_text())
    assert rerank_config["weight"] == reranked["weight"] and "val captions" in rerank_config["fitted_on"]
    dense = json.loads((out / "dense-clip" / "metrics.json").read_text())
    assert 0.3 <= dense["recall@1"] <= 0.65 < reranked["recall@1"]
    assert len((out / "queries.jsonl").read_text().splitlines()) == metrics["num_queries"]

    page = (out / "gallery.html").read_text()
    thumbnails = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(re.findall(r"<section>", page)) == 8  # NUM_GALLERY_QUERIES example queries, of different images
    assert thumbnails, "the gallery shows no images"
    for data in thumbnails:
        assert Image.open(io.BytesIO(base64.b64decode(data))).size[0] > 0
    assert 'class="gold"' in page or "gold absent" in page

    assert Image.open(out / "recall.png").format == "PNG"
    table = (out / "comparison.md").read_text()
    assert "| model-rq |" in table and "| model-rq + rerank |" in table and "| dense-clip |" in table
