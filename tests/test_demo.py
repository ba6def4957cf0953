"""The end-to-end demo, shrunk: every stage runs and every promised file is there and well-formed."""

import base64
import io
import json
import re

from PIL import Image

from grace_hf.commands.demo import main


def test_demo_writes_metrics_gallery_plot_and_table(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["--output-dir", str(out), "--num-images", "30", "--max-steps", "3"]) == 0
    serve = f"grace-hf serve --model {out / 'model-structured'} --image-root {out / 'data'}"
    assert capsys.readouterr().out.rstrip().endswith(f"{serve} --queries {out / 'queries.jsonl'}")

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["identifier_kind"] == "structured"
    assert metrics["num_queries"] == 15  # 3 test images x 5 captions, every one counted
    assert 0.0 <= metrics["recall@1"] <= metrics["recall@5"] <= metrics["recall@10"] <= 1.0
    assert len((out / "queries.jsonl").read_text().splitlines()) == metrics["num_queries"]

    page = (out / "gallery.html").read_text()
    thumbnails = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(re.findall(r"<section>", page)) == 3  # one example query per test image
    assert thumbnails, "the gallery shows no images"
    for data in thumbnails:
        assert Image.open(io.BytesIO(base64.b64decode(data))).size[0] > 0
    assert 'class="gold"' in page or "gold absent" in page

    assert Image.open(out / "recall.png").format == "PNG"
    table = (out / "comparison.md").read_text()
    assert "| structured |" in table and "| dense-clip |" in table
