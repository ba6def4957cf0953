"""`grace-hf evaluate`: Recall@1/5/10 of a GRACE model over every evaluation query of a prepared dataset.

    grace-hf evaluate --model runs/synthetic-structured --data data/prepared/synthetic-structured \\
        --output-dir runs/synthetic-structured-eval
    accelerate launch --multi_gpu --num_processes 2 -m grace_hf evaluate --model ... --data ... --output-dir ...

With `--config_file accelerate_configs/deepspeed_zero3.yaml` the model is sharded across the processes (ZeRO-3).
Writes `metrics.json`, `queries.jsonl` (each query's ranking and the gold rank) and `recall.png` (Recall@K, K = 1..10).
"""

from __future__ import annotations

from pathlib import Path

from accelerate import PartialState

from grace_hf.commands.common import add_num_threads, add_overwrite, command_parser, setup_threads
from grace_hf.distributed import create_accelerator
from grace_hf.outputs import EVALUATION, check_output_dir, output_directory
from grace_hf.retrieval.evaluate import KS, evaluate_model, load_eval_queries, write_evaluation
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
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"], help="model dtype")
    add_num_threads(parser)
    add_overwrite(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_threads(args)
    check_output_dir(args.output_dir, EVALUATION, [args.model, args.data], args.overwrite)
    accelerator = create_accelerator()
    queries, gold, candidates = load_eval_queries(args.data, args.limit)
    retriever = GraceRetriever.from_pretrained(
        args.model,
        accelerator=accelerator,
        dtype=args.dtype,
        num_beams=args.num_beams,
        length_penalty=args.length_penalty,
        batch_size=args.batch_size,
        candidates=candidates,
    )
    metrics, records, curve = evaluate_model(retriever, queries, gold, args.batch_size)
    state = PartialState()
    metrics.update(
        model=str(args.model),
        data=str(args.data),
        num_processes=state.num_processes,
        distributed_type=str(state.distributed_type).split(".")[-1],
    )
    if state.is_main_process:
        inputs = [args.model, args.data]
        with output_directory(args.output_dir, EVALUATION, inputs, args.overwrite, "grace-hf evaluate") as tmp:
            write_evaluation(tmp, metrics, records, curve, Path(args.model).name)
        summary = ", ".join(f"R@{k} {100 * metrics[f'recall@{k}']:.1f}" for k in KS)
        print(
            f"evaluate: {summary} on {metrics['num_queries']} queries, {metrics['num_candidates']} candidates "
            f"({metrics['queries_per_second']:.1f} queries/s); wrote {args.output_dir}"
        )
    state.wait_for_everyone()
    return 0
