"""`grace-hf evaluate` and `grace-hf retrieve` on a tiny random model and a hand-made prepared dataset, plus the
same evaluation split over two `accelerate launch` CPU processes."""

import json
import os
import subprocess
import sys

import pytest
from datasets import Dataset, DatasetDict, Features, Image, Value
from PIL import Image as PILImage
from test_retriever import IMAGES, QUERIES, build_tiny_model_dir

from grace_hf.commands import evaluate, retrieve
from grace_hf.commands.cli import main as cli_main
from grace_hf.errors import GraceInputError
from grace_hf.identifiers import IdentifierIndex
from grace_hf.serving.gallery import folder_image_loader

TEST_IMAGES = IMAGES[4:]


def write_prepared(directory, queries, gold, collection=TEST_IMAGES):
    """A prepared dataset as `grace-hf prepare` writes it (i2id, t2id, queries + identifiers.json)."""
    images = [PILImage.new("RGB", (16, 16), (20 * n, 100, 200 - 10 * n)) for n in range(len(IMAGES))]
    identifiers = [" ".join(str(n)) for n in range(len(IMAGES))]
    text = Value("string")
    DatasetDict(
        {
            "i2id": Dataset.from_dict(
                {"image": images, "image_key": IMAGES, "identifier": identifiers},
                features=Features({"image": Image(), "image_key": text, "identifier": text}),
            ),
            "t2id": Dataset.from_dict({"query": QUERIES, "image_key": IMAGES[:3], "identifier": identifiers[:3]}),
            "queries": Dataset.from_dict({"query": queries, "image_key": gold}),
        }
    ).save_to_disk(str(directory))
    IdentifierIndex("numeric", {k: [i] for k, i in zip(IMAGES, identifiers)}, [], list(collection)).save(directory)
    return directory


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    model = build_tiny_model_dir(root / "model")
    queries = [f"{q} number {n}" for n, q in enumerate(QUERIES * 3)]
    gold = [TEST_IMAGES[n % len(TEST_IMAGES)] for n in range(len(queries))]
    data = write_prepared(root / "prepared", queries, gold)
    return root, model, data, queries, gold


@pytest.fixture(scope="module")
def single_run(setup):
    """`grace-hf evaluate` in this process; returns the metrics file and what it printed."""
    root, model, data, _, _ = setup
    output = root / "single"
    argv = ["evaluate", "--model", str(model), "--data", str(data), "--output-dir", str(output), "--batch-size", "4"]
    assert cli_main(argv) == 0
    return output


def test_evaluate_writes_metrics_per_query_results_and_plot(setup, single_run):
    root, model, data, queries, gold = setup
    metrics = json.loads((single_run / "metrics.json").read_text())
    assert {"recall@1", "recall@5", "recall@10", "num_queries", "num_candidates", "queries_per_second"} <= set(metrics)
    assert (metrics["num_queries"], metrics["num_candidates"]) == (len(queries), len(TEST_IMAGES))
    records = [json.loads(line) for line in (single_run / "queries.jsonl").read_text().splitlines()]
    assert [r["query"] for r in records] == queries and [r["gold"] for r in records] == gold
    for k in (1, 5, 10):  # every query is in the denominator
        hits = sum(r["gold_rank"] is not None and r["gold_rank"] <= k for r in records)
        assert metrics[f"recall@{k}"] == hits / len(queries)
    assert metrics["recall@10"] == 1.0  # 8 candidates, 8 beams: every gold image is ranked
    assert all(set(r["image_keys"]) <= set(TEST_IMAGES) for r in records)
    assert (single_run / "recall.png").read_bytes()[:4] == b"\x89PNG"
    assert metrics["recall_curve"][0] == metrics["recall@1"] and len(metrics["recall_curve"]) == 10


def test_evaluate_errors(setup, tmp_path):
    root, model, data, queries, gold = setup
    args = ["--model", str(model), "--output-dir", str(tmp_path / "eval")]
    with pytest.raises(GraceInputError, match="not a prepared dataset"):
        evaluate.main([*args, "--data", str(tmp_path / "nothing")])
    bad = write_prepared(tmp_path / "bad", ["a red square"], [IMAGES[0]])  # gold is a train image
    with pytest.raises(GraceInputError, match=r"queries\[0\] \('a red square'\): gold image 'images/000.png'"):
        evaluate.main([*args, "--data", str(bad)])
    assert cli_main(["evaluate", *args, "--data", str(tmp_path / "nothing")]) == 2
    assert not (tmp_path / "eval").exists()


def test_retrieve_prints_rankings_and_writes_gallery(setup, capsys):
    root, model, data, queries, gold = setup
    argv = ["--model", str(model), "--top-k", "3", "--data", str(data), "--num-queries", "2"]
    argv += ["--output-dir", str(root / "retrieved")]
    assert retrieve.main([*argv, "a free text query"]) == 0
    out = capsys.readouterr().out
    assert out.count("query: ") == 3 and "[gold: images/004.png]" in out
    html = (root / "retrieved" / "gallery.html").read_text()
    results = [json.loads(line) for line in (root / "retrieved" / "results.jsonl").read_text().splitlines()]
    assert [r["query"] for r in results] == ["a free text query", *queries[:2]] and len(results[1]["results"]) == 3
    assert html.count("<section>") == 3 and "data:image/png;base64," in html
    assert 'class="gold' in html  # the gold image is framed: retrieved, or shown as "not retrieved"
    with pytest.raises(GraceInputError, match="no queries"):
        retrieve.main(["--model", str(model)])
    with pytest.raises(GraceInputError, match=r"queries\[0\]: empty query"):
        retrieve.main(["--model", str(model), ""])


ZERO3_CONFIG = """\
compute_environment: LOCAL_MACHINE
distributed_type: DEEPSPEED
deepspeed_config:
  zero_stage: 3
  zero3_init_flag: true
  offload_optimizer_device: none
  offload_param_device: none
num_machines: 1
num_processes: 2
machine_rank: 0
mixed_precision: 'no'
use_cpu: false
rdzv_backend: static
same_network: true
"""


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["MULTI_CPU", "DEEPSPEED"])
def test_two_process_evaluation_equals_one_process(setup, single_run, mode, tmp_path):
    """Each process ranks a shard of the queries (ZeRO-3: with the weights sharded too); results are gathered."""
    root, model, data, _, _ = setup
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--main_process_port", "0"]
    if mode == "DEEPSPEED":
        (tmp_path / "zero3.yaml").write_text(ZERO3_CONFIG)
        launch += ["--config_file", str(tmp_path / "zero3.yaml")]
    else:  # accelerate starts several CPU processes through its multi-GPU (torchrun) path; no GPU is visible
        launch += ["--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no"]
        launch += ["--dynamo_backend", "no"]
    output = tmp_path / "eval"
    command = [*launch, "-m", "grace_hf", "evaluate", "--model", str(model), "--data", str(data)]
    command += ["--output-dir", str(output), "--batch-size", "2"]  # 9 queries: uneven shards and batches
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr[-3000:]
    one, two = json.loads((single_run / "metrics.json").read_text()), json.loads((output / "metrics.json").read_text())
    assert (two["num_processes"], two["distributed_type"]) == (2, mode)
    for key in ("recall@1", "recall@5", "recall@10", "num_queries", "num_candidates"):
        assert one[key] == two[key]
    ranked_one = [json.loads(line)["image_keys"] for line in (single_run / "queries.jsonl").open()]
    ranked_two = [json.loads(line)["image_keys"] for line in (output / "queries.jsonl").open()]
    assert ranked_one == ranked_two


def test_gallery_never_reads_outside_the_image_root(tmp_path):
    (tmp_path / "root").mkdir()
    (tmp_path / "secret.png").write_bytes(b"not for the gallery")
    load = folder_image_loader(tmp_path / "root")
    assert load("missing.png") is None
    with pytest.raises(GraceInputError, match="not a path inside the image root"):
        load("../secret.png")
    with pytest.raises(GraceInputError, match="not a normalised path inside an image root"):
        IdentifierIndex("numeric", {"../secret.png": ["1"]}).validate()
