"""`grace-hf synthetic --output-dir DIR`: the built-in demo data (shape images, captions, pseudo-queries) in the
Karpathy format."""

from __future__ import annotations

from grace_hf.commands.common import add_overwrite, command_parser
from grace_hf.data.synthetic import MAX_IMAGES, SYNTHETIC_JSON, write_synthetic
from grace_hf.io_utils import read_json


def main(argv: list[str] | None = None) -> int:
    parser = command_parser("synthetic", __doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", required=True, help="the directory to write")
    parser.add_argument("--num-images", type=int, default=1000, help=f"number of images, at most {MAX_IMAGES}")
    parser.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives identical files")
    parser.add_argument("--num-workers", type=int, default=None, help="processes drawing images")
    add_overwrite(parser)
    args = parser.parse_args(argv)
    out = write_synthetic(args.output_dir, args.num_images, args.seed, args.num_workers, args.overwrite)
    splits = [image["split"] for image in read_json(out / SYNTHETIC_JSON, "Karpathy JSON")["images"]]
    counts = ", ".join(f"{s} {splits.count(s)}" for s in ("train", "val", "test"))
    print(f"wrote {len(splits)} images ({counts}) to {out}")
    return 0
