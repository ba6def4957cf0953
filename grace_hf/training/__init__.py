"""Training with Accelerate (+ DeepSpeed): arguments from YAML recipes, the two-task loop, checkpoints, saving.

>>> from grace_hf.training import parse_args
>>> from grace_hf.training.loop import train
>>> metrics = train(*parse_args(["--config", "recipes/synthetic/structured.yaml", "--max_steps", "50"]))
"""

from grace_hf.training.args import DataArguments, GraceTrainingArguments, ModelArguments, parse_args

__all__ = ["DataArguments", "GraceTrainingArguments", "ModelArguments", "parse_args"]
