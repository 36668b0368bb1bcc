"""PNG plots of a sweep: accuracy matrices and anytime-accuracy curves with seed bands."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def pyplot():
    """matplotlib's pyplot on the non-interactive Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


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
