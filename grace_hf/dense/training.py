"""The dense baseline's training and evaluation: an open_clip dual encoder on GRACE's data.

Same data as the generative model: the training pairs are GRACE's query -> identifier pairs with
the image in place of the identifier (human captions of train images, pseudo-queries of the other
memorized images); the evaluation queries are the human captions of the test images and the
candidates are the test images. Trained to convergence: after each epoch the human captions of the val images
rank the val images (those captions never teach), and training stops when val Recall@1 has not improved for
`patience` epochs, keeping the best epoch's weights. Each epoch shows every image in a changed view (crop, JPEG)
and adds SLIP's image-image term, so that the image tower also finds an image from an altered copy: it is the vision
tower of the Flamingo, and query by image needs that. Stages: seed -> data -> model -> train -> save -> evaluate.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import open_clip
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from grace_hf.data.images import read_rgb
from grace_hf.data.karpathy import KarpathyCorpus, load_karpathy, teaching_texts
from grace_hf.data.pseudo_queries import load_pseudo_queries
from grace_hf.dense.directory import FEATURES_FILE, save_image_features
from grace_hf.dense.model import DualEncoder, resolve_model_config
from grace_hf.errors import GraceInputError
from grace_hf.evaluation.metrics import METRICS_FILE, retrieval_metrics
from grace_hf.io_utils import atomic_write_json
from grace_hf.outputs import DENSE_BASELINE, check_output_dir, output_directory
from grace_hf.runtime import progress_bar
from grace_hf.training.views import ImageViews

IMAGE_LOGIT_SCALE = 10.0  # the image-image term's inverse temperature (SimCLR's and SLIP's 0.1)
PIXEL_CACHE_BYTES = 2**30  # training images kept preprocessed in memory when all of them fit in this


@dataclass
class DenseTrainingArgs:
    """Optimisation settings of the dual encoder.

    An epoch shows every training image once, with one of its texts drawn at random, so a batch
    never holds the same image twice (InfoNCE would count the copy as a negative). `epochs` is the most
    epochs run: training stops earlier once val Recall@1 has not improved for `patience` epochs
    (`patience` 0: always run `epochs`; the learning rate decays over `epochs` either way). `views` changes each
    training image per epoch (crops, JPEG: `ImageViews`, decided by seed, epoch and image), as open_clip's training
    crops do; the saved features and every evaluation use the unchanged images. `image_loss_weight` > 0 adds SLIP's
    image-image term (Mu et al., 2022): a second view of each image must find the first among the batch's images,
    which teaches the image tower to find an image from an altered copy (query by image). `every_image` extends that
    term to the memorized images without texts (val and test images, known by their pixels): each batch of
    captioned images is joined by as many of them.
    """

    # val R@1 on a few val images is noisy and climbs slowly from scratch: patience 10 stopped three of six demo runs
    # at test R@1 2.2-2.6 where patience 30 reached 15.7-21.1 on the same data (docs/results.md)
    epochs: int = 150
    patience: int = 30
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup_fraction: float = 0.1
    seed: int = 0
    num_workers: int = 0
    # views and the image-image term lifted val R@1 by 5 points and the copies a cosine finds from 23% to 44% on a
    # collection nothing else was chosen on (docs/serving.md, query by image)
    views: ImageViews = field(default_factory=lambda: ImageViews(crop_scale=0.7, jpeg_quality=40))
    image_loss_weight: float = 1.0
    every_image: bool = False

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 2 or self.lr <= 0 or self.patience < 0:
            raise GraceInputError("--epochs must be >= 1, --batch-size >= 2, --lr > 0 and --patience >= 0")
        if self.image_loss_weight < 0 or (self.image_loss_weight > 0 and not self.views.changes_images):
            raise GraceInputError("--image-loss-weight must be >= 0, and above 0 it needs views that change images")
        if self.every_image and not self.image_loss_weight:
            raise GraceInputError("--every-image extends the image-image term: it needs --image-loss-weight above 0")


def training_texts(corpus: KarpathyCorpus, pseudo_queries: Mapping[str, list[str]] | None) -> dict[str, list[str]]:
    """Image key -> the texts that teach it (`teaching_texts`), for the memorized images that have some."""
    texts = {image.key: teaching_texts(image, pseudo_queries)[0] for image in corpus.memorized()}
    return {key: value for key, value in texts.items() if value}


class _PairDataset(Dataset):
    """((pixel values (3, H, W), ...), token ids (L,), has text) of a fixed list of (image index, image path, text)
    triples (text None: an image for the image-image term only); an image found in `pixels` (path -> its preprocessed pixels, or its RGB image when `views` change images) is not
    read again. With views, image `index` is shown in its view of `epoch`, and `num_views` 2 adds a second view."""

    def __init__(
        self,
        pairs: list[tuple[int, Path, str | None]],
        encoder: DualEncoder,
        pixels: Mapping[Path, torch.Tensor | Image.Image] | None = None,
        views: ImageViews | None = None,
        seed: int = 0,
        epoch: int = 0,
        num_views: int = 1,
    ) -> None:
        self.pairs, self.pixels = pairs, pixels or {}
        self.transform, self.tokenizer = encoder.transform, encoder.tokenizer  # not the model: workers get a copy
        self.views = views if views is not None and views.changes_images else None
        self.seed, self.epoch, self.num_views = seed, epoch, num_views

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> tuple[tuple[torch.Tensor, ...], torch.Tensor, bool]:
        image_index, path, text = self.pairs[index]
        pixels = self.pixels.get(path)
        tokens = self.tokenizer([text or ""])[0]
        if self.views is None:
            return (self.transform(read_rgb(path)) if pixels is None else pixels,), tokens, text is not None
        image = read_rgb(path) if pixels is None else pixels
        # a second view is the view of a negative row, which no image has
        rows = (image_index, -1 - image_index)[: self.num_views]
        views = tuple(self.transform(self.views(image, self.seed, self.epoch, row)) for row in rows)
        return views, tokens, text is not None


def preprocessed_images(
    paths: Sequence[Path], encoder: DualEncoder, max_bytes: int | None = None, views: ImageViews | None = None
) -> dict[Path, torch.Tensor | Image.Image]:
    """Each image of `paths` through the encoder's (deterministic, eval-time) transform once, when all of them fit in
    `max_bytes` (None: `PIXEL_CACHE_BYTES`); else nothing (every epoch reads them again). With `views` that change
    images, the images are kept as read (RGB), for the views to change. Reading them took a quarter of the demo's
    epochs; its 250 training images take 3 MB."""
    if not paths:
        return {}
    first = encoder.transform(read_rgb(paths[0]))
    if first.numel() * first.element_size() * len(paths) > (PIXEL_CACHE_BYTES if max_bytes is None else max_bytes):
        return {}
    if views is not None and views.changes_images:
        return {path: read_rgb(path) for path in paths}
    return {path: encoder.transform(read_rgb(path)) for path in paths}


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
    """What a training run did: the mean loss of each epoch run, the optimizer steps taken, the wall time (validation
    included), the validation score after each epoch and the (1-based) epoch whose weights were kept."""

    epoch_losses: list[float]
    steps: int
    seconds: float
    val_scores: list[float] = field(default_factory=list)
    best_epoch: int | None = None

    @property
    def epochs_run(self) -> int:
        return len(self.epoch_losses)


class EarlyStopping:
    """Keeps the weights of the best-scoring epoch (in memory) and says when `patience` epochs brought no gain;
    the epochs up to `warmup_epochs` (the learning-rate warm-up, when scores still say little) are never counted."""

    def __init__(self, patience: int, warmup_epochs: int = 0) -> None:
        self.patience = patience
        self.warmup_epochs = warmup_epochs
        self.best_score = -math.inf
        self.best_epoch: int | None = None
        self.best_state: dict[str, torch.Tensor] | None = None

    def update(self, model: torch.nn.Module, score: float, epoch: int) -> bool:
        """Record `epoch`'s score (keeping its weights when it is the best so far); True when training should stop."""
        if score > self.best_score:
            self.best_score, self.best_epoch = score, epoch
            self.best_state = {name: value.detach().clone() for name, value in model.state_dict().items()}
        return epoch - max(self.best_epoch, self.warmup_epochs) >= self.patience

    def restore(self, model: torch.nn.Module) -> None:
        """Load the best epoch's weights into `model` (nothing to do before any update)."""
        if self.best_state is not None:
            model.load_state_dict(self.best_state)


def _epoch_pairs(
    keys: list[str],
    image_paths: Mapping[str, Path],
    texts: Mapping[str, list[str]],
    generator: torch.Generator,
    batch_size: int,
    image_only: Sequence[str] = (),
) -> list[tuple[int, Path, str | None]]:
    """Every image of `keys` once (its index in `keys`, its path), in a random order, each with one of its texts drawn
    at random, in batches of `batch_size` (a last batch of one, which has no negatives, left out). With `image_only`
    (images without texts, indexed after `keys`), each batch is followed by as many of them (text None), drawn in a
    random order, so a loader of twice the batch size sees both halves together."""
    pairs: list[tuple[int, Path, str | None]] = []
    for i in torch.randperm(len(keys), generator=generator).tolist():
        choices = texts[keys[i]]
        pairs.append((i, image_paths[keys[i]], choices[int(torch.randint(len(choices), (1,), generator=generator))]))
    if len(pairs) % batch_size == 1:
        pairs.pop()
    if not image_only:
        return pairs
    order = torch.randperm(len(image_only), generator=generator).tolist()
    extra = [(len(keys) + j, image_paths[image_only[j]], None) for j in order]
    mixed = []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        mixed += chunk + [extra[(start + k) % len(extra)] for k in range(len(chunk))]
    return mixed


def _train_epoch(
    encoder: DualEncoder,
    pairs: list[tuple[int, Path, str | None]],
    pixels: Mapping[Path, torch.Tensor | Image.Image],
    args: DenseTrainingArgs,
    epoch: int,
    batch_size: int,
    optimizer: torch.optim.Optimizer,
    schedule: torch.optim.lr_scheduler.LRScheduler,
    progress: Any,
) -> tuple[float, int]:
    """One pass over `pairs`; returns the mean loss and the number of optimizer steps."""
    loader = DataLoader(
        _PairDataset(pairs, encoder, pixels, args.views, args.seed, epoch, 2 if args.image_loss_weight else 1),
        batch_size=batch_size,
        num_workers=args.num_workers,
    )
    loss_fn = open_clip.ClipLoss()
    encoder.model.train()
    losses = []
    for pixel_values, input_ids, has_text in loader:
        image_features, text_features, logit_scale = encoder.model(pixel_values[0], input_ids)  # (B, D), (B, D), ()
        if has_text.all():
            loss = loss_fn(image_features, text_features, logit_scale)
        else:  # images without text (`every_image`) are in the image-image term only; indexing every batch would
            # change the float rounding of the others
            loss = loss_fn(image_features[has_text], text_features[has_text], logit_scale)
        if len(pixel_values) > 1:  # SLIP's image-image term: two views of an image against the batch's other images
            second = encoder.model.encode_image(pixel_values[1], normalize=True)  # (B, D)
            loss = loss + args.image_loss_weight * loss_fn(image_features, second, IMAGE_LOGIT_SCALE)
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
    return sum(losses) / len(losses), len(losses)


def train_dual_encoder(
    encoder: DualEncoder,
    image_paths: Mapping[str, Path],
    texts: Mapping[str, list[str]],
    args: DenseTrainingArgs,
    validate: Callable[[DualEncoder], float] | None = None,
) -> TrainingResult:
    """Train `encoder` in place with open_clip's `ClipLoss` (symmetric InfoNCE) and AdamW.

    Warmup then cosine decay of the learning rate over `args.epochs`, gradient clipping at 1.0. With `validate`
    (the encoder -> a score, higher is better) and `args.patience` > 0, each epoch ends with a validation; training
    stops after `patience` epochs without a better score and the encoder is left with the best epoch's weights.
    Deterministic for `args.seed` (data order and text choice come from one seeded generator; seed torch before
    building the encoder for a reproducible initialisation).
    """
    keys = sorted(texts)
    if len(keys) < 2:
        raise GraceInputError(f"{len(keys)} training images with texts: the contrastive loss needs at least 2")
    generator = torch.Generator().manual_seed(args.seed)
    image_only = sorted(set(image_paths) - set(texts)) if args.every_image else []
    total_steps = args.epochs * (len(keys) // args.batch_size + (len(keys) % args.batch_size > 1))
    optimizer = torch.optim.AdamW(_param_groups(encoder.model, args.weight_decay), lr=args.lr, betas=(0.9, 0.98))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _warmup_cosine(total_steps, max(1, round(args.warmup_fraction * total_steps)))
    )
    # a collection of a few hundred images scores near chance until the warm-up is over: patience counts after it
    warmup_epochs = math.ceil(args.warmup_fraction * args.epochs)
    stopping = EarlyStopping(args.patience, warmup_epochs) if validate is not None and args.patience > 0 else None
    result = TrainingResult(epoch_losses=[], steps=0, seconds=0.0)
    start = time.perf_counter()
    pixels = preprocessed_images([image_paths[key] for key in keys + image_only], encoder, views=args.views)
    progress = progress_bar(total=total_steps, desc="baseline-clip", unit="step")
    for epoch in range(1, args.epochs + 1):
        pairs = _epoch_pairs(keys, image_paths, texts, generator, args.batch_size, image_only)
        batch_size = args.batch_size * (2 if image_only else 1)
        loss, steps = _train_epoch(encoder, pairs, pixels, args, epoch, batch_size, optimizer, schedule, progress)
        result.epoch_losses.append(loss)
        result.steps += steps
        if stopping is not None:
            result.val_scores.append(validate(encoder))
            if stopping.update(encoder.model, result.val_scores[-1], epoch):
                break
    progress.close()
    if stopping is not None:
        stopping.restore(encoder.model)
        result.best_epoch = stopping.best_epoch
    encoder.model.eval()
    result.seconds = time.perf_counter() - start
    return result


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
    metrics = retrieval_metrics(rankings, gold, len(candidate_keys), time.perf_counter() - start, ks)
    return metrics | {"eval_batch_size": batch_size}


def evaluate_on_split(
    encoder: DualEncoder, corpus: KarpathyCorpus, split: str, batch_size: int = 32
) -> dict[str, Any] | None:
    """`evaluate_dual_encoder` with the human captions of a split's images ranking those images (features encoded
    now); None when the split has no captioned image."""
    pairs = corpus.caption_queries(split)
    if not pairs:
        return None
    images = corpus.split(split)
    features = encoder.encode_images([image.path for image in images])  # (M, D)
    queries, gold = [query for query, _ in pairs], [key for _, key in pairs]
    return evaluate_dual_encoder(
        encoder, queries, gold, [image.key for image in images], features, batch_size=batch_size
    )


def _val_recall_at_1(corpus: KarpathyCorpus, batch_size: int) -> Callable[[DualEncoder], float] | None:
    """The early-stopping score: Recall@1 of the val captions ranking the val images; None without val captions."""
    if not corpus.caption_queries("val"):
        return None
    return lambda encoder: evaluate_on_split(encoder, corpus, "val", batch_size)["recall@1"]


def stopping_rule(args: DenseTrainingArgs, has_val: bool) -> str:
    """How training ends, in words (recorded in the metrics, printed by the command)."""
    if args.patience == 0:
        return f"fixed {args.epochs} epochs (--patience 0)"
    if not has_val:
        return f"fixed {args.epochs} epochs: no val images with captions to stop on"
    return f"early stopping on val R@1, patience {args.patience}, at most {args.epochs} epochs"


def _training_record(result: TrainingResult, texts: Mapping[str, list[str]], args: DenseTrainingArgs) -> dict:
    """The training part of the metrics: time, steps, data, settings, and how it stopped."""
    return {
        "train_seconds": result.seconds,
        "train_steps": result.steps,
        "train_images": len(texts),
        "train_pairs": sum(len(t) for t in texts.values()),
        "epochs": args.epochs,
        "patience": args.patience,
        "epochs_run": result.epochs_run,
        "best_epoch": result.best_epoch,
        "val_recall@1_per_epoch": result.val_scores,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "seed": args.seed,
        "views": asdict(args.views),
        "image_loss_weight": args.image_loss_weight,
        "every_image": args.every_image,
        "epoch_losses": result.epoch_losses,
    }


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
    """Train (to convergence on val, see the module docstring), save and evaluate the dense baseline; returns the
    metrics written to `metrics.json` (test figures at the top level, val figures under "val")."""
    args = args or DenseTrainingArgs()
    inputs = [karpathy_json, image_root, pseudo_queries, model_config if Path(str(model_config)).is_file() else None]
    check_output_dir(output_dir, DENSE_BASELINE, inputs, overwrite)
    model_config = resolve_model_config(model_config)  # a bad --model-config fails before the data is read
    torch.manual_seed(args.seed)

    corpus = load_karpathy(karpathy_json, image_root)
    memorized = corpus.memorized()  # restval images are not memorized, as in the original
    test_images = corpus.split("test")
    if not corpus.caption_queries("test"):
        raise GraceInputError(f"{karpathy_json}: no test images with captions to evaluate on")
    pseudo = load_pseudo_queries(pseudo_queries, corpus) if pseudo_queries else None
    texts = training_texts(corpus, pseudo)
    if len(texts) < 2:
        raise GraceInputError(
            f"{karpathy_json}: {len(texts)} images with texts to learn from (train captions, or pseudo-queries); the "
            "contrastive loss needs at least 2"
        )
    image_paths = {image.key: image.path for image in memorized}

    encoder = DualEncoder.from_config(model_config)
    validate = _val_recall_at_1(corpus, eval_batch_size)
    result = train_dual_encoder(encoder, image_paths, texts, args, validate)

    with output_directory(output_dir, DENSE_BASELINE, inputs, overwrite, "grace-hf baseline-clip") as out:
        encoder.save(out)
        features = encoder.encode_images([image.path for image in memorized])  # (N, D)
        save_image_features(out / FEATURES_FILE, features, [image.key for image in memorized])
        row = {image.key: i for i, image in enumerate(memorized)}
        candidate_keys = [image.key for image in test_images]
        eval_queries = corpus.caption_queries("test")
        metrics = {"method": "dense-clip"}
        metrics |= evaluate_dual_encoder(
            encoder,
            [query for query, _ in eval_queries],
            [key for _, key in eval_queries],
            candidate_keys,
            features[[row[key] for key in candidate_keys]],
            batch_size=eval_batch_size,
        )
        metrics["val"] = evaluate_on_split(encoder, corpus, "val", eval_batch_size)
        metrics["stopping"] = stopping_rule(args, validate is not None)
        metrics |= _training_record(result, texts, args)
        atomic_write_json(out / METRICS_FILE, metrics)
    return metrics
