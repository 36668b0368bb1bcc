"""The report's four PNG plots, drawn from ``report_data.Series`` (seed-aggregated groups of
one or more runs); a plot whose data the runs lack is skipped with a reason."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ocljax.report_data import Series, nan_mean_std
from ocljax.run import plots

MATRIX_GRID = "accuracy_matrix_grid.png"
ANYTIME = "anytime_accuracy.png"
BARS = "online_near_future_blind.png"
STABILITY = "stability_gap.png"
CAPTIONS = {
    MATRIX_GRID: "Accuracy matrix R[i, j] (accuracy on task j after training through task i), "
                 "mean over non-diverged seeds, per group.",
    ANYTIME: "Anytime accuracy (accuracy on the tasks seen so far) against training step, "
             "mean ± 1 std over seeds; dotted: task ends.",
    BARS: "Online, near-future and input-blind baseline accuracies (mean, std error bars); "
          "hatched: blind baseline (Hammoud et al. 2023).",
    STABILITY: "Accuracy on task j against step, mean ± 1 std over seeds; dashed: end of "
               "task j, dotted: later task boundaries. A drop right after a boundary that "
               "later recovers is the stability gap; legend: min-ACC (De Lange et al. 2023).",
}
# (metric, bar name, colour, hatch): a method's accuracy and its blind baseline share a colour
BAR_METRICS = (
    ("online_accuracy", "online", "C0", None),
    ("near_future_accuracy", "near-future", "C1", None),
    ("blind_online_accuracy", "blind online", "C0", "//"),
    ("blind_near_future_accuracy", "blind near-future", "C1", "//"),
)
MAX_TASK_PANELS = 10


def _stat(s: Series, metric: str, key: str = "mean") -> float:
    st = s.row.stats.get(metric)
    v = st.get(key) if isinstance(st, dict) else None
    return float(v) if isinstance(v, int | float) else np.nan


def _benchmarks(series: list[Series]) -> dict[str, list[Series]]:
    out: dict[str, list[Series]] = {}
    for s in series:
        out.setdefault(s.row.benchmark, []).append(s)
    return out


def matrix_panels(series: list[Series]) -> list[tuple[str, np.ndarray]]:
    """``(label, mean R)`` of each group that has accuracy matrices."""
    return [(s.label, m) for s in series if (m := s.mean_matrix()) is not None]


def anytime_panels(series: list[Series]):
    """Per benchmark: ``(title, curves, task_ends)`` (see ``plots.anytime_panels``)."""
    out = []
    for bench, group in _benchmarks(series).items():
        curves = []
        for s in group:
            mean, std = nan_mean_std(s.anytime)
            ok = np.isfinite(mean) if len(s.steps) else np.zeros(0, bool)
            if ok.any():
                curves.append((s.name, s.steps[ok], mean[ok], std[ok]))
        ends = sorted({e for s in group for e in s.task_ends.values()})
        if curves:
            out.append((bench, curves, np.array(ends)))
    return out


def bar_data(series: list[Series]):
    """``(categories, bars)`` for ``plots.grouped_bars``: the metrics of ``BAR_METRICS`` that
    at least one group has, over the groups that have at least one of them."""
    present = [b for b in BAR_METRICS if any(np.isfinite(_stat(s, b[0])) for s in series)]
    groups = [s for s in series if any(np.isfinite(_stat(s, b[0])) for b in present)]
    bars = [(name, np.array([_stat(s, m) for s in groups]),
             np.array([_stat(s, m, "std") for s in groups]), color, hatch)
            for m, name, color, hatch in present]
    return [s.label for s in groups], bars


def stability_rows(series: list[Series]) -> list[tuple[str, list[plots.TaskPanel]]]:
    """Per benchmark, a ``TaskPanel`` for each of its first ``MAX_TASK_PANELS`` tasks: each
    group's accuracy on task j from the first evaluation while training task j onwards."""
    out = []
    for bench, group in _benchmarks(series).items():
        ends = {}
        for s in group:
            ends.update(s.task_ends)
        T = max(s.n_tasks for s in group)
        panels = []
        for j in range(min(T, MAX_TASK_PANELS)):
            curves = []
            for s in group:
                if j >= s.n_tasks:
                    continue
                sel = s.eval_task >= j
                mean, std = nan_mean_std(s.task_acc[:, sel, j])
                ok = np.isfinite(mean)
                if not ok.any():
                    continue
                min_acc = _stat(s, "min_accuracy")
                label = s.name + (f" (min-ACC {min_acc:.2f})" if np.isfinite(min_acc) else "")
                curves.append((label, s.steps[sel][ok], mean[ok], std[ok]))
            if curves:
                end = ends.get(j)
                later = sorted(e for t, e in ends.items() if t > j)
                panels.append(plots.TaskPanel(j, end, later, curves))
        if panels:
            out.append((bench, panels))
    return out


def _save(path: Path, draw: Callable[[Path], None]) -> None:
    part = path.with_name(f".{path.name}.part")
    try:
        draw(part)
        os.replace(part, path)
    finally:
        part.unlink(missing_ok=True)


def write_plots(series: list[Series], out: Path) -> tuple[list[Path], dict[str, str]]:
    """Draw the four plots of the module docstring of ``ocljax.report`` into ``out``; returns
    the written paths and ``{file name: why it was skipped}``."""
    written, skipped = [], {}

    def save(name: str, ok: bool, why: str, draw: Callable[[Path], None]) -> None:
        if not ok:
            skipped[name] = why
            return
        _save(out / name, draw)
        written.append(out / name)

    panels = matrix_panels(series)
    save(MATRIX_GRID, bool(panels), "no per-member accuracy matrices (summary.json 'members' "
         "missing or every member diverged)",
         lambda p: plots.accuracy_matrix_grid(panels, p))
    anytime = anytime_panels(series)
    save(ANYTIME, bool(anytime), "no anytime accuracy in eval.jsonl (missing or empty)",
         lambda p: plots.anytime_panels(anytime, p))
    categories, bars = bar_data(series)
    save(BARS, bool(bars), "no online, near-future or blind accuracy in summary.json",
         lambda p: plots.grouped_bars(categories, bars, p))
    rows = stability_rows(series)
    save(STABILITY, bool(rows), "no per-task accuracy in eval.jsonl (missing or empty)",
         lambda p: plots.stability_gap(rows, p))
    return written, skipped
