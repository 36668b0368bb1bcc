"""PNG plots of a sweep or a report: accuracy matrices, anytime-accuracy curves with seed
bands, grouped metric bars and per-task (stability-gap) curves."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np


def pyplot():
    """matplotlib's pyplot on the non-interactive Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def preload() -> threading.Thread:
    """Import pyplot (``pyplot``) on a daemon thread, so that a run that plots at its end finds
    it imported: the import takes about 0.3 s on 2 CPU cores, and during a run's compilation,
    which releases the GIL, the thread has the time for it. Python's import lock makes a
    ``pyplot()`` call before the thread has finished wait for it."""
    thread = threading.Thread(target=pyplot, name="ocljax-pyplot", daemon=True)
    thread.start()
    return thread


def accuracy_matrices(panels: list[tuple[str, np.ndarray]], path: Path) -> None:
    """One heatmap per ``(label, R [T, T])`` (mean over seeds), annotated with the values."""
    plt = pyplot()
    n = len(panels)
    fig, axes = plt.subplots(1, n, figsize=(3.2 * n + 0.6, 3.4), squeeze=False)
    for ax, (label, R) in zip(axes[0], panels, strict=True):
        T = R.shape[0]
        im = ax.imshow(R, vmin=0, vmax=1, cmap="viridis")
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("evaluated on task j")
        ax.set_ylabel("trained through task i")
        ax.set_xticks(range(T))
        ax.set_yticks(range(T))
        if T <= 10:
            for i in range(T):
                for j in range(T):
                    ax.text(j, i, f"{R[i, j]:.2f}", ha="center", va="center", fontsize=7,
                            color="white" if R[i, j] < 0.6 else "black")
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="accuracy")
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)


def anytime_curves(
    curves: list[tuple[str, np.ndarray, np.ndarray, np.ndarray]],
    task_ends: np.ndarray,
    path: Path,
) -> None:
    """Accuracy on the tasks seen so far against training step: ``(label, steps [E], mean [E],
    std [E])`` per group, a +-1 std band over seeds, dotted lines at task boundaries."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, steps, mean, std in curves:
        (line,) = ax.plot(steps, mean, label=label, lw=1.4)
        ax.fill_between(steps, mean - std, mean + std, color=line.get_color(), alpha=0.2, lw=0)
    for s in task_ends[:-1]:
        ax.axvline(s, color="grey", ls=":", lw=0.8)
    ax.set_xlabel("training step")
    ax.set_ylabel("accuracy on seen tasks")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)


def _wrap(text: str, width: int = 38) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(text, width)) or text


def _color_cycle(ax, n: int) -> None:
    """Distinct colours for up to 20 curves (tab10, then tab20)."""
    if n > 10:
        import matplotlib

        ax.set_prop_cycle(color=list(matplotlib.colormaps["tab20"].colors))


def _legend(ax, n: int) -> None:
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5),
              ncol=1 if n <= 14 else 2, frameon=False)


def accuracy_matrix_grid(panels: list[tuple[str, np.ndarray]], path: Path,
                         ncols: int = 4) -> None:
    """A grid of heatmaps, one per ``(title, R [T, T])``, on one shared 0-1 colour scale;
    the values are written in the cells when ``T <= 10`` (NaN cells are blank)."""
    plt = pyplot()
    n = len(panels)
    ncols = max(1, min(ncols, n))
    nrows = -(-n // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.3 * ncols + 1.0, 3.2 * nrows),
                             squeeze=False, layout="constrained")
    for ax in axes.flat[n:]:
        ax.set_axis_off()
    im = None
    for ax, (title, R) in zip(axes.flat, panels, strict=False):
        R = np.asarray(R, np.float64)
        T = R.shape[0]
        im = ax.imshow(R, vmin=0, vmax=1, cmap="viridis")
        ax.set_title(_wrap(title), fontsize=8)
        ax.set_xlabel("evaluated on task j", fontsize=7)
        ax.set_ylabel("trained through task i", fontsize=7)
        ticks = range(T) if T <= 20 else range(0, T, max(1, T // 10))
        ax.set_xticks(list(ticks))
        ax.set_yticks(list(ticks))
        ax.tick_params(labelsize=6)
        if T <= 10:
            size = 7 if T <= 5 else 5.5
            for i in range(T):
                for j in range(T):
                    if np.isfinite(R[i, j]):
                        ax.text(j, i, f"{R[i, j]:.2f}", ha="center", va="center",
                                fontsize=size, color="white" if R[i, j] < 0.6 else "black")
    fig.colorbar(im, ax=axes.ravel().tolist(), shrink=min(0.9, 0.4 + 0.1 * nrows),
                 label="accuracy")
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)


def anytime_panels(
    panels: list[tuple[str, list[tuple[str, np.ndarray, np.ndarray, np.ndarray]], np.ndarray]],
    path: Path,
) -> None:
    """One panel per ``(title, curves, task_ends)``: each curve ``(label, steps [E], mean [E],
    std [E])`` of accuracy on the tasks seen so far with a +-1 std band over seeds, dotted
    lines at the ``task_ends`` steps."""
    plt = pyplot()
    fig, axes = plt.subplots(len(panels), 1, figsize=(9, 3.4 * len(panels)), squeeze=False,
                             layout="constrained")
    for ax, (title, curves, task_ends) in zip(axes[:, 0], panels, strict=True):
        _color_cycle(ax, len(curves))
        for label, steps, mean, std in curves:
            (line,) = ax.plot(steps, mean, label=label, lw=1.3)
            ax.fill_between(steps, mean - std, mean + std, color=line.get_color(), alpha=0.18,
                            lw=0)
        for s in task_ends:
            ax.axvline(s, color="grey", ls=":", lw=0.8)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("training step")
        ax.set_ylabel("anytime accuracy")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        _legend(ax, len(curves))
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)


def grouped_bars(
    categories: list[str],
    bars: list[tuple[str, np.ndarray, np.ndarray, str | None, str | None]],
    path: Path, ylabel: str = "accuracy",
) -> None:
    """Grouped bars: per category (x), one bar per ``(name, means [C], stds [C], colour,
    hatch)`` with a std error bar; non-finite means are not drawn (a missing metric)."""
    plt = pyplot()
    C, B = len(categories), len(bars)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.3 * C * B + 2.5), 4.2), layout="constrained")
    x = np.arange(C)
    width = 0.8 / B
    for b, (name, means, stds, color, hatch) in enumerate(bars):
        means, stds = np.asarray(means, np.float64), np.asarray(stds, np.float64)
        ok = np.isfinite(means)
        err = np.where(np.isfinite(stds), stds, 0.0)[ok]
        ax.bar(x[ok] + (b - (B - 1) / 2) * width, means[ok], width, yerr=err, capsize=2,
               label=name, color=color, hatch=hatch, edgecolor="black" if hatch else None,
               lw=0.3 if hatch else 0, alpha=0.6 if hatch else 1.0)
    ax.set_xticks(x)
    tilt = C > 3
    ax.set_xticklabels(categories, rotation=30 if tilt else 0, ha="right" if tilt else "center",
                       fontsize=7)
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, 1)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)


@dataclass
class TaskPanel:
    """Accuracy on one task: ``curves`` as ``(label, steps, mean, std)``, the step where the
    task ends (``end``, None if unknown) and later task boundaries (``later``)."""

    task: int
    end: float | None
    later: list[float]
    curves: list[tuple[str, np.ndarray, np.ndarray, np.ndarray]]


def stability_gap(rows: list[tuple[str, list[TaskPanel]]], path: Path, ncols: int = 5) -> None:
    """Per ``(title, panels)`` a block of up to ``ncols`` panels a line, one per task j:
    accuracy on task j against step with a +-1 std band, task j's end dashed, later
    boundaries dotted, the block's legend on the right. The drop right after a later boundary
    and the recovery after it is the stability gap (De Lange et al. 2023, Sec. 4)."""
    plt = pyplot()
    lines = [(title, panels[i:i + ncols], i == 0)
             for title, panels in rows for i in range(0, len(panels), ncols)]
    ncols = max(len(p) for _, p, _ in lines)
    fig, axes = plt.subplots(len(lines), ncols + 1, figsize=(2.7 * ncols + 2.8, 2.5 * len(lines)),
                             squeeze=False, layout="constrained",
                             gridspec_kw={"width_ratios": [1] * ncols + [0.9]})
    for r, (title, panels, first) in enumerate(lines):
        for ax in axes[r, len(panels):]:
            ax.set_axis_off()
        for c, p in enumerate(panels):
            ax = axes[r, c]
            _color_cycle(ax, len(p.curves))
            for label, steps, mean, std in p.curves:
                (line,) = ax.plot(steps, mean, label=label, lw=1.1)
                ax.fill_between(steps, mean - std, mean + std, color=line.get_color(),
                                alpha=0.18, lw=0)
            if p.end is not None:
                ax.axvline(p.end, color="black", ls="--", lw=0.9)
            for s in p.later:
                ax.axvline(s, color="grey", ls=":", lw=0.7)
            ax.set_title(f"task {p.task}", fontsize=8)
            ax.set_ylim(0, 1)
            ax.tick_params(labelsize=6)
            ax.grid(alpha=0.3)
            ax.set_xlabel("training step", fontsize=6)
            if c == 0:
                ax.set_ylabel(_wrap(f"{title}: accuracy on task j", 30), fontsize=7)
        if first:
            handles, labels = axes[r, 0].get_legend_handles_labels()
            axes[r, -1].legend(handles, labels, fontsize=7, loc="center left", frameon=False)
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)
