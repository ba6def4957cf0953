"""`grace-hf baseline-bm25`: the text-only baseline, BM25 between each test caption and the texts that teach each test
image (their pseudo-queries), ranking the same candidates with the same queries as the model.

    grace-hf baseline-bm25 --karpathy-json data/synthetic/dataset_synthetic.json --image-root data/synthetic \\
        --pseudo-queries data/synthetic/pseudo_queries.json --output-dir runs/bm25
"""

from __future__ import annotations

from grace_hf.commands.common import add_overwrite, command_parser
from grace_hf.evaluation.text_baseline import METHOD, run_text_baseline


def main(argv: list[str] | None = None) -> int:
    parser = command_parser("baseline-bm25", __doc__.split("\n\n")[0])
    parser.add_argument("--karpathy-json", required=True, help="Karpathy-format split JSON")
    parser.add_argument("--image-root", required=True, help="folder the JSON's image paths are relative to")
    parser.add_argument(
        "--pseudo-queries", default=None, help="pseudo-queries JSON ({file_name: [query, ...]}): the val/test texts"
    )
    parser.add_argument("--output-dir", required=True, help="where metrics.json goes")
    add_overwrite(parser)
    args = parser.parse_args(argv)
    metrics = run_text_baseline(
        args.karpathy_json, args.image_root, args.output_dir, args.pseudo_queries, args.overwrite
    )
    recalls = ", ".join(f"R@{k} {100 * metrics[f'recall@{k}']:.1f}" for k in (1, 5, 10))
    print(f"{METHOD}: {recalls} on {metrics['num_queries']} queries; indexed in {metrics['train_seconds']:.2f} s")
    print(f"wrote {args.output_dir}")
    return 0
