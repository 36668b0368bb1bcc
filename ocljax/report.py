"""Compare finished runs: ``python -m ocljax.report RUN_DIR [RUN_DIR ...]``.

Reads each run directory's ``config.json`` and ``summary.json`` (written by every experiment)
and prints one Markdown table per benchmark (experiment and dataset): a row per variant and
hyperparameter setting, each metric as mean ± std over the seeds that did not diverge, the best
value of each column in bold (highest accuracy, lowest forgetting; ``@iid`` upper-bound rows are
not ranked). ``--out DIR`` also writes
``report.md`` and ``report.csv`` there (atomically).

Rows are labelled with the variant (``er``, ``finetune@iid``, ...), ``*`` when the learner was
given task boundaries (the stream was not task-free), and the swept hyperparameters.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ocljax.errors import ConfigError, DataError, OCLError
from ocljax.run.results import METRICS, write_atomic

# column -> (heading, higher is better)
COLUMNS: dict[str, tuple[str, bool]] = {
    "final_average_accuracy": ("final acc", True),
    "average_anytime_accuracy": ("anytime acc", True),
    "forgetting": ("forgetting", False),
    "online_accuracy": ("online acc", True),
    "average_incremental_accuracy": ("avg incr acc", True),
    "backward_transfer": ("BWT", True),
    "forward_transfer": ("FWT", True),
    "min_accuracy": ("min acc", True),
    "worst_case_accuracy": ("worst-case acc", True),
}
DEFAULT_COLUMNS = ("final_average_accuracy", "average_anytime_accuracy", "forgetting",
                   "online_accuracy")


@dataclass
class Row:
    """One (variant, hyperparameters) group of one run."""

    benchmark: str
    label: str
    learner: str
    hparams: dict
    boundaries: bool
    n: int
    n_diverged: int
    stats: dict  # metric -> {"mean", "std"}
    run_dir: str
    command: list = field(default_factory=list)


def load_run(path: str | Path) -> list[Row]:
    """The summary rows of one run directory; ``DataError`` when it is missing or unreadable."""
    path = Path(path)
    try:
        config = json.loads((path / "config.json").read_text())
        summary = json.loads((path / "summary.json").read_text())
    except FileNotFoundError as err:
        raise DataError(f"{path} is not a finished run directory (missing {err.filename})") \
            from None
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: corrupt JSON ({err})") from None
    variants = {v["label"]: v for v in config.get("variants", [])}
    benchmark = f"{config.get('experiment', '?')} ({config.get('dataset', '?')})"
    rows = []
    for g in summary.get("groups", []):
        v = variants.get(g["variant"], {})
        stream = v.get("stream", {})
        rows.append(Row(
            benchmark=benchmark, label=g["variant"], learner=v.get("learner", g["variant"]),
            hparams=g["hparams"], boundaries=not stream.get("task_free", True)
            and not stream.get("iid", False),
            n=g["n"], n_diverged=g["n_diverged"], stats={k: g.get(k) for k in METRICS},
            run_dir=str(path), command=config.get("command", []),
        ))
    if not summary.get("complete", True):
        for r in rows:
            r.label += " (incomplete)"
    return rows


def row_name(row: Row, show_hparams: bool) -> str:
    """The printed label of a row."""
    name = row.label + ("*" if row.boundaries else "")
    if show_hparams and row.hparams:
        name += " " + ",".join(f"{k}={v:g}" for k, v in row.hparams.items())
    return name


def _best(rows: list[Row], metric: str) -> float | None:
    higher = COLUMNS[metric][1]
    means = [r.stats[metric]["mean"] for r in rows if not r.label.endswith("@iid")
             and r.stats.get(metric) and r.stats[metric]["mean"] is not None]
    if not means:
        return None
    return max(means) if higher else min(means)


def _cell(row: Row, metric: str, best: float | None) -> str:
    s = row.stats.get(metric)
    if not s or s["mean"] is None:
        return "n/a"
    text = f"{s['mean']:.3f} ± {s['std']:.3f}"
    return f"**{text}**" if best is not None and abs(s["mean"] - best) < 5e-4 else text


def by_benchmark(rows: list[Row]) -> dict[str, list[Row]]:
    """Rows grouped by benchmark, in first-seen order."""
    out: dict[str, list[Row]] = {}
    for r in rows:
        out.setdefault(r.benchmark, []).append(r)
    return out


def markdown(rows: list[Row], columns: Sequence[str] = DEFAULT_COLUMNS) -> str:
    """One Markdown table per benchmark (see the module docstring)."""
    for c in columns:
        if c not in COLUMNS:
            raise ConfigError(f"unknown column {c!r}; choose from {', '.join(COLUMNS)}")
    parts = []
    for bench, group in by_benchmark(rows).items():
        show_hp = len({r.label for r in group}) < len(group)
        best = {c: _best(group, c) for c in columns}
        head = ["method", *(COLUMNS[c][0] + (" ↑" if COLUMNS[c][1] else " ↓") for c in columns),
                "seeds"]
        lines = [f"### {bench}", "", "| " + " | ".join(head) + " |",
                 "|" + "---|" * len(head)]
        for r in group:
            seeds = f"{r.n}" + (f" ({r.n_diverged} diverged)" if r.n_diverged else "")
            cells = [row_name(r, show_hp), *(_cell(r, c, best[c]) for c in columns), seeds]
            lines.append("| " + " | ".join(cells) + " |")
        parts.append("\n".join(lines))
    note = ("\n\nMean ± std over seeds; best per column in bold (`@iid` rows, trained on the "
            "i.i.d. mixture of the stream, are the joint upper bound and are not ranked); `*`: "
            "the learner was given task boundaries (all other rows are task-free).")
    return "\n\n".join(parts) + (note if parts else "")


def to_csv(rows: list[Row]) -> str:
    """Every row and every metric (mean and std) as CSV."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["benchmark", "variant", "learner", "hparams", "boundaries", "n", "n_diverged",
                *(f"{m}_{s}" for m in METRICS for s in ("mean", "std")), "run_dir"])
    for r in rows:
        stats = [r.stats.get(m, {}).get(s) if r.stats.get(m) else None
                 for m in METRICS for s in ("mean", "std")]
        w.writerow([r.benchmark, r.label, r.learner, json.dumps(r.hparams, sort_keys=True),
                    r.boundaries, r.n, r.n_diverged, *stats, r.run_dir])
    return buf.getvalue()


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    p = argparse.ArgumentParser(prog="ocljax.report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", metavar="RUN_DIR")
    p.add_argument("--columns", default=",".join(DEFAULT_COLUMNS),
                   help=f"comma-separated metrics (from: {', '.join(COLUMNS)})")
    p.add_argument("--out", help="folder to write report.md and report.csv into")
    args = p.parse_args(argv)
    try:
        rows = [r for d in args.runs for r in load_run(d)]
        text = markdown(rows, [c.strip() for c in args.columns.split(",") if c.strip()])
        if args.out:
            out = Path(args.out)
            out.mkdir(parents=True, exist_ok=True)
            write_atomic(out / "report.md", text + "\n")
            write_atomic(out / "report.csv", to_csv(rows))
    except OCLError as err:
        print(f"ocljax.report: error: {err}", file=sys.stderr)
        return 2
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
