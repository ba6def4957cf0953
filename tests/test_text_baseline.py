"""The text-only baseline: BM25 (bm25s) over the texts that teach each candidate image, on hand-made texts and on
synthetic data through `grace-hf baseline-bm25`."""

import json

import pytest

from grace_hf.commands.cli import main as cli_main
from grace_hf.data.karpathy import load_karpathy
from grace_hf.data.pseudo_queries import load_pseudo_queries
from grace_hf.data.synthetic import write_synthetic
from grace_hf.evaluation.text_baseline import Bm25Ranker, evaluate_bm25, run_text_baseline

DOCUMENTS = ["a red star on a gray background", "two blue circles", "", "a green square, large"]


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return write_synthetic(tmp_path_factory.mktemp("synthetic"), 40, seed=0, num_workers=1, oracle_pseudo_queries=True)


def _argv(root, output_dir, pseudo_queries="oracle_pseudo_queries.json"):
    argv = ["baseline-bm25", "--karpathy-json", str(root / "dataset_synthetic.json"), "--image-root", str(root)]
    if pseudo_queries:
        argv += ["--pseudo-queries", str(root / pseudo_queries)]
    return [*argv, "--output-dir", str(output_dir)]


def test_an_exact_text_ranks_its_document_first():
    ranker = Bm25Ranker(DOCUMENTS)
    for position, document in enumerate(DOCUMENTS[:2] + DOCUMENTS[3:]):
        expected = position if position < 2 else 3
        assert ranker.rank(document, 4)[0] == expected
    assert ranker.rank("blue", 2) == [1, 0]  # ties (no shared word) keep the document order


def test_a_query_of_unknown_words_matches_nothing_not_the_empty_document():
    ranker = Bm25Ranker(DOCUMENTS)
    assert ranker.scores("the zebra").tolist() == [0.0] * len(DOCUMENTS)
    assert ranker.rank("the zebra", 4) == [0, 1, 2, 3]


def test_evaluate_bm25_recalls_and_index_time():
    keys = ["star.png", "circles.png", "blank.png", "square.png"]
    metrics, index_seconds = evaluate_bm25(
        DOCUMENTS, keys, ["red star", "blue circles", "green square", "gray circles"], keys[:2] + keys[3:] + keys[:1]
    )
    assert metrics["recall@1"] == 0.75  # "gray circles": one word each, the shorter document first
    assert metrics["recall_curve"][:4] == [0.75, 1.0, 1.0, 1.0]
    assert metrics["num_queries"] == 4 and metrics["num_candidates"] == 4
    assert index_seconds > 0 and metrics["query_latency_ms"] > 0


def test_run_on_synthetic_writes_test_and_val_metrics(synthetic, tmp_path, capsys):
    output = tmp_path / "bm25"
    assert cli_main(_argv(synthetic, output)) == 0
    assert "bm25: R@1" in capsys.readouterr().out
    metrics = json.loads((output / "metrics.json").read_text())
    corpus = load_karpathy(synthetic / "dataset_synthetic.json", synthetic)
    assert metrics["method"] == "bm25"
    assert metrics["num_candidates"] == len(corpus.split("test"))
    assert metrics["num_queries"] == len(corpus.caption_queries("test"))
    assert metrics["val"]["num_queries"] == len(corpus.caption_queries("val"))
    assert metrics["train_seconds"] > 0 and metrics["candidates_without_text"] == 0
    assert metrics["recall@1"] > 0.5  # the synthetic pseudo-queries describe the test images
    assert json.loads((output / ".grace_hf_output.json").read_text())["kind"] == "text-baseline"


def test_candidates_without_text_are_counted(synthetic, tmp_path):
    corpus = load_karpathy(synthetic / "dataset_synthetic.json", synthetic)
    pseudo = load_pseudo_queries(synthetic / "oracle_pseudo_queries.json", corpus)
    first_test = corpus.split("test")[0].key
    partial = tmp_path / "partial.json"
    partial.write_text(json.dumps({key.rsplit("/", 1)[-1]: q for key, q in pseudo.items() if key != first_test}))
    metrics = run_text_baseline(synthetic / "dataset_synthetic.json", synthetic, tmp_path / "out", partial)
    assert metrics["candidates_without_text"] == 1


def test_hostile_input_is_one_message_and_no_output(synthetic, tmp_path, capsys):
    output = tmp_path / "bm25"
    assert cli_main(_argv(synthetic, output, pseudo_queries="missing.json")) == 2
    assert "missing.json" in capsys.readouterr().err
    assert cli_main(_argv(synthetic, output, pseudo_queries=None)) == 2
    assert "no --pseudo-queries given, so no test image has a text to index" in capsys.readouterr().err

    train_only = tmp_path / "train_only.json"
    corpus = load_karpathy(synthetic / "dataset_synthetic.json", synthetic)
    train_only.write_text(json.dumps({corpus.split("train")[0].key: ["a query"]}))
    assert cli_main([*_argv(synthetic, output, pseudo_queries=None), "--pseudo-queries", str(train_only)]) == 2
    assert "train_only.json: names no test image, so no test image has a text to index" in capsys.readouterr().err

    data = json.loads((synthetic / "dataset_synthetic.json").read_text())
    for image in data["images"]:
        image["split"] = "train" if image["split"] == "test" else image["split"]
    no_test = tmp_path / "no_test.json"
    no_test.write_text(json.dumps(data))
    argv = _argv(synthetic, output)
    argv[argv.index("--karpathy-json") + 1] = str(no_test)
    assert cli_main(argv) == 2
    assert "no_test.json: no test images with captions to evaluate on" in capsys.readouterr().err
    assert not output.exists()
