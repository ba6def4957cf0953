"""`grace-hf synthetic --output-dir DIR`: the built-in demo data (shape images and their captions) in the Karpathy
format."""

from __future__ import annotations

from grace_hf.commands.common import add_overwrite, command_parser
from grace_hf.data.synthetic import (
    CAPTION_STYLES,
    IMAGE_FORMATS,
    IMAGE_MODES,
    MAX_IMAGES,
    SYNTHETIC_JSON,
    SyntheticStyle,
    write_synthetic,
)
from grace_hf.io_utils import read_json


def main(argv: list[str] | None = None) -> int:
    parser = command_parser("synthetic", __doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", required=True, help="the directory to write")
    parser.add_argument("--num-images", type=int, default=1000, help=f"number of images, at most {MAX_IMAGES}")
    parser.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives identical files")
    parser.add_argument("--num-workers", type=int, default=None, help="processes drawing images")
    default = SyntheticStyle()
    style = parser.add_argument_group("style (defaults: the demo data; each image draws from the values given)")
    style.add_argument("--image-sizes", type=int, nargs="+", default=list(default.image_sizes), help="side lengths")
    style.add_argument("--formats", nargs="+", default=list(default.formats), help=f"of {', '.join(IMAGE_FORMATS)}")
    style.add_argument("--modes", nargs="+", default=list(default.modes), help=f"of {', '.join(IMAGE_MODES)}")
    style.add_argument("--subfolders", type=int, default=default.subfolders, help="spread images over N folders")
    style.add_argument("--val-fraction", type=float, default=default.val_fraction, help="share of val images")
    style.add_argument("--test-fraction", type=float, default=default.test_fraction, help="share of test images")
    style.add_argument(
        "--caption-style", default=default.caption_style, help=f"caption template mix: {', '.join(CAPTION_STYLES)}"
    )
    parser.add_argument(
        "--oracle-pseudo-queries",
        action="store_true",
        help="also write oracle_pseudo_queries.json: val/test queries from each scene's true attributes, an upper "
        "bound no real collection has (real pseudo-queries: `grace-hf pseudo-queries`)",
    )
    add_overwrite(parser)
    args = parser.parse_args(argv)
    chosen = SyntheticStyle(
        image_sizes=tuple(args.image_sizes),
        formats=tuple(args.formats),
        modes=tuple(args.modes),
        subfolders=args.subfolders,
        val_fraction=args.val_fraction,
        test_fraction=args.test_fraction,
        caption_style=args.caption_style,
    )
    out = write_synthetic(
        args.output_dir,
        args.num_images,
        args.seed,
        args.num_workers,
        args.overwrite,
        chosen,
        args.oracle_pseudo_queries,
    )
    splits = [image["split"] for image in read_json(out / SYNTHETIC_JSON, "Karpathy JSON")["images"]]
    counts = ", ".join(f"{s} {splits.count(s)}" for s in ("train", "val", "test"))
    print(f"wrote {len(splits)} images ({counts}) to {out}")
    return 0
