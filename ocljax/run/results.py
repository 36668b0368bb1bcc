"""Summaries of a sweep and the run directory they are written to (atomically)."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from ocljax import metrics
from ocljax.errors import ConfigError
from ocljax.streams.schedule import EVAL_TASK_END

# ``RunResult.diverged_cause`` codes (``ocljax.run.driver.isolate_divergence``)
DIVERGED_CAUSES = {1: "non-finite loss", 2: "non-finite state"}

METRICS = (
    "final_average_accuracy",
    "average_anytime_accuracy",
    "forgetting",
    "online_accuracy",
    "average_incremental_accuracy",
    "forgetting_first",
    "backward_transfer",
    "backward_transfer_all_pairs",
    "forward_transfer",
    "min_accuracy",
    "worst_case_accuracy",
    "near_future_accuracy",
    "blind_online_accuracy",
    "blind_near_future_accuracy",
    "task_aware_accuracy",
    "cumulative_accuracy",
    "linear_probe_accuracy",
    # compute accounting (identical for the members of one variant; see ``compute_costs``)
    "flops_per_step",
    "flops_per_sample",
    "steps_per_sample",
    "wall_s_per_member",
    "memory_per_member_bytes",
)


def clean(x):
    """JSON-safe: numpy scalars to Python, NaN/inf to None."""
    if isinstance(x, dict):
        return {k: clean(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [clean(v) for v in x]
    if isinstance(x, np.ndarray):
        return clean(x.tolist())
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def optional(values, n: int) -> np.ndarray:
    """``values`` [n] as floats, or NaN (written as null) when the run did not measure it."""
    return np.full(n, np.nan) if values is None else np.asarray(values, np.float64)


def final_mean(per_eval, result) -> np.ndarray:
    """Mean over tasks of a per-task quantity ``[M, E, T]`` at the final evaluation (the last
    task end): e.g. the final average task-aware accuracy. NaN when not measured."""
    if per_eval is None:
        return np.full(result.n_members, np.nan)
    return np.asarray(per_eval, np.float64)[:, -1].mean(-1)


def member_metrics(result) -> list[dict]:
    """Per-member metrics of a ``RunResult`` (see ``METRICS``), plus the accuracy matrix and
    divergence (non-finite training loss) information.

    ``task_aware_accuracy``: final average over tasks of the task-IL accuracy;
    ``cumulative_accuracy``: final mean over k of the accuracy on tasks 0..k with the argmax
    restricted to their classes (``ocljax.run.evaluation``); ``linear_probe_accuracy`` and the
    compute columns come from ``result.extra`` when the run measured them."""
    M = result.n_members
    R = result.accuracy_matrix()
    b = result.initial_accuracy()
    acc, task = result.acc, result.eval_task
    values = {
        "final_average_accuracy": metrics.final_average_accuracy(R),
        "average_anytime_accuracy": metrics.average_anytime_accuracy(acc, task,
                                                                     result.eval_step),
        "forgetting": metrics.forgetting(R, "max"),
        "online_accuracy": result.online_accuracy,
        "average_incremental_accuracy": metrics.average_incremental_accuracy(R),
        "forgetting_first": metrics.forgetting(R, "first"),
        "backward_transfer": metrics.backward_transfer(R, "final_row"),
        "backward_transfer_all_pairs": metrics.backward_transfer(R, "all_pairs"),
        "forward_transfer": metrics.forward_transfer(R, b),
        "min_accuracy": metrics.min_accuracy(acc, task),
        "worst_case_accuracy": metrics.worst_case_accuracy(acc, task),
        "near_future_accuracy": optional(result.near_future_accuracy, M),
        "blind_online_accuracy": optional(result.blind_online_accuracy, M),
        "blind_near_future_accuracy": optional(result.blind_near_future_accuracy, M),
        "task_aware_accuracy": final_mean(result.task_aware, result),
        "cumulative_accuracy": final_mean(result.cumulative, result),
        "linear_probe_accuracy": optional(result.extra.get("linear_probe_accuracy"), M),
    }
    compute = result.extra.get("compute", {})
    for name in METRICS[METRICS.index("flops_per_step"):]:
        value = compute.get(name)
        values[name] = np.full(M, np.nan if value is None else float(value))
    bad = ~np.isfinite(result.block_loss)
    step = result.diverged_step
    if step is None:  # results from before fault isolation: non-finite block losses
        step = np.where(bad.any(1), -2, -1)
    rows = []
    for m in range(result.n_members):
        row = {k: float(v[m]) for k, v in values.items()}
        row["acc_matrix"] = R[m].tolist()
        row["diverged"] = bool(step[m] != -1)
        row["diverged_block"] = int(np.argmax(bad[m])) if bad[m].any() else None
        row["diverged_step"] = int(step[m]) if step[m] >= 0 else None
        row["diverged_cause"] = (DIVERGED_CAUSES.get(int(result.diverged_cause[m]))
                                 if result.diverged_cause is not None and step[m] >= 0
                                 else ("non-finite loss" if step[m] == -2 else None))
        rows.append(row)
    return rows


def group_summary(members: list[dict], metrics: Sequence[str] = METRICS) -> list[dict]:
    """Mean and (population) std of each of ``metrics`` over seeds per (variant, hparams)
    group; diverged members are excluded from the statistics and counted in ``n_diverged``."""
    groups: dict[str, dict] = {}
    for m in members:
        key = json.dumps([m["variant"], m["hparams"]], sort_keys=True)
        groups.setdefault(key, {"variant": m["variant"], "hparams": m["hparams"], "rows": []})
        groups[key]["rows"].append(m)
    out = []
    for g in groups.values():
        ok = [r for r in g["rows"] if not r["diverged"]]
        entry = {"variant": g["variant"], "hparams": g["hparams"], "n": len(ok),
                 "n_diverged": len(g["rows"]) - len(ok)}
        for name in metrics:
            vals = np.array([r[name] for r in ok if r.get(name) is not None], np.float64)
            vals = vals[np.isfinite(vals)]
            entry[name] = {
                "mean": float(vals.mean()) if len(vals) else None,
                "std": float(vals.std()) if len(vals) else None,
            }
        out.append(entry)
    return out


def eval_rows(result, members: list[dict], index: list[int] | None = None):
    """One ``eval.jsonl`` record per (member, evaluation); ``members[i]`` describes member
    ``index[i]`` of ``result`` (default: member i)."""
    kinds = {EVAL_TASK_END: "task_end"}
    anytime = metrics.anytime_accuracy(result.acc, result.eval_task)
    for m, info in zip(index or range(len(members)), members, strict=True):
        for e in range(result.acc.shape[1]):
            yield {
                "member": info["member"], "variant": info["variant"], "seed": info["seed"],
                "hparams": info["hparams"], "step": int(result.eval_step[e]),
                "kind": "initial" if e == 0 else kinds.get(int(result.eval_kind[e]),
                                                            "continual"),
                "task": int(result.eval_task[e]),
                "acc": result.acc[m, e].tolist(),
                "anytime_accuracy": float(anytime[m, e]),
                **({} if result.task_aware is None else
                   {"acc_task_aware": result.task_aware[m, e].tolist(),
                    "cumulative_accuracy": result.cumulative[m, e].tolist()}),
            }


def summary_csv(groups: list[dict]) -> str:
    """One row per group: variant, hparams, counts, then ``<metric>_mean`` / ``_std``."""
    buf = io.StringIO()
    header = ["variant", "hparams", "n", "n_diverged"]
    for name in METRICS:
        header += [f"{name}_mean", f"{name}_std"]
    w = csv.writer(buf)
    w.writerow(header)
    for g in groups:
        row = [g["variant"], json.dumps(g["hparams"], sort_keys=True), g["n"], g["n_diverged"]]
        for name in METRICS:
            row += [g[name]["mean"], g[name]["std"]]
        w.writerow(row)
    return buf.getvalue()


def write_atomic(path: Path, data: str | bytes) -> None:
    """Write ``data`` (text or bytes) to ``path`` via a temporary file and ``os.replace``."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb" if isinstance(data, bytes) else "w") as f:
            f.write(data)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; results are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def jsonl(rows) -> str:
    """``rows`` as JSON lines (JSON-safe via ``clean``)."""
    return "".join(json.dumps(clean(r)) + "\n" for r in rows)


class RunDirectory:
    """A run directory built in a hidden sibling and renamed into place by ``commit``, so a
    failed or interrupted run never leaves a half-written directory behind."""

    def __init__(self, out: str | os.PathLike, overwrite: bool = False):
        self.out = Path(out).resolve()
        if self.out.exists() and not self.out.is_dir():
            raise ConfigError(f"{self.out} exists and is not a directory")
        if self.out.exists() and not overwrite:
            raise ConfigError(f"{self.out} already exists; pass --overwrite to replace it")
        try:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            self.tmp = Path(tempfile.mkdtemp(dir=self.out.parent, prefix=f".{self.out.name}."))
        except OSError as err:
            raise ConfigError(f"cannot write the run directory {self.out}: {err}") from None

    def write_text(self, name: str, text: str) -> None:
        write_atomic(self.tmp / name, text)

    def write_json(self, name: str, obj) -> None:
        self.write_text(name, json.dumps(clean(obj), indent=1, sort_keys=False) + "\n")

    def write_jsonl(self, name: str, rows) -> None:
        self.write_text(name, jsonl(rows))

    def write_with(self, name: str, writer: Callable[[Path], None]) -> None:
        """Let ``writer(path)`` produce a file (e.g. a plot), then move it into place."""
        part = self.tmp / f".{name}.part"
        writer(part)
        os.replace(part, self.tmp / name)

    def commit(self) -> Path:
        """Move the finished directory to its final path (replacing an old one)."""
        old = None
        if self.out.exists():
            old = self.out.with_name(f".{self.out.name}.old-{os.getpid()}")
            os.replace(self.out, old)
        os.chmod(self.tmp, 0o755)
        os.replace(self.tmp, self.out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return self.out

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)
