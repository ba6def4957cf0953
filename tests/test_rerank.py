"""Re-ranking the beams with a dense scorer: the fusion, the weight fitted on val only, rerank.json, and
`evaluate --rerank`, `retrieve --rerank`, the pipeline, the serve app and `compare` end to end on a tiny trained
model with a tiny trained `baseline-clip` directory."""

import json
import os
import shutil
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from transformers import pipeline

import grace_hf  # noqa: F401  (registers the pipeline task)
from grace_hf.commands.baseline_clip import main as baseline_clip
from grace_hf.commands.cli import main as cli_main
from grace_hf.data.prepared import load_prepared
from grace_hf.dense.model import DualEncoder
from grace_hf.errors import GraceInputError
from grace_hf.evaluation.comparison import comparison_table
from grace_hf.evaluation.queries import load_eval_queries
from grace_hf.model_dir import RERANK_FILE
from grace_hf.retrieval.rerank import (
    DenseScorer,
    RerankConfig,
    Reranker,
    fit_fusion_weight,
    fit_on_val,
    fuse,
    load_reranker,
    read_rerank_config,
    write_rerank_config,
)
from grace_hf.retrieval.retriever import GraceRetriever, RetrievedImage
from grace_hf.serving.pipeline import TASK
from tests.helpers import MICRO, reset_accelerate

# the fusion and the fit, with a stand-in dense model


class _Encoder:
    """A stand-in dense text tower: query -> the unit vector along axis `axes[query]`; logit scale 1."""

    def __init__(self, axes, dim=4):
        self.axes, self.dim = axes, dim
        self.model = SimpleNamespace(logit_scale=torch.tensor(0.0))

    def encode_texts(self, texts):
        return torch.eye(self.dim)[[self.axes[text] for text in texts]]


def _scorer(axes):
    return DenseScorer(_Encoder(axes), torch.eye(4), ["0", "1", "2", "3"])  # image "i" lies on axis i


def test_fuse_is_the_beam_order_at_weight_1_and_the_cosine_order_at_weight_0():
    beams, cosines = [-0.1, -2.0, -3.0], [0.0, 0.5, 1.0]
    at_one, at_zero = fuse(beams, cosines, 1.0, 10.0), fuse(beams, cosines, 0.0, 10.0)
    assert sorted(range(3), key=lambda i: -at_one[i]) == [0, 1, 2]
    assert sorted(range(3), key=lambda i: -at_zero[i]) == [2, 1, 0]
    assert at_zero == pytest.approx([0.0, 5.0, 10.0])
    assert sum(torch.tensor(at_one).exp().tolist()) == pytest.approx(1.0)  # log_softmax over the beams
    shifted = fuse([b + 5 for b in beams], cosines, 0.5, 10.0)  # a per-query shift of the beam scores is no change
    assert shifted == pytest.approx(fuse(beams, cosines, 0.5, 10.0))
    assert fuse([], [], 0.5, 10.0) == []


def test_reranker_reorders_the_beam_images_and_ranks_no_others():
    hits = [RetrievedImage("0", "a", -0.5), RetrievedImage("2", "b", -1.5), RetrievedImage("3", "c", -2.0)]
    scorer = _scorer({"q": 2})
    assert [h.image_key for h in Reranker(scorer, 1.0, 3).rerank(["q"], [hits])[0]] == ["0", "2", "3"]
    ranked = Reranker(scorer, 0.0, 3).rerank(["q"], [hits])[0]
    assert [h.image_key for h in ranked] == ["2", "0", "3"] and [h.identifier for h in ranked] == ["b", "a", "c"]
    assert ranked[0].score == pytest.approx(1.0)  # the fused score replaces the beam score
    for weight, beams, message in ((1.5, 3, r"weight must be a number in \[0, 1\]"), (0.5, 0, "beams must be")):
        with pytest.raises(GraceInputError, match=message):
            Reranker(scorer, weight, beams)


def test_fit_picks_the_weight_that_is_best_on_the_queries_it_is_given():
    hits = [RetrievedImage("0", "x", -0.5), RetrievedImage("2", "y", -1.5), RetrievedImage("3", "z", -2.0)]
    scorer = _scorer({"q0": 2, "q1": 3})
    weight, table = fit_fusion_weight([hits, hits], ["q0", "q1"], ["2", "3"], scorer)  # the cosine is right
    recall = {row["weight"]: row["recall@1"] for row in table}
    assert len(table) == 21 and recall[0.0] == 1.0 and recall[1.0] == 0.0
    assert recall[weight] == 1.0 and weight < 0.5
    weight, table = fit_fusion_weight([hits], ["q1"], ["0"], scorer)  # the beams are right, the cosine is not
    recall = {row["weight"]: row["recall@1"] for row in table}
    # gold "0" wins where 1.5 * weight > 1 - weight: every weight above 0.4; ties go to the weight nearest 0.5
    assert all(recall[w] == (1.0 if w > 0.41 else 0.0) for w in recall if abs(w - 0.4) > 0.01) and weight == 0.5
    with pytest.raises(GraceInputError, match="as many"):
        fit_fusion_weight([hits], ["q0", "q1"], ["0"], scorer)


def test_rerank_json_round_trip_and_refusals(tmp_path):
    config = RerankConfig(0.35, 12, "runs/dense", "ab" * 32, "30 val captions", [{"weight": 0.35, "recall@1": 0.5}])
    write_rerank_config(tmp_path, config)
    assert read_rerank_config(tmp_path) == config
    assert read_rerank_config(tmp_path / "nowhere") is None
    for text, message in (
        ("[1]", "expected a JSON object with 'weight' and 'num_beams'"),
        ('{"weight": -0.1, "num_beams": 5}', r"weight must be a number in \[0, 1\], got -0.1"),
        ('{"weight": true, "num_beams": 5}', "weight must be a number"),
        ('{"weight": 0.5, "num_beams": 0}', "beams must be a whole number >= 1"),
        ('{"weight": 0.5, "num_beams": 5, "dense": 3}', "'dense' must be a string"),
        ("{", "not valid JSON"),
    ):
        (tmp_path / RERANK_FILE).write_text(text)
        with pytest.raises(GraceInputError, match=f"{RERANK_FILE}: .*{message}"):
            read_rerank_config(tmp_path)

    scorer = _scorer({})
    scorer.directory, scorer.fingerprint = "runs/other-dense", "cd" * 32
    (tmp_path / RERANK_FILE).unlink()
    with pytest.raises(GraceInputError, match=rf"no {RERANK_FILE} .*grace-hf evaluate .*--rerank runs/other-dense"):
        load_reranker(tmp_path, scorer)
    assert load_reranker(tmp_path, scorer, rerank_weight=0.2).num_beams == 30  # a weight needs no fit
    write_rerank_config(tmp_path, config)
    with pytest.raises(GraceInputError, match="fitted with the dense model runs/dense .*not with runs/other-dense"):
        load_reranker(tmp_path, scorer)
    scorer.fingerprint = config.dense_fingerprint  # the same dense model, moved: accepted
    reranker = load_reranker(tmp_path, scorer, rerank_beams=7)
    assert (reranker.weight, reranker.num_beams) == (0.35, 7)


# end to end on the tiny trained model


@pytest.fixture(scope="module")
def dense_dir(trained_model, micro_config, tmp_path_factory):
    """A tiny `grace-hf baseline-clip` directory trained on the model's collection (one layer per tower)."""
    _, _, raw = trained_model
    out = tmp_path_factory.mktemp("dense") / "dense"
    argv = ["--karpathy-json", str(raw / "dataset_synthetic.json"), "--image-root", str(raw), "--output-dir", str(out)]
    argv += [
        "--pseudo-queries",
        str(raw / "oracle_pseudo_queries.json"),
        "--model-config",
        str(micro_config),
        "--epochs",
        "3",
    ]
    assert baseline_clip([*argv, "--batch-size", "20", "--lr", "5e-3", "--num-threads", "1"]) == 0
    return out


@pytest.fixture
def model_copy(trained_model, tmp_path):
    """A copy of the trained model directory (re-ranking writes rerank.json into it)."""
    model_dir, _, _ = trained_model
    return shutil.copytree(model_dir, tmp_path / "model")


def _cli(argv):
    try:
        return cli_main(argv)
    finally:
        reset_accelerate()


@pytest.mark.parametrize("command", ["retrieve", "evaluate", "serve"])
def test_a_bad_rerank_directory_is_refused_before_the_model_is_read(command, tmp_path, capsys):
    """The model path does not exist: the error must be the dense directory's, said before the model is loaded."""
    argv = [command, "--model", str(tmp_path / "no-model"), "--rerank", str(tmp_path)]
    argv += {
        "retrieve": ["a red star"],
        "evaluate": ["--data", str(tmp_path), "--output-dir", str(tmp_path / "e")],
    }.get(command, [])
    assert cli_main(argv) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path}: not a `grace-hf baseline-clip` directory" in err and "no-model" not in err


def test_fit_on_val_never_reads_a_test_query(trained_model, model_copy, dense_dir, monkeypatch):
    _, data, _ = trained_model
    splits = load_prepared(data)
    val, test = set(splits["val_queries"]["query"]), set(splits["queries"]["query"])
    seen = []
    encode, search = DualEncoder.encode_texts, GraceRetriever._search_all
    monkeypatch.setattr(
        DualEncoder, "encode_texts", lambda self, texts, **kw: seen.extend(texts) or encode(self, texts)
    )
    monkeypatch.setattr(GraceRetriever, "_search_all", lambda self, q, *a: seen.extend(q) or search(self, q, *a))
    retriever = GraceRetriever.from_pretrained(model_copy, device="cpu")
    config = fit_on_val(retriever, data, DenseScorer.from_directory(dense_dir), 6, distributed=False)
    assert seen and set(seen) <= val and not set(seen) & test
    assert 0.0 <= config.weight <= 1.0 and config.num_beams == 6 and len(config.val_grid) == 21
    assert config.dense == str(dense_dir) and len(config.dense_fingerprint) == 64


def test_evaluate_rerank_fits_on_val_saves_the_weight_and_reports_both(
    trained_model, model_copy, dense_dir, tmp_path, capsys
):
    _, data, _ = trained_model
    argv = ["evaluate", "--model", str(model_copy), "--data", str(data), "--batch-size", "8", "--num-threads", "1"]
    assert _cli([*argv, "--output-dir", str(tmp_path / "e1"), "--rerank", str(dense_dir), "--rerank-beams", "6"]) == 0
    out = capsys.readouterr().out
    saved = read_rerank_config(model_copy)
    assert f"wrote {model_copy / RERANK_FILE} (a temporary file renamed into place)" in out
    assert saved.num_beams == 6 and saved.dense == str(dense_dir) and "val captions" in saved.fitted_on
    metrics = json.loads((tmp_path / "e1" / "metrics.json").read_text())
    rerank = metrics["rerank"]
    assert rerank["weight"] == saved.weight and rerank["num_beams"] == metrics["num_beams"] == 6
    assert {"recall@1", "recall@5", "recall@10", "recall_curve"} <= rerank.keys() and "recall@1" in metrics
    assert metrics["split"] == "test" and "re-ranked: R@1" in out
    records = [json.loads(line) for line in (tmp_path / "e1" / "queries.jsonl").read_text().splitlines()]
    assert sorted(records[0]["reranked"]["image_keys"]) == sorted(records[0]["image_keys"][:6])

    # the saved weight is used as it is; another dense model is refused, nothing written
    saved_text = (model_copy / RERANK_FILE).read_text()
    assert _cli([*argv, "--output-dir", str(tmp_path / "e2"), "--rerank", str(dense_dir)]) == 0
    assert "fitted" not in capsys.readouterr().out and (model_copy / RERANK_FILE).read_text() == saved_text
    again = json.loads((tmp_path / "e2" / "metrics.json").read_text())["rerank"]
    assert {key: again[key] for key in ("weight", "recall@1", "recall_curve")} == {
        key: rerank[key] for key in ("weight", "recall@1", "recall_curve")
    }
    other = shutil.copytree(dense_dir, tmp_path / "other-dense")
    features = other / "image_features.safetensors"
    features.write_bytes(features.read_bytes())  # the same bytes: the same model, moved
    assert _cli([*argv, "--output-dir", str(tmp_path / "e3"), "--rerank", str(other)]) == 0
    torch.manual_seed(1)
    DualEncoder.from_config(MICRO).save(other)  # other weights
    assert _cli([*argv, "--output-dir", str(tmp_path / "e4"), "--rerank", str(other)]) == 2
    assert "fitted with the dense model" in capsys.readouterr().err and not (tmp_path / "e4").exists()

    # compare shows the plain and the re-ranked rows
    table = comparison_table([tmp_path / "e1"])
    rows = [line for line in table.splitlines() if line.startswith("| e1")]
    assert len(rows) == 2 and rows[1].startswith(f"| e1 + rerank | rerank (weight {saved.weight:.2f}, 6 beams) |")
    assert f"{100 * rerank['recall@1']:.1f}" in rows[1].split("|")[3]
    assert _cli(["compare", str(tmp_path / "e1"), "--output-dir", str(tmp_path / "cmp")]) == 0
    assert (tmp_path / "cmp" / "recall.png").is_file()


def test_evaluate_split_val_ranks_the_val_images(trained_model, model_copy, tmp_path):
    _, data, _ = trained_model
    argv = ["evaluate", "--model", str(model_copy), "--data", str(data), "--split", "val", "--num-threads", "1"]
    assert _cli([*argv, "--output-dir", str(tmp_path / "val")]) == 0
    metrics = json.loads((tmp_path / "val" / "metrics.json").read_text())
    val = load_prepared(data)["val_queries"]
    assert metrics["split"] == "val" and metrics["num_queries"] == val.num_rows
    assert metrics["num_candidates"] == len(set(val["image_key"]))
    records = [json.loads(line) for line in (tmp_path / "val" / "queries.jsonl").read_text().splitlines()]
    assert {key for record in records for key in record["image_keys"]} <= set(val["image_key"])


def _reference(model_dir, dense_dir, queries, candidates, top_k):
    """The beams of the plain retriever, re-ranked by hand."""
    plain = GraceRetriever.from_pretrained(model_dir, device="cpu", num_beams=6, candidates=candidates)
    beams = plain.retrieve(queries, top_k=6)
    reranker = Reranker(DenseScorer.from_directory(dense_dir), read_rerank_config(model_dir).weight, 6)
    return [hits[:top_k] for hits in reranker.rerank(queries, beams)]


def test_retrieve_pipeline_and_serve_rerank(trained_model, model_copy, dense_dir, capsys):
    from grace_hf.serving.app import SearchService, build_app  # imports gradio (the optional `app` extra)

    _, data, _ = trained_model
    queries, gold, candidates = load_eval_queries(data, limit=3)
    fingerprint = DenseScorer.from_directory(dense_dir).fingerprint
    write_rerank_config(model_copy, RerankConfig(0.0, 6, str(dense_dir), fingerprint))  # the dense order
    expected = _reference(model_copy, dense_dir, queries, candidates, 3)

    plain = GraceRetriever.from_pretrained(model_copy, device="cpu", num_beams=6, candidates=candidates)
    plain_order = [[h.image_key for h in hits] for hits in plain.retrieve(queries, top_k=3)]
    assert plain_order != [[h.image_key for h in hits] for hits in expected]  # re-ranking changed something
    retriever = GraceRetriever.from_pretrained(model_copy, device="cpu", candidates=candidates, reranker=dense_dir)
    assert retriever.num_beams == 6 and retriever.reranker.weight == 0.0
    got = retriever.retrieve(queries, top_k=3)
    assert [[(h.image_key, h.identifier) for h in hits] for hits in got] == [
        [(h.image_key, h.identifier) for h in hits] for hits in expected
    ]

    argv = ["retrieve", "--model", str(model_copy), "--data", str(data), "--num-queries", "3", "--top-k", "3"]
    assert _cli([*argv, "--rerank", str(dense_dir), "--num-threads", "1"]) == 0
    printed = capsys.readouterr().out
    for hits in expected:
        assert f"  1. {hits[0].image_key}  id {hits[0].identifier}  score {hits[0].score:.3f}" in printed

    retrieve = pipeline(TASK, model=str(model_copy), device="cpu", candidates=candidates, reranker=str(dense_dir))
    for query, hits in zip(queries, expected):
        ranking = retrieve(query, top_k=3)
        assert [r["image_key"] for r in ranking] == [h.image_key for h in hits]
        assert [r["score"] for r in ranking] == pytest.approx([h.score for h in hits], abs=1e-4)
    with pytest.raises(GraceInputError, match="need a reranker"):
        pipeline(TASK, model=str(model_copy), device="cpu", rerank_weight=0.5)

    service = SearchService(retriever, test_captions=list(zip(queries, gold)), default_top_k=3)
    _, statuses, answers = service.search_batch(queries, [3] * len(queries))
    for answer, hits in zip(answers, expected):
        assert [r["image_key"] for r in answer["results"]] == [h.image_key for h in hits]
    assert service.max_top_k == 6 and build_app(service) is not None


@pytest.mark.slow
def test_two_process_rerank_fit_and_evaluation_equal_one_process(trained_model, dense_dir, tmp_path):
    """Under `accelerate launch` every process fits the same weight from the gathered val beams; one writes it."""
    _, data, _ = trained_model
    models = {name: shutil.copytree(trained_model[0], tmp_path / f"model-{name}") for name in ("one", "two")}
    argv = ["-m", "grace_hf", "evaluate", "--data", str(data), "--rerank", str(dense_dir), "--rerank-beams", "6"]
    argv += ["--batch-size", "4", "--num-threads", "1"]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--main_process_port", "0", "--multi_gpu"]
    launch += ["--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    for name, prefix in (("one", [sys.executable]), ("two", launch)):
        command = [*prefix, *argv, "--model", str(models[name]), "--output-dir", str(tmp_path / f"eval-{name}")]
        run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-3000:]
        assert run.stdout.count("fitted the re-ranking weight") == 1
    one, two = (json.loads((tmp_path / f"eval-{name}" / "metrics.json").read_text()) for name in ("one", "two"))
    assert two["num_processes"] == 2
    assert read_rerank_config(models["one"]).weight == read_rerank_config(models["two"]).weight
    for key in ("weight", "recall@1", "recall@5", "recall@10", "recall_curve"):
        assert one["rerank"][key] == two["rerank"][key]
