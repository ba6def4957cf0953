"""Recall curves as a picture."""

from __future__ import annotations

import io
import os
from collections.abc import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")  # files only: no display is needed or assumed
import matplotlib.pyplot as plt  # noqa: E402 (after choosing the backend)

from grace_hf.io_utils import atomic_write_bytes  # noqa: E402

__all__ = ["RECALL_PLOT_FILE", "RERANKED_SUFFIX", "write_recall_plot"]


RECALL_PLOT_FILE = "recall.png"
RERANKED_SUFFIX = " + rerank"


def write_recall_plot(path: str | os.PathLike, curves: Mapping[str, Sequence[float]], title: str) -> None:
    """Recall@K against K, one line per named curve, as a PNG written atomically; a curve named `NAME + rerank` is
    drawn dashed in the colour of `NAME`, and a long legend goes beside the axes."""
    fig, ax = plt.subplots(figsize=(5 if len(curves) <= 4 else 7, 3.5))
    colours: dict[str, str] = {}
    for name, curve in curves.items():
        base = name.removesuffix(RERANKED_SUFFIX)
        line = "--" if name != base else "-"
        (drawn,) = ax.plot(
            range(1, len(curve) + 1), [100 * r for r in curve], line, marker="o", label=name, color=colours.get(base)
        )
        colours.setdefault(base, drawn.get_color())
    max_k = max(len(curve) for curve in curves.values())
    ax.set(xlabel="K", ylabel="Recall@K (%)", title=title, ylim=(0, 100), xticks=list(range(1, max_k + 1)))
    ax.grid(alpha=0.3)
    if len(curves) <= 4:
        ax.legend(loc="lower right")
    else:
        ax.legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize="small")
    fig.tight_layout()
    buffer = io.BytesIO()
    try:
        fig.savefig(buffer, format="png", dpi=100)
    finally:
        plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())
