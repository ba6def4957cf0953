"""`grace-hf compare`: one table from the metrics of generative and dense runs."""

import json

import pytest

from grace_hf.commands.compare import main
from grace_hf.data.synthetic import write_synthetic
from grace_hf.errors import GraceInputError
from grace_hf.evaluation.comparison import COLUMNS, comparison_table
from grace_hf.evaluation.text_baseline import run_text_baseline


def _run_dir(root, name, metrics):
    run = root / name
    run.mkdir()
    (run / "metrics.json").write_text(json.dumps(metrics))
    return run


@pytest.fixture
def runs(tmp_path):
    generative = _run_dir(
        tmp_path,
        "structured",
        {
            "recall@1": 0.374,
            "recall@5": 0.595,
            "recall@10": 0.662,
            "num_queries": 5000,
            "queries_per_second": 8.0,
            "train_seconds": 3600.0,
            "identifier_kind": "structured",
        },
    )
    partial = _run_dir(tmp_path, "numeric", {"recall@1": 0.1, "recall@5": 0.2, "recall@10": 0.3})
    dense = _run_dir(
        tmp_path,
        "dense",
        {
            "method": "dense-clip",
            "recall@1": 0.5,
            "recall@5": 0.75,
            "recall@10": 0.875,
            "num_queries": 200,
            "num_candidates": 40,
            "train_seconds": 61.25,
            "query_latency_ms": 0.5,
            "queries_per_second": 2000.0,
        },
    )
    return generative, partial, dense


def _cells(line):
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def test_table_has_one_row_per_run(runs):
    lines = comparison_table(runs).splitlines()
    assert _cells(lines[0]) == list(COLUMNS)
    assert len(lines) == 2 + len(runs)
    assert _cells(lines[2]) == ["structured", "structured", "37.4", "59.5", "66.2", "5000", "3600.0", "125.00"]
    # a run without the optional keys shows "-"
    assert _cells(lines[3]) == ["numeric", "-", "10.0", "20.0", "30.0", "-", "-", "-"]
    assert _cells(lines[4]) == ["dense", "dense-clip", "50.0", "75.0", "87.5", "200", "61.2", "0.50"]


def test_the_text_baseline_is_a_row_beside_the_others(runs, tmp_path):
    data = write_synthetic(tmp_path / "data", 20, seed=0, num_workers=1, oracle_pseudo_queries=True)
    bm25 = tmp_path / "bm25"
    metrics = run_text_baseline(data / "dataset_synthetic.json", data, bm25, data / "oracle_pseudo_queries.json")
    lines = comparison_table([*runs, bm25]).splitlines()
    assert len(lines) == 2 + len(runs) + 1
    row = _cells(lines[-1])
    assert row[:2] == ["bm25", "bm25"]
    assert row[2] == f"{100 * metrics['recall@1']:.1f}" and row[5] == str(metrics["num_queries"])
    assert row[6] == f"{metrics['train_seconds']:.1f}" and row[7] == f"{metrics['query_latency_ms']:.2f}"


def test_metrics_file_path_and_output(runs, tmp_path, capsys):
    output = tmp_path / "comparison"
    assert main([str(runs[2] / "metrics.json"), str(runs[0]), "--output-dir", str(output)]) == 0
    printed = capsys.readouterr().out
    assert printed == (output / "comparison.md").read_text()
    assert [_cells(line)[0] for line in printed.splitlines()[2:]] == ["dense", "structured"]


def test_missing_or_bad_metrics_is_an_input_error(runs, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(GraceInputError, match="empty: no metrics.json"):
        comparison_table([runs[0], empty])
    broken = _run_dir(tmp_path, "broken", {})
    (broken / "metrics.json").write_text("{not json")
    with pytest.raises(GraceInputError, match="metrics.json: not valid JSON"):
        comparison_table([broken])
    (broken / "metrics.json").write_text("[1, 2]")
    with pytest.raises(GraceInputError, match="expected a JSON object, got list"):
        comparison_table([broken])
    bad_values = {
        '{"recall@1": "x"}': "recall@1 must be a recall between 0 and 1, got 'x'",
        '{"recall@1": 0.5, "recall@5": 42}': "recall@5 must be a recall",
        '{"recall@1": 0.5, "recall_curve": "up"}': "recall_curve must be a list of recalls",
        '{"recall@1": 0.5, "rerank": {"recall@1": null}}': "rerank.recall@1 must be a recall",
    }
    for text, message in bad_values.items():
        (broken / "metrics.json").write_text(text)
        with pytest.raises(GraceInputError, match=message):
            comparison_table([broken])
