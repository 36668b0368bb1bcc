"""Compare finished runs::

    python -m ocljax.report RUN_DIR [RUN_DIR ...] [--out DIR] [--no-plots] [--no-html]
                            [--tensorboard TBDIR] [--columns a,b,...] [--pool]

Reads each run directory's ``config.json`` and ``summary.json`` (written by every experiment)
and prints one Markdown table per benchmark (experiment and dataset): a row per variant and
hyperparameter setting, each metric as mean ± std over the seeds that did not diverge, the best
value of each column in bold (highest accuracy, lowest forgetting; ``@iid`` upper-bound rows are
not ranked, nor are the blind-baseline and compute columns). Where a group has the input-blind
baseline (``blind_online_accuracy`` / ``blind_near_future_accuracy``, Hammoud et al. 2023,
"Rapid Adaptation in Online Continual Learning: Are We Evaluating It Right?"), its mean is shown
beside the online / near-future accuracy, e.g. ``0.972 ± 0.001 (blind 0.90)``. Compute columns
(FLOPs, steps, wall time, memory) are printed human-readably (``1.2 GFLOP``, ``7.9 MiB``).

``--out DIR`` writes there (each file atomically):

- ``report.md`` (the printed tables) and ``report.csv`` (every group, every metric's mean and
  std);
- ``accuracy_matrix_grid.png``: one heatmap per (run, group) of the mean accuracy matrix
  ``R[i, j]`` over non-diverged seeds, one shared colour scale, values annotated up to 10 tasks;
- ``anytime_accuracy.png``: anytime accuracy against step, mean ± 1 std over seeds per group,
  one panel per benchmark, task ends dotted;
- ``online_near_future_blind.png``: bars of online, near-future, blind online and blind
  near-future accuracy per group (mean, std error bars; metrics a run lacks are left out);
- ``stability_gap.png``: accuracy on task j against step (tasks 0-9, one row per benchmark),
  mean ± 1 std per group, task j's end dashed, later boundaries dotted, each group's min-ACC
  (De Lange et al. 2023, "Continual Evaluation for Lifelong Learning: Identifying the Stability
  Gap") in the legend;
- ``report.html``: one self-contained page (the plots embedded as base64 PNG) with the tables,
  the notes, the plots and each run's command.

A plot whose data the runs lack (no ``eval.jsonl``, no per-member accuracy matrices, no
online-accuracy metrics) is skipped with a note on stderr. ``--no-plots`` / ``--no-html`` leave
out the plots / the page. ``--tensorboard TBDIR`` writes the seed-aggregated curves as
TensorBoard event files (no TensorFlow needed), one subfolder per group, tags
``anytime_accuracy/mean``, ``anytime_accuracy/std`` and ``accuracy_on_task/<j>``.

``--pool`` merges the rows of runs that differ only in their seeds (seeds 0-9 run one day,
10-19 the next with ``--seed 10``) into one row each, its statistics and plots over all their
members (``pool``); a seed held by two of the runs is an error.

Rows are labelled with the variant (``er``, ``finetune@iid``, ...), ``*`` when the learner was
given task boundaries (the stream was not task-free), and the swept hyperparameters.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ocljax import report_data, report_html, report_plots
from ocljax.errors import ConfigError, DataError, OCLError
from ocljax.run import results, tensorboard
from ocljax.run.results import METRICS, write_atomic
from ocljax.units import human_bytes, human_flops, human_seconds

# column -> (heading, higher is better)
COLUMNS: dict[str, tuple[str, bool]] = {
    "final_average_accuracy": ("final acc", True),
    "average_anytime_accuracy": ("anytime acc", True),
    "forgetting": ("forgetting", False),
    "online_accuracy": ("online acc", True),
    "near_future_accuracy": ("near-future acc", True),
    "blind_online_accuracy": ("blind online acc", True),
    "blind_near_future_accuracy": ("blind near-future acc", True),
    "average_incremental_accuracy": ("avg incr acc", True),
    "backward_transfer": ("BWT", True),
    "forward_transfer": ("FWT", True),
    "min_accuracy": ("min acc", True),
    "worst_case_accuracy": ("worst-case acc", True),
    "linear_probe_accuracy": ("linear-probe acc", True),
    "task_aware_accuracy": ("task-aware acc", True),
    "cumulative_accuracy": ("cumulative acc", True),
    "flops_per_sample": ("FLOPs/sample", False),
    "flops_per_step": ("FLOPs/step", False),
    "steps_per_sample": ("steps/sample", False),
    "wall_s_per_member": ("wall time/member", False),
    "memory_per_member_bytes": ("memory/member", False),
}
DEFAULT_COLUMNS = ("final_average_accuracy", "average_anytime_accuracy", "forgetting",
                   "online_accuracy")
# metric -> its input-blind baseline, shown beside it
BLIND: dict[str, str] = {"online_accuracy": "blind_online_accuracy",
                         "near_future_accuracy": "blind_near_future_accuracy"}
# every metric a report reads from summary.json groups (the CSV's columns)
ALL_METRICS = tuple(dict.fromkeys([*METRICS, *COLUMNS]))


# compute columns: printed with a unit, never ranked
QUANTITIES: dict[str, Callable[[float], str]] = {
    "flops_per_sample": human_flops,
    "flops_per_step": human_flops,
    "steps_per_sample": lambda v: f"{v:.3g}",
    "wall_s_per_member": human_seconds,
    "memory_per_member_bytes": human_bytes,
}
UNRANKED = frozenset({*QUANTITIES, *BLIND.values()})


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
    stats: dict  # metric -> {"mean", "std"} (None when the run lacks the metric)
    run_dir: str
    command: list = field(default_factory=list)
    variant: str = ""  # the variant's label in the run (``label`` may carry " (incomplete)")
    settings: str = ""  # the variant's configuration without its member count (canonical JSON)
    pooled: tuple = ()  # rows of other runs whose members this row's statistics include

    @property
    def run_dirs(self) -> list[str]:
        """This row's run directory, then those of the rows pooled into it."""
        return [self.run_dir, *(r.run_dir for r in self.pooled)]


def _read_json(path: Path, name: str):
    try:
        return json.loads((path / name).read_text())
    except FileNotFoundError:
        raise DataError(f"{path} is not a finished run directory (missing {path / name})") \
            from None
    except NotADirectoryError:
        raise DataError(f"{path} is not a run directory (not a folder)") from None
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: corrupt JSON in {name} ({err})") from None
    except OSError as err:
        raise DataError(f"{path}: cannot read {name} ({err})") from None


def load_run(path: str | Path) -> list[Row]:
    """The summary rows of one run directory; ``DataError`` when it is missing or unreadable.
    Metrics the run does not have (older runs) are ``None`` in ``Row.stats``."""
    path = Path(path)
    config = _read_json(path, "config.json")
    summary = _read_json(path, "summary.json")
    if not isinstance(config, dict) or not isinstance(summary, dict) \
            or not isinstance(summary.get("groups", []), list):
        raise DataError(f"{path}: config.json / summary.json do not have the run-directory "
                        "layout (JSON objects with a 'groups' list in the summary)")
    variants = {v["label"]: v for v in config.get("variants", [])}
    benchmark = f"{config.get('experiment', '?')} ({config.get('dataset', '?')})"
    rows = []
    for g in summary.get("groups", []):
        if not isinstance(g, dict) or not isinstance(g.get("variant"), str):
            raise DataError(f"{path}: a summary.json group has no 'variant' ({str(g)[:80]})")
        v = variants.get(g["variant"], {})
        stream = v.get("stream", {})
        rows.append(Row(
            benchmark=benchmark, label=g["variant"], learner=v.get("learner", g["variant"]),
            hparams=g.get("hparams", {}), boundaries=not stream.get("task_free", True)
            and not stream.get("iid", False),
            n=g.get("n", 0), n_diverged=g.get("n_diverged", 0),
            stats={k: g.get(k) if isinstance(g.get(k), dict) else None for k in ALL_METRICS},
            run_dir=str(path), command=config.get("command", []), variant=g["variant"],
            settings=json.dumps(_settings(v), sort_keys=True) if v else "",
        ))
    if not summary.get("complete", True):
        for r in rows:
            r.label += " (incomplete)"
    return rows


def _settings(variant: dict) -> dict:
    """A variant's configuration as pooling compares it: everything but the member count, and
    the model and stream settings added since runs existed left out at their defaults, as
    resume does (``experiment.settings_fingerprint``), so a run made before them pools with a
    newer one."""
    from ocljax.run.experiment import LATER_FIELDS, settings_fingerprint

    out = {k: x for k, x in variant.items() if k != "n_members"}
    for section in LATER_FIELDS:
        if isinstance(out.get(section), dict):
            out[section] = settings_fingerprint(section, out[section])
    return out


def pool(rows: list[Row], warn: Callable[[str], None] | None = None) -> list[Row]:
    """Merge the rows of separate runs of one setting into one row each: rows of complete
    runs with the same benchmark, variant, hyperparameters and configuration (everything but
    the member count), e.g. seeds 0-9 run one day and seeds 10-19 the next
    (``--seed 10 --seeds 10``). A merged row's statistics are computed anew over all its
    members (``summary.json``), it keeps the first run's place, and its plots hold every run's
    members. A metric that some of the runs lack is left out of the merged row (a mean over
    part of its members would read as one over all). Rows of one benchmark, variant and
    hyperparameters whose configurations differ stay apart, and ``warn`` gets a line naming
    the settings that differ. ``DataError`` when two of the runs hold the same seed of a
    group (it would count twice) or a run's summary lacks its members."""
    groups: dict[str, list[Row]] = {}
    for r in rows:
        if r.settings and not r.label.endswith(" (incomplete)"):
            key = json.dumps([r.benchmark, r.variant, r.hparams, r.settings], sort_keys=True)
            groups.setdefault(key, []).append(r)
    if warn is not None:
        _warn_unpooled([g[0] for g in groups.values()], warn)
    out, merged = [], {id(g[0]): g for g in groups.values() if len(g) > 1}
    dropped = {id(r) for g in merged.values() for r in g[1:]}
    for r in rows:
        if id(r) in dropped:
            continue
        out.append(_merge(merged[id(r)]) if id(r) in merged else r)
    return out


def _flat(settings: str) -> dict:
    """A variant's configuration as ``{"stream.n_tasks": 17, ...}``."""
    out = {}
    for section, value in json.loads(settings).items():
        if isinstance(value, dict):
            out.update({f"{section}.{k}": v for k, v in value.items()})
        else:
            out[section] = value
    return out


def _warn_unpooled(firsts: list[Row], warn: Callable[[str], None]) -> None:
    """A line per pair of groups that share benchmark, variant and hyperparameters but not
    their configuration, naming the settings that differ."""
    seen: dict[str, Row] = {}
    for r in firsts:
        key = json.dumps([r.benchmark, r.variant, r.hparams], sort_keys=True)
        if key in seen:
            a, b = _flat(seen[key].settings), _flat(r.settings)
            diff = sorted(k for k in a.keys() | b.keys() if a.get(k, "<absent>") != b.get(
                k, "<absent>"))
            warn(f"--pool: {r.variant} in {seen[key].run_dir} and {r.run_dir} not pooled: "
                 f"their settings differ ({', '.join(diff)})")
        else:
            seen[key] = r


def _merge(rows: list[Row]) -> Row:
    members, seeds = [], {}
    for r in rows:
        summary = _read_json(Path(r.run_dir), "summary.json")
        mine = [m for m in summary.get("members", []) if isinstance(m, dict)
                and m.get("variant") == r.variant and m.get("hparams", {}) == r.hparams]
        if len(mine) != r.n + r.n_diverged:
            raise DataError(f"{r.run_dir}: summary.json lists {len(mine)} members of "
                            f"{r.variant}, its group {r.n + r.n_diverged}; cannot pool it")
        for m in mine:
            if m.get("seed") in seeds:
                raise DataError(f"seed {m.get('seed')} of {r.variant} is in both "
                                f"{seeds[m.get('seed')]} and {r.run_dir}: pooling would "
                                "count it twice")
            seeds[m.get("seed")] = r.run_dir
        members += [{**m, "diverged": bool(m.get("diverged"))} for m in mine]
    (g,) = results.group_summary(members, ALL_METRICS)

    def measured(row: Row, k: str) -> bool:
        return bool(row.stats.get(k)) and row.stats[k].get("mean") is not None

    # a metric only some of the runs measured is left out
    stats = {k: g[k] if len({measured(r, k) for r in rows}) == 1 else {"mean": None, "std": None}
             for k in ALL_METRICS}
    return dataclasses.replace(rows[0], n=g["n"], n_diverged=g["n_diverged"], stats=stats,
                               pooled=tuple(rows[1:]))


def row_name(row: Row, show_hparams: bool) -> str:
    """The printed label of a row."""
    name = row.label + ("*" if row.boundaries else "")
    if show_hparams and row.hparams:
        name += " " + ",".join(f"{k}={v:g}" if isinstance(v, int | float) else f"{k}={v}"
                               for k, v in row.hparams.items())
    return name


def by_benchmark(rows: list[Row]) -> dict[str, list[Row]]:
    """Rows grouped by benchmark, in first-seen order."""
    out: dict[str, list[Row]] = {}
    for r in rows:
        out.setdefault(r.benchmark, []).append(r)
    return out


def _uniquify(names: list[str], rows: list[Row]) -> list[str]:
    """Disambiguate equal names by the run folder's name, then by a counter."""
    for extra in (lambda i: f" [{Path(rows[i].run_dir).name}]", lambda i: f" #{i + 1}"):
        counts: dict[str, int] = {}
        for n in names:
            counts[n] = counts.get(n, 0) + 1
        names = [n + extra(i) if counts[n] > 1 else n for i, n in enumerate(names)]
    return names


def display_names(rows: list[Row]) -> tuple[list[str], list[str]]:
    """``(names, labels)`` of ``rows`` for plots: ``names`` are unique within a benchmark
    (hyperparameters shown where a benchmark repeats a variant), ``labels`` across the report
    (prefixed with the benchmark when there are several)."""
    benches = by_benchmark(rows)
    show = {b: len({r.label for r in g}) < len(g) for b, g in benches.items()}
    names = [""] * len(rows)
    for bench in benches:
        idx = [i for i, r in enumerate(rows) if r.benchmark == bench]
        for i, n in zip(idx, _uniquify([row_name(rows[i], show[bench]) for i in idx],
                                       [rows[i] for i in idx]), strict=True):
            names[i] = n
    labels = [f"{r.benchmark}: {n}" if len(benches) > 1 else n for r, n in zip(rows, names,
                                                                                 strict=True)]
    return names, _uniquify(labels, rows)


# --- tables ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Cell:
    """One table cell: ``text``, drawn bold when ``bold``, followed by ``note``."""

    text: str
    bold: bool = False
    note: str = ""


@dataclass
class Table:
    """One benchmark's comparison table."""

    benchmark: str
    head: list[str]
    rows: list[list[Cell]]


def _mean(row: Row, metric: str) -> float | None:
    s = row.stats.get(metric)
    return s.get("mean") if isinstance(s, dict) else None


def _best(rows: list[Row], metric: str) -> float | None:
    if metric in UNRANKED:
        return None
    higher = COLUMNS[metric][1]
    means = [m for r in rows if not r.label.endswith("@iid")
             and (m := _mean(r, metric)) is not None]
    if not means:
        return None
    return max(means) if higher else min(means)


def _cell(row: Row, metric: str, best: float | None) -> Cell:
    mean = _mean(row, metric)
    if mean is None:
        return Cell("n/a")
    std = row.stats[metric].get("std")
    if metric in QUANTITIES:
        fmt = QUANTITIES[metric]
        spread = std is not None and abs(std) > 1e-3 * max(abs(mean), 1e-12)
        return Cell(fmt(mean) + (f" ± {fmt(std)}" if spread else ""))
    text = f"{mean:.3f}" + (f" ± {std:.3f}" if std is not None else "")
    blind = _mean(row, BLIND[metric]) if metric in BLIND else None
    return Cell(text, bold=best is not None and abs(mean - best) < 5e-4,
                note=f"(blind {blind:.2f})" if blind is not None else "")


def tables(rows: list[Row], columns: Sequence[str] = DEFAULT_COLUMNS) -> list[Table]:
    """One ``Table`` per benchmark: a row per group (see the module docstring)."""
    for c in columns:
        if c not in COLUMNS:
            raise ConfigError(f"unknown column {c!r}; choose from {', '.join(COLUMNS)}")
    out = []
    for bench, group in by_benchmark(rows).items():
        show_hp = len({r.label for r in group}) < len(group)
        cols = list(columns)
        measured = any((r.stats.get("near_future_accuracy") or {}).get("mean") is not None
                       for r in group)
        if tuple(columns) == DEFAULT_COLUMNS and measured:  # beside online accuracy
            cols.insert(cols.index("online_accuracy") + 1, "near_future_accuracy")
        best = {c: _best(group, c) for c in cols}
        head = ["method", *(COLUMNS[c][0] + (" ↑" if COLUMNS[c][1] else " ↓") for c in cols),
                "seeds"]
        body = []
        for r in group:
            seeds = f"{r.n}" + (f" ({r.n_diverged} diverged)" if r.n_diverged else "")
            body.append([Cell(row_name(r, show_hp)), *(_cell(r, c, best[c]) for c in cols),
                         Cell(seeds)])
        out.append(Table(bench, head, body))
    return out


def table_note(tabs: list[Table]) -> str:
    """The Markdown note under the tables (empty without tables)."""
    if not tabs:
        return ""
    note = ("Mean ± std over seeds; best per column in bold (`@iid` rows, trained on the "
            "i.i.d. mixture of the stream, are the joint upper bound and are not ranked); `*`: "
            "the learner was given task boundaries (all other rows are task-free).")
    if any(c.note for t in tabs for r in t.rows for c in r):
        note += (" `(blind x)`: the same accuracy of the input-blind baseline, which predicts "
                 "from the recent labels alone (Hammoud et al. 2023).")
    return note


def _md_cell(c: Cell) -> str:
    text = f"**{c.text}**" if c.bold else c.text
    return f"{text} {c.note}" if c.note else text


def markdown(rows: list[Row], columns: Sequence[str] = DEFAULT_COLUMNS) -> str:
    """One Markdown table per benchmark (see the module docstring)."""
    tabs = tables(rows, columns)
    parts = []
    for t in tabs:
        lines = [f"### {t.benchmark}", "", "| " + " | ".join(t.head) + " |",
                 "|" + "---|" * len(t.head)]
        lines += ["| " + " | ".join(_md_cell(c) for c in r) + " |" for r in t.rows]
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + (f"\n\n{table_note(tabs)}" if parts else "")


def to_csv(rows: list[Row]) -> str:
    """Every row and every metric (mean and std) as CSV; metrics a run lacks are empty. The
    last column lists, as a JSON array, the other run directories pooled into a row."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["benchmark", "variant", "learner", "hparams", "boundaries", "n", "n_diverged",
                *(f"{m}_{s}" for m in ALL_METRICS for s in ("mean", "std")), "run_dir",
                "pooled_run_dirs"])
    for r in rows:
        stats = [r.stats[m].get(s) if r.stats.get(m) else None
                 for m in ALL_METRICS for s in ("mean", "std")]
        w.writerow([r.benchmark, r.label, r.learner, json.dumps(r.hparams, sort_keys=True),
                    r.boundaries, r.n, r.n_diverged, *stats, r.run_dir,
                    json.dumps(r.run_dirs[1:])])
    return buf.getvalue()


# --- outputs ---------------------------------------------------------------------------------

def run_commands(rows: list[Row]) -> list[tuple[str, list[str]]]:
    """``(run_dir, command)`` of each run (pooled ones too), in first-seen order."""
    every = [x for r in rows for x in (r, *r.pooled)]
    return list({r.run_dir: (r.run_dir, [str(a) for a in r.command] if isinstance(
        r.command, list) else [str(r.command)]) for r in every}.values())


def write_outputs(
    rows: list[Row], out: Path, columns: Sequence[str] = DEFAULT_COLUMNS, plots: bool = True,
    html: bool = True, warn: Callable[[str], None] | None = None,
) -> list[Path]:
    """Write ``report.md``, ``report.csv`` and (unless switched off) the plots and
    ``report.html`` into ``out``; returns the written paths. ``warn`` receives a line per
    skipped plot."""
    out.mkdir(parents=True, exist_ok=True)
    text = markdown(rows, columns)
    write_atomic(out / "report.md", text + "\n")
    write_atomic(out / "report.csv", to_csv(rows))
    written = [out / "report.md", out / "report.csv"]
    images: list[Path] = []
    if plots:
        names, labels = display_names(rows)
        series = report_data.load_series(rows, names, labels)
        images, skipped = report_plots.write_plots(series, out)
        written += images
        for name, why in skipped.items():
            if warn is not None:
                warn(f"{name} skipped: {why}")
    if html:
        tabs = tables(rows, columns)
        page = report_html.render(tabs, table_note(tabs), run_commands(rows),
                                  [(p, report_plots.CAPTIONS.get(p.name, p.name))
                                   for p in images])
        write_atomic(out / "report.html", page)
        written.append(out / "report.html")
    return written


def write_tensorboard(rows: list[Row], tbdir: Path) -> list[Path]:
    """Seed-aggregated curves of every group as TensorBoard event files under ``tbdir``, one
    subfolder per group (see ``report_data.tensorboard_scalars``); returns the files."""
    names, labels = display_names(rows)
    series = report_data.load_series(rows, names, labels)
    return [tensorboard.write_scalars(tbdir / sub, scalars)
            for sub, scalars in report_data.tensorboard_scalars(series).items()]


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    p = argparse.ArgumentParser(prog="ocljax.report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", metavar="RUN_DIR")
    p.add_argument("--columns", default=",".join(DEFAULT_COLUMNS),
                   help=f"comma-separated metrics (from: {', '.join(COLUMNS)})")
    p.add_argument("--out", metavar="DIR",
                   help="folder to write report.md, report.csv, the plots and report.html into")
    p.add_argument("--plots", action=argparse.BooleanOptionalAction, default=None,
                   help="write the PNG plots into --out (default: yes)")
    p.add_argument("--html", action=argparse.BooleanOptionalAction, default=None,
                   help="write report.html into --out (default: yes)")
    p.add_argument("--tensorboard", metavar="TBDIR",
                   help="write seed-aggregated curves as TensorBoard event files into TBDIR")
    p.add_argument("--pool", action="store_true",
                   help="merge the rows of runs that differ only in their seeds into one row "
                        "each, statistics over all their members")
    args = p.parse_args(argv)

    def warn(msg: str) -> None:
        print(f"ocljax.report: {msg}", file=sys.stderr)

    try:
        if not args.out and (args.plots or args.html):
            raise ConfigError("--plots and --html write into a folder; give --out DIR")
        columns = [c.strip() for c in args.columns.split(",") if c.strip()]
        if args.pool:  # a folder named twice would pool with itself
            args.runs = list({str(Path(d).resolve()): d for d in args.runs}.values())
        rows = [r for d in args.runs for r in load_run(d)]
        if args.pool:
            rows = pool(rows, warn)
        text = markdown(rows, columns)
        if args.out:
            write_outputs(rows, Path(args.out), columns, plots=args.plots is not False,
                          html=args.html is not False, warn=warn)
        if args.tensorboard and not write_tensorboard(rows, Path(args.tensorboard)):
            warn("--tensorboard: no evaluation curves (eval.jsonl) in these runs")
    except OCLError as err:
        print(f"ocljax.report: error: {err}", file=sys.stderr)
        return 2
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
