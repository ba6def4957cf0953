"""`grace-hf baseline-clip`: a dense open_clip dual encoder trained and evaluated on GRACE's data (same pairs, same
queries, same candidates).

    grace-hf baseline-clip --karpathy-json data/synthetic/dataset_synthetic.json --image-root data/synthetic \\
        --pseudo-queries data/synthetic/pseudo_queries.json --output-dir runs/dense-clip --model-config tiny
"""

from __future__ import annotations

from grace_hf.commands.common import add_num_threads, add_overwrite, command_parser, setup_threads
from grace_hf.dense.model import PRESETS
from grace_hf.dense.training import DenseTrainingArgs, run_baseline


def main(argv: list[str] | None = None) -> int:
    defaults = DenseTrainingArgs()
    parser = command_parser("baseline-clip", __doc__.split("\n\n")[0], renamed={"--config": "--model-config"})
    parser.add_argument("--karpathy-json", required=True, help="Karpathy-format split JSON")
    parser.add_argument("--image-root", required=True, help="folder the JSON's image paths are relative to")
    parser.add_argument("--pseudo-queries", default=None, help="pseudo-queries JSON ({file_name: [query, ...]})")
    parser.add_argument("--output-dir", required=True, help="where the model, features and metrics go")
    parser.add_argument("--model-config", default="tiny", help=f"a preset ({', '.join(PRESETS)}) or an open_clip JSON")
    parser.add_argument("--epochs", type=int, default=defaults.epochs, help="passes over the training images")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size, help="images (with one text each)")
    parser.add_argument("--lr", type=float, default=defaults.lr, help="peak AdamW learning rate (warmup + cosine)")
    parser.add_argument("--weight-decay", type=float, default=defaults.weight_decay)
    parser.add_argument("--seed", type=int, default=defaults.seed, help="initialisation, data order, text choice")
    parser.add_argument("--num-workers", type=int, default=defaults.num_workers, help="image loading processes")
    parser.add_argument("--eval-batch-size", type=int, default=32, help="queries encoded per batch at test time")
    add_num_threads(parser)
    add_overwrite(parser)
    args = parser.parse_args(argv)
    setup_threads(args)
    training = DenseTrainingArgs(
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=args.weight_decay,
        seed=args.seed,
        num_workers=args.num_workers,
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
    print(f"wrote {args.output_dir}")
    return 0
