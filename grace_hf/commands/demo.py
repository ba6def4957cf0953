"""`grace-hf demo` (`make demo`): GRACE end to end on the built-in synthetic data, no GPU and no downloads.

grace-hf demo --output-dir demo_output                          # the best kind, ~5 min on 2 cores
grace-hf demo --output-dir demo_output --identifier-kind all    # every identifier kind beside the dense baseline
"""

from __future__ import annotations

from grace_hf.commands.common import add_num_threads, add_overwrite, command_parser, setup_threads
from grace_hf.demo import DEFAULT_KIND, run_demo
from grace_hf.identifiers import IDENTIFIER_KINDS, get_identifier_kind


def main(argv: list[str] | None = None) -> int:
    parser = command_parser("demo", __doc__.split("\n\n")[0], renamed={"--kinds": "--identifier-kind"})
    parser.add_argument("--output-dir", default="demo_output", help="where everything is written")
    parser.add_argument(
        "--identifier-kind",
        nargs="+",
        default=[DEFAULT_KIND],
        help=f"identifier kinds to train, or 'all' ({', '.join(IDENTIFIER_KINDS)}); the first fills the gallery",
    )
    parser.add_argument("--num-images", type=int, default=500, help="synthetic images (10%% test)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-steps", type=int, default=None, help="override the recipes' training steps")
    add_num_threads(parser)
    add_overwrite(parser)
    args = parser.parse_args(argv)
    setup_threads(args)
    kinds = args.identifier_kind
    if kinds == ["all"]:  # the best kind first: it fills the gallery
        kinds = [DEFAULT_KIND, *(kind for kind in IDENTIFIER_KINDS if kind != DEFAULT_KIND)]
    for kind in kinds:
        get_identifier_kind(kind)
    run_demo(args.output_dir, kinds, args.num_images, args.seed, args.max_steps, args.overwrite)
    return 0
