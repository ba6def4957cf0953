"""Constrained generative retrieval: the identifier trie, the retriever and Recall@K (`recall_at_k`; the `evaluate`
metric is `grace_hf.retrieval.metrics.RecallAtK`)."""

from grace_hf.retrieval.beam_search import TrieBeamSearch, TrieBeamSearchOutput
from grace_hf.retrieval.metrics import recall_at_k
from grace_hf.retrieval.retriever import GraceRetriever, RetrievedImage, build_identifier_trie
from grace_hf.retrieval.trie import IdentifierTrie, TrieLogitsProcessor

__all__ = [
    "GraceRetriever",
    "IdentifierTrie",
    "RetrievedImage",
    "TrieBeamSearch",
    "TrieBeamSearchOutput",
    "TrieLogitsProcessor",
    "build_identifier_trie",
    "recall_at_k",
]
