"""Seed-aggregated series of finished runs for the report's plots and TensorBoard export: per
(run, variant, hyperparameters) group, the accuracy matrices of its non-diverged members
(``summary.json``) and its evaluation curves (``eval.jsonl``) as aligned arrays."""

from __future__ import annotations

import json
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ocljax.errors import DataError

if TYPE_CHECKING:
    from ocljax.report import Row


@dataclass
class Series:
    """One group's data. ``S`` members that did not diverge, ``E`` evaluations during the
    stream (``task >= 0``; the initial one is left out), ``T`` tasks; NaN where a member has
    no value at a step."""

    row: Row
    name: str  # unique within its benchmark
    label: str  # unique across the report
    acc_matrices: np.ndarray | None  # [S, T, T] R[i, j] from summary.json; None: not there
    steps: np.ndarray  # [E] ascending training steps
    eval_task: np.ndarray  # [E] the task being trained at each evaluation
    anytime: np.ndarray  # [S, E] anytime accuracy
    task_acc: np.ndarray  # [S, E, T] accuracy on each task
    task_ends: dict[int, int]  # task -> step of its task-end evaluation

    @property
    def n_tasks(self) -> int:
        """Tasks in the evaluation rows (0 without them)."""
        return self.task_acc.shape[2]

    def mean_matrix(self) -> np.ndarray | None:
        """The accuracy matrix averaged over the non-diverged members, or None."""
        if self.acc_matrices is None or not len(self.acc_matrices):
            return None
        return nan_mean_std(self.acc_matrices)[0]


def nan_mean_std(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (population) std over axis 0 ignoring NaN; NaN where every entry is NaN."""
    x = np.asarray(x, np.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(x, 0), np.nanstd(x, 0)


def _key(variant, hparams) -> str:
    return json.dumps([variant, hparams], sort_keys=True)


def _read_evals(run_dir: Path) -> list[dict]:
    """Rows of ``eval.jsonl``, or of every ``eval.p{k}.jsonl`` a multi-process run wrote (one
    per process, each with the rows of the members that process owned)."""
    paths = [run_dir / "eval.jsonl"] if (run_dir / "eval.jsonl").is_file() else sorted(
        run_dir.glob("eval.p*.jsonl"))
    rows = []
    for path in paths:
        with path.open() as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise DataError(f"{path}:{lineno}: corrupt JSON ({err})") from None
    return rows


def _read_members(run_dir: Path) -> list[dict]:
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
    except (OSError, json.JSONDecodeError):
        return []
    members = summary.get("members", []) if isinstance(summary, dict) else []
    return [m for m in members if isinstance(m, dict)]


def _float(x) -> float:
    return float(x) if isinstance(x, int | float) and not isinstance(x, bool) else np.nan


def _matrices(members: list[dict]) -> np.ndarray | None:
    mats = [np.array([[_float(v) for v in r] for r in m["acc_matrix"]], np.float64)
            for m in members if isinstance(m.get("acc_matrix"), list) and m["acc_matrix"]]
    if not mats or any(a.ndim != 2 or a.shape != mats[0].shape for a in mats):
        return None
    return np.stack(mats)


def _curves(evals: list[dict]):
    """Aligned ``(steps, eval_task, anytime, task_acc, task_ends)`` of one group's rows."""
    members = sorted({e.get("member", 0) for e in evals}, key=str)
    during = [e for e in evals if isinstance(e.get("task"), int) and e["task"] >= 0
              and isinstance(e.get("step"), int)]
    steps = np.array(sorted({e["step"] for e in during}), np.int64)
    col = {int(s): i for i, s in enumerate(steps)}
    row = {m: i for i, m in enumerate(members)}
    T = max((len(e["acc"]) for e in during if isinstance(e.get("acc"), list)), default=0)
    eval_task = np.full(len(steps), -1, np.int64)
    anytime = np.full((len(members), len(steps)), np.nan)
    task_acc = np.full((len(members), len(steps), T), np.nan)
    task_ends: dict[int, int] = {}
    for e in during:
        i, k = row[e.get("member", 0)], col[e["step"]]
        eval_task[k] = e["task"]
        anytime[i, k] = _float(e.get("anytime_accuracy"))
        acc = e.get("acc")
        if isinstance(acc, list):
            task_acc[i, k, :len(acc)] = [_float(a) for a in acc]
        if e.get("kind") == "task_end":
            task_ends[e["task"]] = max(task_ends.get(e["task"], e["step"]), e["step"])
    return steps, eval_task, anytime, task_acc, task_ends


def load_series(rows: list[Row], names: list[str], labels: list[str]) -> list[Series]:
    """The ``Series`` of each row (same order), named ``names[i]`` / ``labels[i]``, over the
    members of its run and of the runs pooled into it (``report.pool``). Members flagged
    ``diverged`` in ``summary.json`` are left out; a run without ``eval.jsonl`` (or without
    per-member rows in its summary) gives empty curves (or no matrices). ``DataError`` for a
    corrupt ``eval.jsonl`` line."""
    cache: dict[str, tuple[list[dict], dict[str, list[dict]]]] = {}

    def read(run_dir: str):
        if run_dir not in cache:
            members = _read_members(Path(run_dir))
            diverged = {m.get("member") for m in members if m.get("diverged")}
            evals: dict[str, list[dict]] = {}
            for e in _read_evals(Path(run_dir)):
                if e.get("member") is None or e.get("member") not in diverged:
                    evals.setdefault(_key(e.get("variant"), e.get("hparams", {})), []).append(e)
            cache[run_dir] = (members, evals)
        return cache[run_dir]

    out = []
    for r, name, label in zip(rows, names, labels, strict=True):
        mine, evals = [], []
        for i, part in enumerate((r, *r.pooled)):
            members, by_key = read(part.run_dir)
            key = _key(part.variant or part.label, part.hparams)
            mine += [m for m in members if _key(m.get("variant"), m.get("hparams", {})) == key
                     and not m.get("diverged")]
            # member numbers restart in every run: tell pooled runs' members apart
            evals += [{**e, "member": (i, e.get("member", 0))} if r.pooled else e
                      for e in by_key.get(key, [])]
        steps, eval_task, anytime, task_acc, task_ends = _curves(evals)
        out.append(Series(r, name, label, _matrices(mine), steps, eval_task, anytime, task_acc,
                          task_ends))
    return out


def folder_name(label: str) -> str:
    """A file-system-safe folder name for a group label."""
    return re.sub(r"[^A-Za-z0-9._=,@+-]+", "_", label).strip("._") or "group"


def tensorboard_scalars(series: list[Series]) -> dict[str, list[tuple[str, int, float]]]:
    """Per group with evaluation curves, a unique folder name and its ``(tag, step, value)``
    scalars: ``anytime_accuracy/mean`` and ``anytime_accuracy/std`` over seeds and
    ``accuracy_on_task/<j>`` (mean over seeds) at every evaluation step; steps where no
    member has a value are left out."""
    out: dict[str, list[tuple[str, int, float]]] = {}
    for s in series:
        if not len(s.steps):
            continue
        mean, std = nan_mean_std(s.anytime)
        task_mean = nan_mean_std(s.task_acc)[0]  # [E, T]
        scalars = []
        for k, step in enumerate(s.steps.tolist()):
            if np.isfinite(mean[k]):
                scalars += [("anytime_accuracy/mean", step, float(mean[k])),
                            ("anytime_accuracy/std", step, float(std[k]))]
            scalars += [(f"accuracy_on_task/{j}", step, float(task_mean[k, j]))
                        for j in range(s.n_tasks) if np.isfinite(task_mean[k, j])]
        if not scalars:
            continue
        sub, n = folder_name(s.label), 2
        while sub in out:
            sub, n = f"{folder_name(s.label)}_{n}", n + 1
        out[sub] = scalars
    return out
