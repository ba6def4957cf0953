"""grace_hf: generative cross-modal retrieval (GRACE, ACL 2024) on HuggingFace transformers.

Importing `grace_hf` registers the Flamingo model with `AutoConfig`, `AutoModelForCausalLM` and `AutoProcessor`, and
the `transformers.pipeline` task "text-to-image-retrieval".

Example:
    >>> from grace_hf import GraceRetriever
    >>> retriever = GraceRetriever.from_pretrained("demo_output/model-structured")
    >>> hits = retriever.retrieve(["a small red star at the top left"], top_k=5)[0]
    >>> [(hit.image_key, round(hit.score, 2)) for hit in hits]
"""

import os
import sys

try:
    from grace_hf.identifiers import IdentifierIndex
    from grace_hf.models.flamingo import FlamingoConfig, FlamingoForConditionalGeneration, FlamingoProcessor
    from grace_hf.retrieval import GraceRetriever, IdentifierTrie, RetrievedImage
    from grace_hf.serving.pipeline import TextToImageRetrievalPipeline
except KeyboardInterrupt:
    # The `grace-hf` script and `python -m grace_hf` (`make demo`, `accelerate launch -m grace_hf`) import this
    # package, torch and transformers included, before the CLI's own Ctrl-C handling exists: there, an interrupt is
    # one line and status 130. Python sets sys.argv[0] to "-m" until the module is found; pip's script keeps its path.
    # A program that imports grace_hf gets its KeyboardInterrupt as usual.
    if sys.argv[:1] != ["-m"] and os.path.basename(sys.argv[0]).removesuffix(".exe") != "grace-hf":
        raise
    print("grace-hf: interrupted", file=sys.stderr)
    raise SystemExit(130) from None

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
