"""Each beta x tau grid as a PNG heatmap (matplotlib; no timestamps or software
metadata, so identical input gives identical bytes)."""

from __future__ import annotations

from pathlib import Path

from .aggregate import Grid, Group
from .formatting import fmt_value, method_label
from .render import _variant_tag

_LABEL_BOX = {"facecolor": "white", "edgecolor": "none", "alpha": 0.9, "pad": 2.0}


def grid_png(g: Grid, group: Group, metric: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.patches import Rectangle

    kind, pair = g.unit
    nb, nt = len(g.betas), len(g.taus)
    data = np.full((nb, nt), np.nan)
    for i, b in enumerate(g.betas):
        for j, t in enumerate(g.taus):
            s = g.cells.get((b, t))
            if s is not None and s.n:
                data[i, j] = s.mean
    w = min(3.0 + 1.5 * nt, 20.0)
    h = min(2.2 + 0.95 * nb, 16.0)
    with plt.rc_context({"font.size": 10, "svg.hashsalt": "rld", "path.simplify": True}):
        fig, ax = plt.subplots(figsize=(w, h), dpi=100)
        cmap = matplotlib.colormaps["viridis"].with_extremes(bad="#ffffff")
        finite = data[np.isfinite(data)]
        vmin, vmax = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
        if vmax - vmin < 1e-9:
            vmin, vmax = vmin - 0.5, vmax + 0.5
        im = ax.imshow(np.ma.masked_invalid(data), cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto")
        for i, b in enumerate(g.betas):
            for j, t in enumerate(g.taus):
                s = g.cells.get((b, t))
                if s is None:  # never run: grey, hatched
                    ax.add_patch(
                        Rectangle((j - 0.5, i - 0.5), 1, 1, facecolor="#e0e0e0",
                                  edgecolor="#9a9a9a", hatch="//", linewidth=0.5)
                    )  # fmt: skip
                    ax.text(j, i, "missing", ha="center", va="center", fontsize=9,
                            color="#404040", fontstyle="italic", bbox=_LABEL_BOX)  # fmt: skip
                    continue
                if not s.n:  # run, but no finished run: pink, cross-hatched
                    ax.add_patch(
                        Rectangle((j - 0.5, i - 0.5), 1, 1, facecolor="#f4c7c3",
                                  edgecolor="#c0392b", hatch="xx", linewidth=0.5)
                    )  # fmt: skip
                    ax.text(j, i, s.problems().replace(", ", "\n"), ha="center", va="center",
                            fontsize=9, color="#8b0000", fontweight="bold",
                            bbox=_LABEL_BOX)  # fmt: skip
                    continue
                txt = f"{s.mean:.2f}" + (f"\n± {s.std:.2f}" if s.n > 1 else "") + f"\nn={s.n}"
                if s.problems():
                    txt += f"\n+{s.problems()}"
                frac = (s.mean - vmin) / (vmax - vmin)
                ax.text(j, i, txt, ha="center", va="center", fontsize=9,
                        color="black" if frac > 0.6 else "white")  # fmt: skip
        if g.best is not None:
            i, j = g.betas.index(g.best[0]), g.taus.index(g.best[1])
            ax.add_patch(
                Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="#e41a1c", linewidth=3.5)
            )
            ax.text(j + 0.46, i - 0.44, "best", ha="right", va="top", fontsize=8,
                    color="#e41a1c", fontweight="bold")  # fmt: skip
        ax.set_xticks(range(nt), [fmt_value(t) for t in g.taus])
        ax.set_yticks(range(nb), ["" if b is None else fmt_value(b) for b in g.betas])
        ax.set_xlabel("τ (temperature)")
        ax.set_ylabel("β" if any(b is not None for b in g.betas) else "")
        title = f"{g.dataset} · {pair} · {method_label(kind)} · {metric} (epochs={group.epochs})"
        tag = _variant_tag(g, group)
        if tag:
            title += "\n" + tag
        ax.set_title(title, fontsize=10)
        cb = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
        cb.set_label(f"{metric} (%) mean over seeds")
        fig.tight_layout()
        fig.savefig(path, dpi=100, metadata={"Software": None})
        plt.close(fig)
