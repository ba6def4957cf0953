"""The dense baseline: a small open_clip dual encoder trained on the same pairs as the generative model.

`grace-hf baseline-clip` trains and evaluates it (`grace_hf.dense.training.run_baseline`); its image features
(`image_features.safetensors`) also serve structured identifiers where no pretrained CLIP exists.
"""

from grace_hf.dense.model import (
    PRESETS,
    DualEncoder,
    load_dual_encoder,
    resolve_model_config,
)
from grace_hf.dense.training import DenseTrainingArgs, run_baseline

__all__ = [
    "PRESETS",
    "DenseTrainingArgs",
    "DualEncoder",
    "load_dual_encoder",
    "resolve_model_config",
    "run_baseline",
]
