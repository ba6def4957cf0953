"""grace_hf: generative cross-modal retrieval (GRACE, ACL 2024) on HuggingFace transformers.

Importing `grace_hf` registers the Flamingo model with `AutoConfig`, `AutoModelForCausalLM` and `AutoProcessor`, and
the `transformers.pipeline` task "text-to-image-retrieval".

Example:
    >>> from grace_hf import GraceRetriever
    >>> retriever = GraceRetriever.from_pretrained("demo_output/model-structured")
    >>> hits = retriever.retrieve(["a small red star at the top left"], top_k=5)[0]
    >>> [(hit.image_key, round(hit.score, 2)) for hit in hits]
"""

from grace_hf.identifiers import IdentifierIndex
from grace_hf.models.flamingo import FlamingoConfig, FlamingoForConditionalGeneration, FlamingoProcessor
from grace_hf.retrieval import GraceRetriever, IdentifierTrie, RetrievedImage
from grace_hf.serving.pipeline import TextToImageRetrievalPipeline

__version__ = "0.1.0"

__all__ = [
    "FlamingoConfig",
    "FlamingoForConditionalGeneration",
    "FlamingoProcessor",
    "GraceRetriever",
    "IdentifierIndex",
    "IdentifierTrie",
    "RetrievedImage",
    "TextToImageRetrievalPipeline",
    "__version__",
]
