"""What a retrieval returns: one ranked image per `RetrievedImage`."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["RetrievedImage"]


@dataclass(frozen=True)
class RetrievedImage:
    """One ranked result: the image, the identifier the model wrote for it, and that beam's score (the identifier's
    log-probability divided by length ** length_penalty)."""

    image_key: str
    identifier: str
    score: float
