"""Built-in demo data: shape images drawn with Pillow, in the Karpathy format the real datasets use.

Every image shows one shape (8 kinds) in one of 10 colors, 3 sizes, 3 fill patterns, at one of 9
positions on one of 6 backgrounds: 38,880 distinct contents, so up to that many images are all
different. Each image gets five human-style captions from varied templates (some leave an attribute
out, as people do) that name only what its pixels show: a gray image's captions say how light its shape and
background are, not their colours.

    grace-hf synthetic --output-dir data/synthetic --num-images 1000 --seed 0

writes `data/synthetic/dataset_synthetic.json` (Karpathy format, `filepath` "images") and
`data/synthetic/images/*.png` (64x64 RGB). No text is written for the val and test images beyond their human
captions, which are evaluation queries: their pseudo-queries come from a captioner that looks at the pixels
(`grace-hf pseudo-queries`). `--oracle-pseudo-queries` also writes `oracle_pseudo_queries.json`, five terse queries
per val/test image written from the scene's true attributes: an upper bound that no real collection has, for
labelled upper-bound rows only.

Style options (`SyntheticStyle`) make a collection that looks different from the default one, to check recipes on
data they were not tuned on: images of several sizes, PNG and JPEG files, gray (L) and RGBA images, images spread
over sub-folders, other split fractions and a wider mix of caption templates:

    grace-hf synthetic --output-dir data/check --num-images 2500 --seed 7 --image-sizes 48 64 96 128 \\
        --formats png jpeg --modes RGB RGB RGB L RGBA --subfolders 5 --val-fraction 0.08 --test-fraction 0.1 \\
        --caption-style extended

The default style draws nothing more from the random generator, so its files stay as they were.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import signal
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from PIL import Image, ImageChops, ImageDraw

from grace_hf.data.pseudo_queries import write_pseudo_queries
from grace_hf.errors import GraceInputError
from grace_hf.io_utils import atomic_write_text
from grace_hf.outputs import SYNTHETIC_DATA, check_output_dir, output_directory
from grace_hf.runtime import default_processes, progress_bar

__all__ = [
    "SYNTHETIC_JSON",
    "ORACLE_PSEUDO_QUERIES_JSON",
    "IMAGE_DIR",
    "MAX_IMAGES",
    "CAPTION_STYLES",
    "IMAGE_FORMATS",
    "IMAGE_MODES",
    "SyntheticStyle",
    "check_synthetic_size",
    "write_synthetic",
]

SYNTHETIC_JSON = "dataset_synthetic.json"
ORACLE_PSEUDO_QUERIES_JSON = "oracle_pseudo_queries.json"
IMAGE_DIR = "images"
IMAGE_SIZE = 64

SHAPES = ("circle", "square", "triangle", "star", "diamond", "hexagon", "cross", "heart")
COLORS = {
    "red": (220, 30, 30),
    "orange": (245, 140, 20),
    "yellow": (240, 220, 30),
    "green": (40, 170, 60),
    "blue": (40, 80, 230),
    "purple": (140, 50, 190),
    "pink": (250, 130, 190),
    "brown": (130, 80, 40),
    "cyan": (40, 210, 220),
    "olive": (120, 130, 30),
}
SIZES = {"small": 6, "medium": 9, "large": 12}  # radius in pixels
FILLS = ("solid", "striped", "outlined")
POSITIONS = {  # name -> (row, column) of a 3x3 grid
    "top left": (0, 0),
    "top": (0, 1),
    "top right": (0, 2),
    "left": (1, 0),
    "center": (1, 1),
    "right": (1, 2),
    "bottom left": (2, 0),
    "bottom": (2, 1),
    "bottom right": (2, 2),
}
BACKGROUNDS = {
    "black": (15, 15, 15),
    "gray": (128, 128, 128),
    "white": (245, 245, 245),
    "navy": (20, 30, 90),
    "beige": (225, 210, 170),
    "lavender": (200, 190, 235),
}
MAX_IMAGES = len(SHAPES) * len(COLORS) * len(SIZES) * len(FILLS) * len(POSITIONS) * len(BACKGROUNDS)

# How people say it: each attribute value has its own words, never shared with another value.
SIZE_WORDS = {"small": ("small", "little", "tiny"), "medium": ("medium-sized", "mid-sized"), "large": ("large", "big")}
FILL_WORDS = {"solid": ("solid", "filled-in"), "striped": ("striped", "stripy"), "outlined": ("outlined", "hollow")}
POSITION_WORDS = {
    "top left": ("in the top left corner", "at the upper left"),
    "top": ("at the top", "near the top edge"),
    "top right": ("in the top right corner", "at the upper right"),
    "left": ("on the left side", "at the left"),
    "center": ("in the middle", "in the center"),
    "right": ("on the right side", "at the right"),
    "bottom left": ("in the bottom left corner", "at the lower left"),
    "bottom": ("at the bottom", "near the bottom edge"),
    "bottom right": ("in the bottom right corner", "at the lower right"),
}
# What a gray (L) image shows of a colour: how light it is. Several colours look alike there, and say so.
GRAY_TONES = ((60, "dark"), (120, "dim"), (190, "light"), (256, "pale"))  # (upper luminance bound, word)
GRAY_BACKGROUNDS = ((40, "black"), (100, "dark"), (160, "gray"), (230, "light"), (256, "white"))

# Human-style templates. The first ones name every attribute; the rest leave some out.
FULL_TEMPLATES = (
    "{A_size} {size} {fill} {color} {shape} {position} on a {background}.",
    "There is {a_size} {size} {color} {shape} {position}, {fill}, on a {background}.",
    "{Position}, {a_fill} {fill} {color} {shape}, {size}, against a {background}.",
    "A picture with a {background} and {a_size} {size} {fill} {color} {shape} {position}.",
)
PARTIAL_TEMPLATES = (
    "{A_color} {color} {shape} on a {background}.",
    "Someone drew {a_size} {size} {shape} {position}.",
    "{A_fill} {fill} {shape} in {color} against a {background}.",
    "An image of {a_color} {color} {shape} {position}.",
    "{A_size} {size} {color} {shape} with a {background}.",
    "A {shape} {position}, colored {color}.",
)
# The `extended` caption style adds these to the mix (other words around the same attribute words).
EXTENDED_TEMPLATES = (
    "A photo showing {a_color} {color} {shape}, {size}, {position}.",
    "Look: {a_fill} {fill} {shape} {position} over a {background}.",
    "{A_shape} {shape} in {color}, {fill} and {size}.",
    "This shows a {background} with {a_color} {color} {shape} on it.",
)
CAPTION_STYLES = ("default", "extended")
IMAGE_FORMATS = {"png": ("PNG", ".png"), "jpeg": ("JPEG", ".jpg")}  # name -> (Pillow format, file suffix)
IMAGE_MODES = ("RGB", "L", "RGBA")
JPEG_QUALITY = 85
RGBA_BACKGROUND_ALPHA = 160  # the shape opaque, the background half transparent
# Terse captioner style: every attribute, canonical words, little grammar.
PSEUDO_QUERY_TEMPLATES = (
    "{color} {fill} {shape} {size} {position} on {background}",
    "{size} {color} {shape} {fill} {position} {background} background",
    "{fill} {color} {shape} on {background} at {position} {size}",
    "{color} {shape} {size} {fill} on {background} {position}",
    "{background} background {size} {fill} {color} {shape} {position}",
)


@dataclass(frozen=True)
class SyntheticStyle:
    """How the files and captions of a synthetic collection look; the default is the demo data (64x64 RGB PNG in
    one folder, 10% val, 10% test, the default captions).

    Each image draws its side length, format and mode uniformly from `image_sizes`, `formats` and `modes` (repeat a
    value to draw it more often; RGBA images are always PNG); `subfolders` > 0 spreads the images over
    `images/part_0 .. part_{n-1}` (Karpathy `filepath`); `val_fraction` and `test_fraction` size the splits;
    `caption_style` "extended" adds four more human templates to the mix.
    """

    image_sizes: tuple[int, ...] = (IMAGE_SIZE,)
    formats: tuple[str, ...] = ("png",)
    modes: tuple[str, ...] = ("RGB",)
    subfolders: int = 0
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    caption_style: str = "default"

    def __post_init__(self) -> None:
        if not self.image_sizes or min(self.image_sizes) < 16:
            raise GraceInputError(f"--image-sizes: need sizes of at least 16 pixels, got {list(self.image_sizes)}")
        if not self.formats or not set(self.formats) <= IMAGE_FORMATS.keys():
            raise GraceInputError(f"--formats: expected some of {', '.join(IMAGE_FORMATS)}, got {list(self.formats)}")
        if not self.modes or not set(self.modes) <= set(IMAGE_MODES):
            raise GraceInputError(f"--modes: expected some of {', '.join(IMAGE_MODES)}, got {list(self.modes)}")
        if self.subfolders < 0:
            raise GraceInputError(f"--subfolders must be >= 0, got {self.subfolders}")
        for name, value in (("val", self.val_fraction), ("test", self.test_fraction)):
            if not 0 < value < 0.5:
                raise GraceInputError(f"--{name}-fraction must be between 0 and 0.5 (exclusive), got {value}")
        if self.caption_style not in CAPTION_STYLES:
            raise GraceInputError(
                f"--caption-style: expected one of {', '.join(CAPTION_STYLES)}, got {self.caption_style!r}"
            )


@dataclass(frozen=True)
class _FileStyle:
    """How one image file is written: side length, format name, mode, folder (relative to the output)."""

    size: int = IMAGE_SIZE
    format: str = "png"
    mode: str = "RGB"
    folder: str = IMAGE_DIR


def _file_styles(num_images: int, style: SyntheticStyle, seed: int) -> list[_FileStyle]:
    """One file style per image, drawn from a generator of its own (so the contents and captions of a seed do not
    depend on the style); the default style draws nothing."""
    if style == SyntheticStyle():
        return [_FileStyle() for _ in range(num_images)]
    rng = np.random.default_rng([seed, 1])
    styles = []
    for i in range(num_images):
        mode = _pick(rng, style.modes)
        image_format = "png" if mode == "RGBA" else _pick(rng, style.formats)
        folder = f"{IMAGE_DIR}/part_{i % style.subfolders}" if style.subfolders else IMAGE_DIR
        size = style.image_sizes[int(rng.integers(len(style.image_sizes)))]
        styles.append(_FileStyle(size, image_format, mode, folder))
    return styles


@dataclass(frozen=True)
class _Content:
    """What one synthetic image shows."""

    shape: str
    color: str
    size: str
    fill: str
    position: str
    background: str


def _contents(num_images: int, rng: np.random.Generator) -> list[_Content]:
    """`num_images` distinct contents drawn without replacement from all combinations."""
    combos = list(itertools.product(SHAPES, COLORS, SIZES, FILLS, POSITIONS, BACKGROUNDS))
    return [_Content(*combos[i]) for i in rng.choice(len(combos), size=num_images, replace=False)]


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    """Corner points of a shape of radius `r` around (cx, cy)."""

    def ring(n: int, radii: tuple[float, ...], start: float) -> list[tuple[float, float]]:
        pts = []
        for i in range(n * len(radii)):
            angle = start + 2 * math.pi * i / (n * len(radii))
            rad = radii[i % len(radii)]
            pts.append((cx + rad * math.cos(angle), cy + rad * math.sin(angle)))
        return pts

    if shape == "square":
        return ring(4, (r * 1.2,), math.pi / 4)
    if shape == "triangle":
        return ring(3, (r * 1.1,), -math.pi / 2)
    if shape == "star":
        return ring(5, (r * 1.15, r * 0.45), -math.pi / 2)
    if shape == "diamond":
        return [(cx, cy - r * 1.15), (cx + r * 0.7, cy), (cx, cy + r * 1.15), (cx - r * 0.7, cy)]
    if shape == "hexagon":
        return ring(6, (r,), 0.0)
    if shape == "cross":
        a, b = r * 0.35, r
        corners = (
            (-a, -b),
            (a, -b),
            (a, -a),
            (b, -a),
            (b, a),
            (a, a),
            (a, b),
            (-a, b),
            (-a, a),
            (-b, a),
            (-b, -a),
            (-a, -a),
        )
        return [(cx + x, cy + y) for x, y in corners]
    if shape == "heart":
        ts = np.linspace(0, 2 * math.pi, 40, endpoint=False)
        xs = 16 * np.sin(ts) ** 3
        ys = 13 * np.cos(ts) - 5 * np.cos(2 * ts) - 2 * np.cos(3 * ts) - np.cos(4 * ts)
        return [(cx + r * x / 16, cy - r * y / 16) for x, y in zip(xs, ys)]
    raise ValueError(f"unknown shape {shape!r}")


def _draw(content: _Content, jitter: tuple[int, int]) -> Image.Image:
    """Render one 64x64 RGB image."""
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), BACKGROUNDS[content.background])
    row, col = POSITIONS[content.position]
    cx, cy = 14 + 18 * col + jitter[0], 14 + 18 * row + jitter[1]
    r = SIZES[content.size]
    mask = Image.new("L", image.size, 0)
    draw = ImageDraw.Draw(mask)
    if content.shape == "circle":
        box = (cx - r, cy - r, cx + r, cy + r)
        if content.fill == "outlined":
            draw.ellipse(box, outline=255, width=2)
        else:
            draw.ellipse(box, fill=255)
    else:
        points = _polygon(content.shape, cx, cy, r)
        if content.fill == "outlined":
            draw.polygon(points, outline=255, width=2)
        else:
            draw.polygon(points, fill=255)
    if content.fill == "striped":
        stripes = Image.new("L", image.size, 0)
        stripe_draw = ImageDraw.Draw(stripes)
        for y in range(0, IMAGE_SIZE, 4):
            stripe_draw.rectangle((0, y, IMAGE_SIZE, y + 1), fill=255)
        mask = ImageChops.multiply(mask, stripes)
    image.paste(COLORS[content.color], mask=mask)
    return image


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _render(template: str, words: dict[str, str]) -> str:
    """Fill a template; `{a_x}`/`{A_x}` is the article for the word `{x}`."""
    slots = dict(words)
    for key, word in words.items():
        slots[f"a_{key}"] = _article(word)
        slots[f"A_{key}"] = _article(word).capitalize()
    slots["Position"] = words["position"][0].upper() + words["position"][1:]
    return template.format(**slots)


def _pick(rng: np.random.Generator, options: tuple[str, ...]) -> str:
    return options[int(rng.integers(len(options)))]


def _luminance(rgb: tuple[int, int, int]) -> float:
    """Pillow's RGB -> L weights (ITU-R 601-2)."""
    return 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]


def _tone(rgb: tuple[int, int, int], tones: tuple[tuple[int, str], ...]) -> str:
    return next(word for bound, word in tones if _luminance(rgb) < bound)


def _captions(
    content: _Content, rng: np.random.Generator, caption_style: str = "default", gray: bool = False
) -> list[str]:
    """Five human-style captions: one full template, then four others, all different templates (`extended`: the
    four drawn from a wider mix). `gray`: the image is gray, so colours are named by how light they look."""
    color = _tone(COLORS[content.color], GRAY_TONES) if gray else content.color
    background = _tone(BACKGROUNDS[content.background], GRAY_BACKGROUNDS) if gray else content.background
    full = int(rng.integers(len(FULL_TEMPLATES)))
    others = [t for i, t in enumerate(FULL_TEMPLATES) if i != full] + list(PARTIAL_TEMPLATES)
    if caption_style == "extended":
        others += list(EXTENDED_TEMPLATES)
    templates = [FULL_TEMPLATES[full]] + [others[i] for i in rng.choice(len(others), size=4, replace=False)]
    captions = []
    for template in templates:
        words = {
            "shape": content.shape,
            "color": color,
            "size": _pick(rng, SIZE_WORDS[content.size]),
            "fill": _pick(rng, FILL_WORDS[content.fill]),
            "position": _pick(rng, POSITION_WORDS[content.position]),
            "background": f"{background} {_pick(rng, ('background', 'backdrop'))}",
        }
        captions.append(_render(template, words))
    return captions


def _oracle_pseudo_queries(content: _Content) -> list[str]:
    """Five terse captioner-style queries naming every true attribute (an oracle: no captioner sees this much)."""
    words = {field: getattr(content, field) for field in _Content.__dataclass_fields__}
    return [template.format(**words) for template in PSEUDO_QUERY_TEMPLATES]


def _reset_sigterm() -> None:
    """In a pool worker: SIGTERM ends the process (not the parent command's handler, which raises
    KeyboardInterrupt)."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _save_image(job: tuple[str, _Content, tuple[int, int], _FileStyle]) -> None:
    path, content, jitter, file_style = job
    image = _draw(content, jitter)  # 64x64 RGB
    if file_style.mode == "RGBA":
        background = Image.new("RGB", image.size, BACKGROUNDS[content.background])
        shape = ImageChops.difference(image, background).convert("L")
        image.putalpha(shape.point(lambda v: 255 if v else RGBA_BACKGROUND_ALPHA))
    elif file_style.mode == "L":
        image = image.convert("L")
    if file_style.size != IMAGE_SIZE:
        image = image.resize((file_style.size, file_style.size), Image.Resampling.BICUBIC)
    pil_format = IMAGE_FORMATS[file_style.format][0]
    image.save(path, format=pil_format, **({"quality": JPEG_QUALITY} if pil_format == "JPEG" else {}))


def _splits(
    num_images: int, rng: np.random.Generator, val_fraction: float = 0.1, test_fraction: float = 0.1
) -> list[str]:
    """Train/val/test (by default about 80/10/10), spread over file order; at least one image of each."""
    num_test = max(1, round(test_fraction * num_images))
    num_val = max(1, round(val_fraction * num_images))
    if num_test + num_val >= num_images:
        raise GraceInputError(
            f"--val-fraction {val_fraction} and --test-fraction {test_fraction} leave no train image of {num_images}"
        )
    order = rng.permutation(num_images)
    splits = ["train"] * num_images
    for i in order[:num_test]:
        splits[i] = "test"
    for i in order[num_test : num_test + num_val]:
        splits[i] = "val"
    return splits


def check_synthetic_size(num_images: int) -> None:
    """A collection needs at least one train, val and test image, and distinct contents."""
    if not 3 <= num_images <= MAX_IMAGES:
        raise GraceInputError(f"--num-images must be between 3 and {MAX_IMAGES}, got {num_images}")


def write_synthetic(
    out_dir: str | os.PathLike,
    num_images: int = 1000,
    seed: int = 0,
    num_workers: int | None = None,
    overwrite: bool = False,
    style: SyntheticStyle | None = None,
    oracle_pseudo_queries: bool = False,
) -> Path:
    """Write the synthetic dataset to `out_dir` (built aside, then renamed; see `grace_hf.outputs`) and return it.

    `out_dir/dataset_synthetic.json` is the Karpathy JSON (image root: `out_dir`). With `oracle_pseudo_queries`,
    `out_dir/oracle_pseudo_queries.json` maps the file name of every val/test image to five queries written from its
    true attributes (for upper-bound rows only; see the module docstring).
    `style` (default: `SyntheticStyle()`, the demo data) sets sizes, formats, modes, folders, split fractions and
    captions. The same `num_images`, `seed` and `style` give byte-identical files.
    """
    style = style or SyntheticStyle()
    check_synthetic_size(num_images)
    check_output_dir(out_dir, SYNTHETIC_DATA, overwrite=overwrite)
    rng = np.random.default_rng(seed)
    contents = _contents(num_images, rng)
    splits = _splits(num_images, rng, style.val_fraction, style.test_fraction)
    jitters = [tuple(int(v) for v in rng.integers(-2, 3, size=2)) for _ in range(num_images)]
    file_styles = _file_styles(num_images, style, seed)
    names = [f"synthetic_{i:06d}{IMAGE_FORMATS[fs.format][1]}" for i, fs in enumerate(file_styles)]

    images, pseudo_queries, sentid = [], {}, 0
    for i, (name, content, split, file_style) in enumerate(zip(names, contents, splits, file_styles)):
        sentences = []
        for raw in _captions(content, rng, style.caption_style, gray=file_style.mode == "L"):
            tokens = raw.lower().replace(",", " ").replace(".", " ").split()
            sentences.append({"tokens": tokens, "raw": raw, "imgid": i, "sentid": sentid})
            sentid += 1
        images.append(
            {
                "filepath": file_style.folder,
                "filename": name,
                "imgid": i,
                "split": split,
                "sentids": [s["sentid"] for s in sentences],
                "sentences": sentences,
            }
        )
        if split != "train":
            pseudo_queries[name] = _oracle_pseudo_queries(content)

    out_dir = Path(out_dir)
    with output_directory(out_dir, SYNTHETIC_DATA, overwrite=overwrite, command="grace-hf synthetic") as tmp:
        for folder in sorted({fs.folder for fs in file_styles}):
            (tmp / folder).mkdir(parents=True)
        jobs = [
            (str(tmp / fs.folder / name), c, j, fs) for name, c, j, fs in zip(names, contents, jitters, file_styles)
        ]
        workers = num_workers or default_processes()
        if workers == 1:
            for job in progress_bar(jobs, desc="drawing"):
                _save_image(job)
        else:
            # fork: callers need no __main__ guard. The workers leave by themselves once the jobs are done (close +
            # join): a pool that terminates them signals SIGTERM, which a forked worker inherits the command's
            # handler for, so without `_reset_sigterm` a worker can go on waiting for a task and the parent hangs
            pool = get_context("fork").Pool(workers, initializer=_reset_sigterm)
            try:
                for _ in progress_bar(
                    pool.imap_unordered(_save_image, jobs, chunksize=64), total=len(jobs), desc="drawing"
                ):
                    pass
            except BaseException:
                pool.terminate()
                raise
            else:
                pool.close()
            finally:
                pool.join()
        # compact like the real Karpathy files (and json's indenting encoder is slow and memory-hungry)
        atomic_write_text(tmp / SYNTHETIC_JSON, json.dumps({"dataset": "synthetic", "images": images}))
        if oracle_pseudo_queries:
            write_pseudo_queries(tmp / ORACLE_PSEUDO_QUERIES_JSON, pseudo_queries)
    return out_dir
