"""Constrained generative retrieval: the identifier trie, the collection a model ranks, the model directory, the
retriever and Recall@K."""

from grace_hf.retrieval.beam_search import TrieBeamSearch, TrieBeamSearchOutput
from grace_hf.retrieval.collection import Collection, build_identifier_trie, identifier_token_ids
from grace_hf.retrieval.metrics import recall_at_k, recall_curve
from grace_hf.retrieval.model_dir import GraceConfig, read_model_dir, write_model_dir
from grace_hf.retrieval.retriever import GraceRetriever, RetrievedImage
from grace_hf.retrieval.trie import IdentifierTrie, TrieLogitsProcessor

__all__ = [
    "Collection",
    "GraceConfig",
    "GraceRetriever",
    "IdentifierTrie",
    "RetrievedImage",
    "TrieBeamSearch",
    "TrieBeamSearchOutput",
    "TrieLogitsProcessor",
    "build_identifier_trie",
    "identifier_token_ids",
    "read_model_dir",
    "recall_at_k",
    "recall_curve",
    "write_model_dir",
]
