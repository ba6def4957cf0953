"""Image identifiers: the kinds behind one registry, and the `IdentifierIndex` they produce.

Example:
    >>> from grace_hf.data.karpathy import load_karpathy
    >>> from grace_hf.identifiers import build_identifiers
    >>> corpus = load_karpathy("data/synthetic/dataset_synthetic.json", "data/synthetic")
    >>> index = build_identifiers("structured", corpus, pixel_features=True)
    >>> index.save("identifiers.json")
    >>> index.codebooks.save("identifier_codebooks.safetensors")  # the k-means tree, to code more images later
"""

from grace_hf.identifiers.codebooks import CODEBOOKS_FILE, Codebooks
from grace_hf.identifiers.index import IDENTIFIERS_FILE, IdentifierIndex
from grace_hf.identifiers.registry import (
    CONTENT_KINDS,
    IDENTIFIER_KINDS,
    build_identifiers,
    extend_identifiers,
    get_identifier_kind,
)

__all__ = [
    "CODEBOOKS_FILE",
    "CONTENT_KINDS",
    "IDENTIFIER_KINDS",
    "IDENTIFIERS_FILE",
    "Codebooks",
    "IdentifierIndex",
    "build_identifiers",
    "extend_identifiers",
    "get_identifier_kind",
]
