"""Constrained generative retrieval: the identifier trie, the collection a model ranks, the fast beam search and the
retriever."""

from grace_hf.retrieval.collection import Collection, build_identifier_trie, identifier_token_ids
from grace_hf.retrieval.decoding import TrieBeamSearch, TrieBeamSearchOutput
from grace_hf.retrieval.results import RetrievedImage
from grace_hf.retrieval.retriever import GraceRetriever
from grace_hf.retrieval.trie import IdentifierTrie, TrieLogitsProcessor

__all__ = [
    "Collection",
    "GraceRetriever",
    "IdentifierTrie",
    "RetrievedImage",
    "TrieBeamSearch",
    "TrieBeamSearchOutput",
    "TrieLogitsProcessor",
    "build_identifier_trie",
    "identifier_token_ids",
]
