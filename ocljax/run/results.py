"""Summaries of a sweep and the run directory they are written to (atomically)."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ocljax import metrics
from ocljax.errors import ConfigError
from ocljax.streams.schedule import EVAL_TASK_END

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


def member_metrics(result) -> list[dict]:
    """Per-member metrics of a ``RunResult`` (see ``METRICS``), plus the accuracy matrix and
    divergence (non-finite training loss) information."""
    R = result.accuracy_matrix()
    b = result.initial_accuracy()
    acc, task = result.acc, result.eval_task
    values = {
        "final_average_accuracy": metrics.final_average_accuracy(R),
        "average_anytime_accuracy": metrics.average_anytime_accuracy(acc, task),
        "forgetting": metrics.forgetting(R, "max"),
        "online_accuracy": result.online_accuracy,
        "average_incremental_accuracy": metrics.average_incremental_accuracy(R),
        "forgetting_first": metrics.forgetting(R, "first"),
        "backward_transfer": metrics.backward_transfer(R, "final_row"),
        "backward_transfer_all_pairs": metrics.backward_transfer(R, "all_pairs"),
        "forward_transfer": metrics.forward_transfer(R, b),
        "min_accuracy": metrics.min_accuracy(acc, task),
        "worst_case_accuracy": metrics.worst_case_accuracy(acc, task),
    }
    bad = ~np.isfinite(result.block_loss)
    rows = []
    for m in range(result.n_members):
        row = {k: float(v[m]) for k, v in values.items()}
        row["acc_matrix"] = R[m].tolist()
        row["diverged"] = bool(bad[m].any())
        row["diverged_block"] = int(np.argmax(bad[m])) if bad[m].any() else None
        rows.append(row)
    return rows


def group_summary(members: list[dict]) -> list[dict]:
    """Mean and std over seeds per (variant, hparams) group; diverged members are excluded
    from the statistics and counted in ``n_diverged``."""
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
        for name in METRICS:
            vals = np.array([r[name] for r in ok if r[name] is not None], np.float64)
            vals = vals[np.isfinite(vals)]
            entry[name] = {
                "mean": float(vals.mean()) if len(vals) else None,
                "std": float(vals.std()) if len(vals) else None,
            }
        out.append(entry)
    return out


def eval_rows(result, members: list[dict]):
    """One ``eval.jsonl`` record per (member, evaluation)."""
    kinds = {EVAL_TASK_END: "task_end"}
    anytime = metrics.anytime_accuracy(result.acc, result.eval_task)
    for m, info in enumerate(members):
        for e in range(result.acc.shape[1]):
            yield {
                "member": info["member"], "variant": info["variant"], "seed": info["seed"],
                "hparams": info["hparams"], "step": int(result.eval_step[e]),
                "kind": "initial" if e == 0 else kinds.get(int(result.eval_kind[e]),
                                                            "continual"),
                "task": int(result.eval_task[e]),
                "acc": result.acc[m, e].tolist(),
                "anytime_accuracy": float(anytime[m, e]),
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


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary file and ``os.replace``."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; results are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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
        self.write_text(name, "".join(json.dumps(clean(r)) + "\n" for r in rows))

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
