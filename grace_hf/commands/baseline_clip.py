"""`grace-hf baseline-clip`: a dense open_clip dual encoder trained and evaluated on GRACE's data (same pairs, same
queries, same candidates).

    grace-hf baseline-clip --karpathy-json data/synthetic/dataset_synthetic.json --image-root data/synthetic \\
        --pseudo-queries data/synthetic/pseudo_queries.json --output-dir runs/dense-clip --model-config tiny
"""

from __future__ import annotations

from grace_hf.commands.common import add_num_threads, add_overwrite, command_parser, setup_threads
from grace_hf.dense.model import PRESETS
from grace_hf.dense.training import DenseTrainingArgs, run_baseline
from grace_hf.errors import GraceInputError
from grace_hf.training.views import ImageViews


def main(argv: list[str] | None = None) -> int:
    defaults = DenseTrainingArgs()
    parser = command_parser("baseline-clip", __doc__.split("\n\n")[0], renamed={"--config": "--model-config"})
    parser.add_argument("--karpathy-json", required=True, help="Karpathy-format split JSON")
    parser.add_argument("--image-root", required=True, help="folder the JSON's image paths are relative to")
    parser.add_argument("--pseudo-queries", default=None, help="pseudo-queries JSON ({file_name: [query, ...]})")
    parser.add_argument("--output-dir", required=True, help="where the model, features and metrics go")
    parser.add_argument("--model-config", default="tiny", help=f"a preset ({', '.join(PRESETS)}) or an open_clip JSON")
    parser.add_argument("--epochs", type=int, default=defaults.epochs, help="the most passes over the training images")
    parser.add_argument(
        "--patience",
        type=int,
        default=defaults.patience,
        help="stop after this many epochs without a better val R@1 (val captions ranking the val images) and keep "
        "the best epoch; 0: always run --epochs",
    )
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size, help="images (with one text each)")
    parser.add_argument("--lr", type=float, default=defaults.lr, help="peak AdamW learning rate (warmup + cosine)")
    parser.add_argument("--weight-decay", type=float, default=defaults.weight_decay)
    parser.add_argument("--seed", type=int, default=defaults.seed, help="initialisation, data order, text choice")
    parser.add_argument("--num-workers", type=int, default=defaults.num_workers, help="image loading processes")
    parser.add_argument(
        "--crop-scale",
        type=float,
        default=defaults.views.crop_scale,
        help="training views: a random crop keeping between this fraction and all of each side, resized back "
        "(1: none)",
    )
    parser.add_argument(
        "--jpeg-quality",
        type=int,
        default=defaults.views.jpeg_quality,
        help="training views: re-encode as JPEG of a random quality between this and 95 (0: none)",
    )
    parser.add_argument(
        "--original-share",
        type=float,
        default=defaults.views.original_share,
        help="training views: the share of images shown without crop or JPEG in an epoch",
    )
    parser.add_argument(
        "--image-loss-weight",
        type=float,
        default=defaults.image_loss_weight,
        help="weight of SLIP's image-image term (two views of each image against the batch's other images), which "
        "teaches the image tower to find an image from an altered copy; needs views (0: off)",
    )
    parser.add_argument(
        "--every-image",
        action="store_true",
        help="the image-image term also over the memorized images without texts (val/test images, by their pixels)",
    )
    parser.add_argument("--eval-batch-size", type=int, default=32, help="queries encoded per batch at test time")
    add_num_threads(parser)
    add_overwrite(parser)
    args = parser.parse_args(argv)
    setup_threads(args)
    try:
        views = ImageViews(
            crop_scale=args.crop_scale, jpeg_quality=args.jpeg_quality, original_share=args.original_share
        )
    except ValueError as error:
        raise GraceInputError(f"training views: {error}") from None
    training = DenseTrainingArgs(
        epochs=args.epochs,
        patience=args.patience,
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=args.weight_decay,
        seed=args.seed,
        num_workers=args.num_workers,
        views=views,
        image_loss_weight=args.image_loss_weight,
        every_image=args.every_image,
    )
    metrics = run_baseline(
        args.karpathy_json,
        args.image_root,
        args.output_dir,
        args.pseudo_queries,
        args.model_config,
        training,
        args.eval_batch_size,
        args.overwrite,
    )
    recalls = ", ".join(f"R@{k} {100 * metrics[f'recall@{k}']:.1f}" for k in (1, 5, 10))
    print(f"dense-clip: {recalls} on {metrics['num_queries']} queries; trained in {metrics['train_seconds']:.0f} s")
    print(f"training: {metrics['stopping']}; {metrics['epochs_run']} epochs run, best epoch {metrics['best_epoch']}")
    print(f"wrote {args.output_dir}")
    return 0
