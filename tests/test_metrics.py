"""Recall@K on hand-made rankings: every query counts, duplicates do not take a rank."""

import pytest

from grace_hf.evaluation.metrics import recall_at_k, recall_curve

RANKINGS = [
    ["a", "b", "c"],  # gold at rank 1
    ["b", "b", "a", "c"],  # duplicate "b" takes one rank: gold "c" is at rank 3
    [],  # nothing returned: a miss at every K
    ["d", "e", "f", "g", "h", "i"],  # gold at rank 6
]
GOLD = ["a", "c", "a", "i"]


def test_recall_at_k_by_hand():
    assert recall_at_k(RANKINGS, GOLD, ks=(1, 3, 5, 6)) == {
        "recall@1": 0.25,
        "recall@3": 0.5,
        "recall@5": 0.5,
        "recall@6": 0.75,
    }
    assert recall_curve(RANKINGS, GOLD, max_k=6) == [0.25, 0.25, 0.5, 0.5, 0.5, 0.75]


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="2 rankings for 1 gold"):
        recall_at_k([["a"], ["b"]], ["a"])
    with pytest.raises(ValueError, match="at least one query"):
        recall_at_k([], [])
