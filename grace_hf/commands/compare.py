"""`grace-hf compare`: one table of Recall@K, training time and query latency across evaluated runs, and their
recall curves in one picture.

    grace-hf compare runs/structured-eval runs/numeric-eval runs/dense-clip --output-dir runs/comparison
"""

from __future__ import annotations

from grace_hf.commands.common import add_overwrite, command_parser
from grace_hf.evaluation.compare import TABLE_FILE, comparison_rows, comparison_table
from grace_hf.evaluation.plots import RECALL_PLOT_FILE, write_recall_plot
from grace_hf.io_utils import atomic_write_text
from grace_hf.outputs import COMPARISON, check_output_dir, output_directory


def main(argv: list[str] | None = None) -> int:
    parser = command_parser("compare", __doc__.split("\n\n")[0], renamed={"--output": "--output-dir"})
    parser.add_argument("runs", nargs="+", metavar="RUN", help="run directories with a metrics.json (or the file)")
    parser.add_argument("--output-dir", default=None, help=f"also write {TABLE_FILE} and {RECALL_PLOT_FILE} here")
    add_overwrite(parser)
    args = parser.parse_args(argv)
    if args.output_dir:
        check_output_dir(args.output_dir, COMPARISON, args.runs, args.overwrite)
    table = comparison_table(args.runs)
    print(table, end="")
    if args.output_dir:
        curves = {name: metrics.get("recall_curve") for name, metrics in comparison_rows(args.runs)}
        with output_directory(args.output_dir, COMPARISON, args.runs, args.overwrite, "grace-hf compare") as tmp:
            atomic_write_text(tmp / TABLE_FILE, table)
            curves = {name: curve for name, curve in curves.items() if curve}
            if curves:
                write_recall_plot(tmp / RECALL_PLOT_FILE, curves, "Recall@K")
    return 0
