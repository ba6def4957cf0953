"""The end-to-end demo, shrunk to 120 images (60 train, 12 val, 48 test) and 300 steps per model: every stage runs
(dense baseline as the vision tower, captioner, pseudo-queries from pixels, BM25, rq identifiers, the Flamingo,
re-ranking), every promised file is there and well-formed, and the figures land in the band this size reaches
(a broken stage drops them to chance: R@10 = 10 / 48)."""

import base64
import io
import json
import re
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from grace_hf.commands import demo
from grace_hf.commands.demo import main


@pytest.mark.slow  # about 3 minutes on 2 cores: three models and two baselines
def test_demo_writes_metrics_gallery_plot_and_table(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = Path("demo")  # relative, as `make demo` gives it
    assert main(["--output-dir", str(out), "--num-images", "120", "--max-steps", "300"]) == 0
    serve = f"grace-hf serve --model {out / 'model-rq'} --rerank {out / 'dense-clip'} --image-root {out / 'data'}"
    assert capsys.readouterr().out.rstrip().endswith(f"{serve} --queries {out / 'queries.jsonl'}")

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["identifier_kind"] == "rq"
    assert metrics["num_queries"] == 240 and metrics["num_candidates"] == 48  # 48 test images x 5 captions
    assert 0.0 <= metrics["recall@1"] <= metrics["recall@5"] <= metrics["recall@10"] <= 1.0
    reranked = metrics["rerank"]
    assert 0.0 <= reranked["weight"] <= 1.0 and reranked["num_beams"] == 30
    rerank_config = json.loads((out / "model-rq" / "rerank.json").read_text())
    assert rerank_config["weight"] == reranked["weight"] and "val captions" in rerank_config["fitted_on"]
    # the demo is built in a sibling directory renamed at the end: what its files name is seen from the model
    recorded_args = json.loads((out / "model-rq" / "training_args.json").read_text())
    captioner_args = json.loads((out / "captioner" / "training_args.json").read_text())
    prepare_record = json.loads((out / "prepared-rq" / "prepare.json").read_text())
    markers = [json.loads((out / run / ".grace_hf_output.json").read_text()) for run in ("model-rq", "captioner")]
    records = [metrics, rerank_config, recorded_args, captioner_args, prepare_record, *markers]
    assert "grace-partial" not in json.dumps(records)
    assert f"--output-dir {out / 'model-rq'} " in recorded_args["command"]  # the command line, by the final names
    assert prepare_record["inputs"]["image_root"] == "../data"
    assert recorded_args["data"] == ["../prepared-rq"]
    assert recorded_args["arguments"]["vision_tower"] == "../dense-clip"
    for recorded in (reranked["dense"], rerank_config["dense"]):
        assert (out / "model-rq" / recorded).resolve() == (out / "dense-clip").resolve()
    assert rerank_config["fitted_on"].endswith(" of ../prepared-rq")
    dense = json.loads((out / "dense-clip" / "metrics.json").read_text())
    bm25 = json.loads((out / "bm25" / "metrics.json").read_text())
    assert dense["num_queries"] == bm25["num_queries"] == 240 and bm25["method"] == "bm25"
    for figures in (metrics, reranked, dense, bm25):
        assert figures["recall@10"] >= 0.3, figures  # chance is 10 / 48 = 0.21
    assert len((out / "queries.jsonl").read_text().splitlines()) == metrics["num_queries"]

    # the val and test images' only text is what the captioner wrote from their pixels
    assert not list((out / "data").glob("*pseudo*"))
    pseudo = json.loads((out / "pseudo-queries" / "pseudo_queries.json").read_text())
    assert len(pseudo) == 60 and all(queries for queries in pseudo.values())
    quality = json.loads((out / "pseudo-queries" / "quality.json").read_text())
    assert quality["split"] == "val" and quality["num_images"] == 12 and 0.0 < quality["bleu4"] <= 100.0

    # without --num-threads each training runs on its recipe's threads (and the captioner decodes in a worker)
    def arguments(run):
        return json.loads((out / run / "training_args.json").read_text())["arguments"]

    assert arguments("model-rq")["torch_num_threads"] == 2
    assert arguments("captioner")["torch_num_threads"] == 1 and arguments("captioner")["dataloader_num_workers"] == 1
    # the Flamingos' vision tower is the dense baseline's image encoder, copied into each model directory
    tower = load_file(out / "model-rq" / "model.safetensors")["model.vision_model.conv1.weight"]
    assert torch.equal(tower, load_file(out / "dense-clip" / "open_clip_model.safetensors")["visual.conv1.weight"])

    page = (out / "gallery.html").read_text()
    thumbnails = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(re.findall(r"<section>", page)) == 8 + 1  # NUM_GALLERY_QUERIES example queries, then the captioner's
    assert "What the captioner wrote" in page
    for data in thumbnails:
        assert Image.open(io.BytesIO(base64.b64decode(data))).size[0] > 0
    assert 'class="gold"' in page or "gold absent" in page

    assert Image.open(out / "recall.png").format == "PNG"
    table = (out / "comparison.md").read_text()
    for row in ("| model-rq |", "| model-rq + rerank |", "| dense-clip |", "| bm25 |"):
        assert row in table


def test_training_threads_follow_the_recipe_or_the_demo_flag(monkeypatch):
    """Each training runs on its recipe's `torch_num_threads` unless the demo was given `--num-threads` (then every
    stage's); either way the demo's own threads are back once it returns."""
    seen = []

    def fake_train(model_args, data_args, args, command):
        seen.append(args.torch_num_threads)
        torch.set_num_threads(args.torch_num_threads)

    monkeypatch.setattr(demo, "train", fake_train)
    before = torch.get_num_threads()
    argv = ["--data", "prepared", "--output-dir", "model"]
    demo._train(demo._recipe("rq"), argv, max_steps=None)
    demo._train(demo._recipe("rq"), argv, max_steps=None, num_threads=1)
    demo._train(demo._recipe("captioner"), ["--karpathy-json", "d.json", "--image-root", "d"], None)
    assert seen == [2, 1, 1]
    assert torch.get_num_threads() == before
