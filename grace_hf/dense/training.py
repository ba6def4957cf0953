"""The dense baseline's training and evaluation: an open_clip dual encoder on GRACE's data.

Same data as the generative model: the training pairs are GRACE's query -> identifier pairs with
the image in place of the identifier (human captions of train images, pseudo-queries of the other
memorized images); the evaluation queries are the human captions of the test images and the
candidates are the test images. Stages: seed -> data -> model -> train -> save -> evaluate.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import open_clip
import torch
from torch.utils.data import DataLoader, Dataset

from grace_hf.data.images import read_rgb
from grace_hf.data.karpathy import KarpathyCorpus, load_karpathy, teaching_texts
from grace_hf.data.pseudo_queries import load_pseudo_queries
from grace_hf.dense.directory import FEATURES_FILE, save_image_features
from grace_hf.dense.model import DualEncoder, resolve_model_config
from grace_hf.errors import GraceInputError
from grace_hf.evaluation.metrics import METRICS_FILE, recall_at_k, recall_curve
from grace_hf.io_utils import atomic_write_json
from grace_hf.outputs import DENSE_BASELINE, check_output_dir, output_directory
from grace_hf.runtime import progress_bar


@dataclass
class DenseTrainingArgs:
    """Optimisation settings of the dual encoder.

    An epoch shows every training image once, with one of its texts drawn at random, so a batch
    never holds the same image twice (InfoNCE would count the copy as a negative).
    """

    epochs: int = 50
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup_fraction: float = 0.1
    seed: int = 0
    num_workers: int = 0

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 2 or self.lr <= 0:
            raise GraceInputError("--epochs must be >= 1, --batch-size >= 2 and --lr > 0")


def training_texts(corpus: KarpathyCorpus, pseudo_queries: Mapping[str, list[str]] | None) -> dict[str, list[str]]:
    """Image key -> the texts that teach it (`teaching_texts`), for the memorized images that have some."""
    texts = {image.key: teaching_texts(image, pseudo_queries)[0] for image in corpus.memorized()}
    return {key: value for key, value in texts.items() if value}


class _PairDataset(Dataset):
    """(pixel values (3, H, W), token ids (L,)) of a fixed list of (image path, text) pairs."""

    def __init__(self, pairs: list[tuple[Path, str]], encoder: DualEncoder) -> None:
        self.pairs = pairs
        self.transform, self.tokenizer = encoder.transform, encoder.tokenizer  # not the model: workers get a copy

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        path, text = self.pairs[index]
        return self.transform(read_rgb(path)), self.tokenizer([text])[0]


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    # As open_clip's trainer: no weight decay on norms, biases, other 1-D parameters and the logit scale.
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        exclude = param.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name
        (no_decay if exclude else decay).append(param)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def _warmup_cosine(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


@dataclass
class TrainingResult:
    """What a training run did: the mean loss of each epoch, the optimizer steps and the wall time."""

    epoch_losses: list[float]
    steps: int
    seconds: float


def _epoch_pairs(
    keys: list[str], image_paths: Mapping[str, Path], texts: Mapping[str, list[str]], generator: torch.Generator
) -> list[tuple[Path, str]]:
    """Every image once, in a random order, each with one of its texts drawn at random."""
    pairs = []
    for i in torch.randperm(len(keys), generator=generator).tolist():
        choices = texts[keys[i]]
        pairs.append((image_paths[keys[i]], choices[int(torch.randint(len(choices), (1,), generator=generator))]))
    return pairs


def train_dual_encoder(
    encoder: DualEncoder,
    image_paths: Mapping[str, Path],
    texts: Mapping[str, list[str]],
    args: DenseTrainingArgs,
) -> TrainingResult:
    """Train `encoder` in place with open_clip's `ClipLoss` (symmetric InfoNCE) and AdamW.

    Warmup then cosine decay of the learning rate, gradient clipping at 1.0. Deterministic for
    `args.seed` (data order and text choice come from one seeded generator; seed torch before
    building the encoder for a reproducible initialisation).
    """
    keys = sorted(texts)
    if len(keys) < 2:
        raise GraceInputError(f"{len(keys)} training images with texts: the contrastive loss needs at least 2")
    generator = torch.Generator().manual_seed(args.seed)
    drop_last = len(keys) % args.batch_size == 1  # a batch of one has no negatives
    total_steps = args.epochs * (len(keys) // args.batch_size + (len(keys) % args.batch_size > 1))
    optimizer = torch.optim.AdamW(_param_groups(encoder.model, args.weight_decay), lr=args.lr, betas=(0.9, 0.98))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _warmup_cosine(total_steps, max(1, round(args.warmup_fraction * total_steps)))
    )
    loss_fn = open_clip.ClipLoss()
    epoch_losses: list[float] = []
    start = time.perf_counter()
    encoder.model.train()
    progress = progress_bar(total=total_steps, desc="baseline-clip", unit="step")
    for _ in range(args.epochs):
        pairs = _PairDataset(_epoch_pairs(keys, image_paths, texts, generator), encoder)
        loader = DataLoader(pairs, batch_size=args.batch_size, num_workers=args.num_workers, drop_last=drop_last)
        losses = []
        for pixel_values, input_ids in loader:
            image_features, text_features, logit_scale = encoder.model(pixel_values, input_ids)  # (B, D), (B, D), ()
            loss = loss_fn(image_features, text_features, logit_scale)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(encoder.model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            with torch.no_grad():  # CLIP's clamp: a temperature below 1/100 destabilises training
                encoder.model.logit_scale.clamp_(0, math.log(100))
            losses.append(loss.item())
            progress.update()
            progress.set_postfix(loss=f"{loss.item():.3f}")
        epoch_losses.append(sum(losses) / len(losses))
    progress.close()
    encoder.model.eval()
    return TrainingResult(epoch_losses=epoch_losses, steps=total_steps, seconds=time.perf_counter() - start)


def evaluate_dual_encoder(
    encoder: DualEncoder,
    queries: Sequence[str],
    gold: Sequence[str],
    candidate_keys: Sequence[str],
    candidate_features: torch.Tensor,
    ks: Sequence[int] = (1, 5, 10),
    batch_size: int = 32,
) -> dict[str, Any]:
    """Recall@K of text -> image retrieval by brute-force dot product (and `recall_curve`: K = 1 .. max K), plus speed.

    `candidate_features` (M, D) are L2-normalised image embeddings (the index, built beforehand).
    The query time covers tokenizing and encoding each query, scoring every candidate and taking
    the top K, over batches of `batch_size` queries.
    """
    top_k = min(max(ks), len(candidate_keys))
    rankings: list[list[str]] = []
    start = time.perf_counter()
    for i in range(0, len(queries), batch_size):
        query_features = encoder.encode_texts(queries[i : i + batch_size])  # (B, D)
        scores = query_features @ candidate_features.T  # (B, M)
        top = scores.topk(top_k, dim=-1).indices  # (B, K)
        rankings.extend([candidate_keys[j] for j in row] for row in top.tolist())
    elapsed = time.perf_counter() - start
    metrics = recall_at_k(rankings, list(gold), ks)
    metrics.update(
        recall_curve=recall_curve(rankings, list(gold), max(ks)),
        num_queries=len(queries),
        num_candidates=len(candidate_keys),
        query_latency_ms=1000.0 * elapsed / max(1, len(queries)),
        queries_per_second=len(queries) / elapsed if elapsed > 0 else None,
        eval_batch_size=batch_size,
    )
    return metrics


def run_baseline(
    karpathy_json: str | os.PathLike,
    image_root: str | os.PathLike,
    output_dir: str | os.PathLike,
    pseudo_queries: str | os.PathLike | None = None,
    model_config: str | os.PathLike = "tiny",
    args: DenseTrainingArgs | None = None,
    eval_batch_size: int = 32,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Train, save and evaluate the dense baseline; returns the metrics written to `metrics.json`."""
    args = args or DenseTrainingArgs()
    inputs = [karpathy_json, image_root, pseudo_queries, model_config if Path(str(model_config)).is_file() else None]
    check_output_dir(output_dir, DENSE_BASELINE, inputs, overwrite)
    model_config = resolve_model_config(model_config)  # a bad --model-config fails before the data is read
    torch.manual_seed(args.seed)

    corpus = load_karpathy(karpathy_json, image_root)
    memorized = corpus.memorized()  # restval images are not memorized, as in the original
    test_images = corpus.split("test")
    if not test_images:
        raise GraceInputError(f"{karpathy_json}: no test images to evaluate on")
    pseudo = load_pseudo_queries(pseudo_queries, corpus) if pseudo_queries else None
    texts = training_texts(corpus, pseudo)
    image_paths = {image.key: image.path for image in memorized}

    encoder = DualEncoder.from_config(model_config)
    result = train_dual_encoder(encoder, image_paths, texts, args)

    with output_directory(output_dir, DENSE_BASELINE, inputs, overwrite, "grace-hf baseline-clip") as out:
        encoder.save(out)
        features = encoder.encode_images([image.path for image in memorized])  # (N, D)
        save_image_features(out / FEATURES_FILE, features, [image.key for image in memorized])
        row = {image.key: i for i, image in enumerate(memorized)}
        candidate_keys = [image.key for image in test_images]
        eval_queries = [(caption, image.key) for image in test_images for caption in image.captions]
        metrics = {"method": "dense-clip"}
        metrics |= evaluate_dual_encoder(
            encoder,
            [query for query, _ in eval_queries],
            [key for _, key in eval_queries],
            candidate_keys,
            features[[row[key] for key in candidate_keys]],
            batch_size=eval_batch_size,
        )
        metrics |= {
            "train_seconds": result.seconds,
            "train_steps": result.steps,
            "train_images": len(texts),
            "train_pairs": sum(len(t) for t in texts.values()),
            "epochs": args.epochs,
            "batch_size": args.batch_size,
            "lr": args.lr,
            "seed": args.seed,
            "epoch_losses": result.epoch_losses,
        }
        atomic_write_json(out / METRICS_FILE, metrics)
    return metrics
