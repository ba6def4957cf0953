"""HF-native OpenFlamingo: configuration, model, processor and tokenizer; registered with the Auto classes."""

from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor

from .configuration_flamingo import FLAMINGO_PRESETS, FlamingoConfig, FlamingoTextConfig
from .modeling_flamingo import FlamingoForConditionalGeneration, FlamingoModel, FlamingoPreTrainedModel
from .processing_flamingo import FlamingoProcessor
from .tokenization import train_tokenizer

__all__ = [
    "FLAMINGO_PRESETS",
    "FlamingoConfig",
    "FlamingoForConditionalGeneration",
    "FlamingoModel",
    "FlamingoPreTrainedModel",
    "FlamingoProcessor",
    "FlamingoTextConfig",
    "train_tokenizer",
]

AutoConfig.register(FlamingoConfig.model_type, FlamingoConfig, exist_ok=True)
AutoConfig.register(FlamingoTextConfig.model_type, FlamingoTextConfig, exist_ok=True)
AutoModelForCausalLM.register(FlamingoConfig, FlamingoForConditionalGeneration, exist_ok=True)
AutoModelForImageTextToText.register(FlamingoConfig, FlamingoForConditionalGeneration, exist_ok=True)
AutoProcessor.register(FlamingoConfig, FlamingoProcessor, exist_ok=True)
