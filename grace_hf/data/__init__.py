"""Data: read and validate Karpathy JSONs, pseudo-queries, the built-in synthetic data.

`grace_hf.data.build` (`grace-hf prepare`) turns them into `datasets`; it is imported on its own so
that this package stays free of the identifier machinery.
"""

from grace_hf.data.karpathy import KarpathyCorpus, KarpathyImage, load_karpathy
from grace_hf.data.pseudo_queries import load_pseudo_queries, write_pseudo_queries
from grace_hf.data.synthetic import write_synthetic

__all__ = [
    "KarpathyCorpus",
    "KarpathyImage",
    "load_karpathy",
    "load_pseudo_queries",
    "write_pseudo_queries",
    "write_synthetic",
]
