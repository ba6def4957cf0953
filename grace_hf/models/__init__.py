"""Model families of grace_hf."""

from .flamingo import FlamingoConfig, FlamingoForConditionalGeneration, FlamingoProcessor

__all__ = ["FlamingoConfig", "FlamingoForConditionalGeneration", "FlamingoProcessor"]
