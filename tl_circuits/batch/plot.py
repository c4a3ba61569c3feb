"""The recurrence plot: the top features and heads by the graphs they appear in."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from tl_circuits.storage import write_atomically

if TYPE_CHECKING:
    from tl_circuits.batch.recurrence import Recurrence


def plot_recurrence(rec: Recurrence, path: Path, top: int) -> Path:
    """Two horizontal bar charts side by side (features left, heads right): the ``top``
    most recurring of each, bar length the number of graphs, the mean influence (features)
    or mean share of the edge carried (heads) written at each bar's end. Written
    atomically (PNG, or any format matplotlib infers from the suffix)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    features, heads = rec.features.head(top), rec.heads.head(top)
    rows = max(len(features), len(heads), 1)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 1.2 + 0.3 * rows))
    _bars(
        left,
        [f"L{r.layer} F{r.feature}" for r in features.itertuples()],
        list(features["n_graphs"]),
        [f"infl {v:.3f}" for v in features["mean_influence"]],
        "features",
        rec.n_graphs,
    )
    _bars(
        right,
        [f"L{r.layer}H{r.head}" for r in heads.itertuples()],
        list(heads["n_graphs"]),
        [f"share {v:+.2f}" for v in heads["mean_share"]],
        "heads (cross-position edges)",
        rec.n_graphs,
    )
    fig.tight_layout()
    suffix = path.suffix.lstrip(".") or "png"
    write_atomically(path, lambda tmp: fig.savefig(tmp, format=suffix, dpi=120))
    plt.close(fig)
    return path


def _bars(ax, labels: list[str], counts: list[int], notes: list[str], title: str, n: int) -> None:
    y = list(range(len(labels)))[::-1]
    ax.barh(y, counts, color="#4878a8")
    ax.set_yticks(y, labels, fontsize=8)
    ax.set_xlim(0, max(n, 1) * 1.35)
    ax.set_xlabel(f"graphs it appears in (of {n})")
    ax.set_title(title, fontsize=10)
    for yi, count, note in zip(y, counts, notes):
        ax.text(count, yi, f" {note}", va="center", fontsize=7)
