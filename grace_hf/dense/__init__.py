"""The dense baseline: a small open_clip dual encoder trained on the same pairs as the generative model.

`grace-hf baseline-clip` trains and evaluates it (`grace_hf.dense.train`); its image features
(`image_features.safetensors`) also serve structured identifiers where no pretrained CLIP exists.
"""

from grace_hf.dense.model import (
    CONFIG_NAME,
    FEATURES_NAME,
    PRESETS,
    WEIGHTS_NAME,
    DualEncoder,
    load_dual_encoder,
    load_image_features,
    resolve_model_config,
    save_image_features,
)

__all__ = [
    "CONFIG_NAME",
    "FEATURES_NAME",
    "PRESETS",
    "WEIGHTS_NAME",
    "DualEncoder",
    "load_dual_encoder",
    "load_image_features",
    "resolve_model_config",
    "save_image_features",
]
