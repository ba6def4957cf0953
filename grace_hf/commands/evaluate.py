"""`grace-hf evaluate`: Recall@1/5/10 of a GRACE model over every evaluation query of a prepared dataset.

    grace-hf evaluate --model runs/synthetic-structured --data data/prepared/synthetic-structured \\
        --output-dir runs/synthetic-structured-eval
    accelerate launch --multi_gpu --num_processes 2 -m grace_hf evaluate --model ... --data ... --output-dir ...

With `--config_file accelerate_configs/deepspeed_zero3.yaml` the model is sharded across the processes (ZeRO-3).
Writes `metrics.json`, `queries.jsonl` (each query's ranking and the gold rank) and `recall.png` (Recall@K, K = 1..10).
The prepared dataset must name the images it ranks as the model does (its identifiers.json; the model may know more
images, e.g. after add-images): one of another collection or identifier kind is refused before the model is loaded.

`--split val` ranks the val images for the val captions (for choosing settings). `--rerank DENSE_DIR` also re-ranks
the images of the beams with a `grace-hf baseline-clip` model: the fusion weight comes from the model's `rerank.json`,
or, when it has none (or with `--refit-rerank`), is fitted on the data's val captions (never the test ones) and saved
there; metrics.json then holds the plain and the re-ranked figures.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from accelerate import PartialState

from grace_hf.commands.common import (
    add_num_threads,
    add_overwrite,
    add_rerank,
    check_rerank_args,
    command_parser,
    setup_threads,
)
from grace_hf.data.prepared import EVAL_SPLITS
from grace_hf.distributed import create_accelerator
from grace_hf.errors import GraceInputError
from grace_hf.evaluation.model_recall import KS, evaluate_model, write_evaluation
from grace_hf.evaluation.queries import load_eval_queries
from grace_hf.model_dir import RERANK_FILE, check_prepared_identifiers, resolve_model_dir
from grace_hf.outputs import EVALUATION, check_output_dir, output_directory
from grace_hf.retrieval.rerank import DenseScorer, Reranker, fit_or_load
from grace_hf.retrieval.retriever import GraceRetriever


def build_parser():
    parser = command_parser(
        "evaluate", __doc__.split("\n\n")[0], renamed={"--output": "--output-dir (a directory: metrics.json, ...)"}
    )
    parser.add_argument("--model", required=True, help="trained model directory or Hub id")
    parser.add_argument("--data", required=True, help="prepared dataset directory (`grace-hf prepare`) or Hub id")
    parser.add_argument("--output-dir", required=True, help="where metrics.json, queries.jsonl, recall.png go")
    parser.add_argument("--num-beams", type=int, default=10, help="beams = ranked identifiers per query")
    parser.add_argument(
        "--length-penalty",
        type=float,
        default=0.0,
        help="beam score = log-prob / length**penalty; 0 ranks by probability (default), the paper used -2.0",
    )
    parser.add_argument("--batch-size", type=int, default=16, help="queries per generate call, per process")
    parser.add_argument("--limit", type=int, default=None, help="evaluate only the first N queries")
    parser.add_argument(
        "--split",
        default="test",
        choices=list(EVAL_SPLITS),
        help="test: the test captions rank the collection (default); val: the val captions rank the val images",
    )
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"], help="model dtype")
    rerank = add_rerank(parser)
    rerank.add_argument(
        "--refit-rerank", action="store_true", help="fit the weight on the val captions again and save it"
    )
    add_num_threads(parser)
    add_overwrite(parser)
    return parser


def _reranker(args: argparse.Namespace, retriever: GraceRetriever, state: PartialState) -> Reranker:
    """The reranker of `--rerank`: with the weight given, or in the model's rerank.json, or fitted on the val
    captions of `--data` and written into the model directory."""
    scorer = DenseScorer.from_directory(args.rerank)
    scorer.check_covers(retriever.candidates, f"{args.data}'s {args.split} split")
    reranker, config = fit_or_load(
        args.model,
        scorer,
        retriever,
        args.data,
        args.rerank_weight,
        args.rerank_beams,
        refit=args.refit_rerank,
        batch_size=args.batch_size,
        write=state.is_main_process,
    )
    if config is not None and state.is_main_process:
        best = next(row for row in config.val_grid if row["weight"] == config.weight)
        print(
            f"evaluate: fitted the re-ranking weight {config.weight:.2f} on {config.fitted_on} "
            f"(val R@1 {100 * best['recall@1']:.1f}); wrote {resolve_model_dir(args.model) / RERANK_FILE} "
            "(a temporary file renamed into place)"
        )
    return reranker


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_threads(args)
    check_rerank_args(args)
    if args.rerank_weight is not None and args.refit_rerank:
        raise GraceInputError("--rerank-weight and --refit-rerank: give a weight or fit one, not both")
    inputs = [args.model, args.data, args.rerank]
    check_output_dir(args.output_dir, EVALUATION, inputs, args.overwrite)
    accelerator = create_accelerator()
    queries, gold, candidates = load_eval_queries(args.data, args.limit, args.split)
    # the same file names in another collection, or other identifiers, would be scored silently: refused here
    check_prepared_identifiers(args.model, args.data, candidates, f"images the {args.split} split ranks")
    retriever = GraceRetriever.from_pretrained(
        args.model,
        accelerator=accelerator,
        dtype=args.dtype,
        num_beams=args.num_beams,
        length_penalty=args.length_penalty,
        batch_size=args.batch_size,
        candidates=candidates,
    )
    state = PartialState()
    if args.rerank is not None:
        retriever = retriever.for_candidates(candidates, _reranker(args, retriever, state))
    metrics, records, curve = evaluate_model(retriever, queries, gold, args.batch_size)
    metrics.update(
        model=str(args.model),
        data=str(args.data),
        split=args.split,
        num_processes=state.num_processes,
        distributed_type=str(state.distributed_type).split(".")[-1],
    )
    if state.is_main_process:
        with output_directory(args.output_dir, EVALUATION, inputs, args.overwrite, "grace-hf evaluate") as tmp:
            write_evaluation(tmp, metrics, records, curve, Path(args.model).name)
        summary = ", ".join(f"R@{k} {100 * metrics[f'recall@{k}']:.1f}" for k in KS)
        if "rerank" in metrics:
            reranked = ", ".join(f"R@{k} {100 * metrics['rerank'][f'recall@{k}']:.1f}" for k in KS)
            summary += f"; re-ranked: {reranked}"
        print(
            f"evaluate: {summary} on {metrics['num_queries']} queries, {metrics['num_candidates']} candidates "
            f"({metrics['queries_per_second']:.1f} queries/s); wrote {args.output_dir}"
        )
    state.wait_for_everyone()
    return 0
