"""An experiment: one dataset, one or more variants (learner x stream), each a compiled sweep
over its members, written to one run directory."""

from __future__ import annotations

import dataclasses
import json
import platform
import sys
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import jax
import numpy as np

from ocljax import data, learners, metrics, models, precision, streams
from ocljax.errors import ConfigError
from ocljax.run import driver, plots, results
from ocljax.run.progress import Progress
from ocljax.streams.schedule import EVAL_TASK_END
from ocljax.sweep import Member, devices_for


@dataclass(frozen=True)
class ModelConfig:
    """Static model settings: ``name`` in ``ocljax.models.MODELS``, ``width`` and ``depth``
    (``None``: the model's own default; see ``ocljax.models.make_model``), and the matmul
    ``precision`` (``ocljax.precision.PRECISIONS``)."""

    name: str = "mlp"
    width: int | None = None
    depth: int | None = None
    precision: str = "float32"

    def __post_init__(self):
        precision.check(self.precision)
        for key in ("width", "depth"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ConfigError(f"{key} must be >= 1, got {value}")


@dataclass
class Variant:
    """One compiled sweep: a learner on a stream with a static config and its members."""

    label: str
    learner: str
    stream: streams.StreamConfig
    learner_config: object
    model: ModelConfig
    members: list[Member] = field(default_factory=list)


@dataclass
class VariantResult:
    variant: Variant
    result: driver.RunResult
    rows: list[dict]


def versions() -> dict[str, str]:
    """Versions of Python, the platform and the packages a result depends on."""
    out = {"python": sys.version.split()[0], "platform": platform.platform()}
    for pkg in ("ocljax", "jax", "jaxlib", "flax", "optax", "chex", "numpy"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


@dataclass
class Prepared:
    """A variant with its stream, learner and per-member hyperparameters built (and checked)."""

    variant: Variant
    stream: streams.Stream
    learner: object
    hparams: list


def prepare_variant(variant: Variant, ds: data.Dataset) -> Prepared:
    """Build the stream, model and learner of ``variant``; raises ``ConfigError`` for bad
    settings before anything is compiled."""
    stream = streams.build(variant.stream, ds, [m.seed for m in variant.members])
    model = models.make_model(variant.model.name, ds.num_classes, variant.model.width,
                              variant.model.depth)
    model = precision.cast_model(model, variant.model.precision)
    module = learners.get(variant.learner)
    learners.check_stream(variant.learner, variant.stream.task_free, variant.learner_config)
    learner = module.make(model, variant.learner_config)
    hps = [module.HParams(**m.hparams) for m in variant.members]
    return Prepared(variant, stream, learner, hps)


def run_variant(
    prep: Prepared, ds: data.Dataset, n_devices: int | None, quiet: bool,
    blocks_per_chunk: int | None = None,
) -> VariantResult:
    """Run a prepared variant's members as one compiled sweep and compute their metrics."""
    variant = prep.variant
    seeds = [m.seed for m in variant.members]
    n = n_devices or devices_for(len(seeds), len(jax.local_devices()))
    progress = None if quiet else Progress(variant.label, variant.stream.batch_size * len(seeds))
    result = driver.run(
        prep.learner, prep.stream, ds, prep.hparams, seeds, n_devices=n,
        blocks_per_chunk=blocks_per_chunk, progress=progress, precision=variant.model.precision,
        cost=True,
        log=None if quiet else (lambda msg: print(f"[{variant.label}] {msg}", flush=True)),
    )
    result.extra["devices"] = n
    result.extra["task_classes"] = prep.stream.task_classes
    return VariantResult(variant, result, results.member_metrics(result))


def format_table(groups: list[dict]) -> str:
    """The printed summary: one line per group, mean +- std over seeds. The input-blind
    baseline's online accuracy is printed beside the learner's (Hammoud et al. 2023), and
    near-future accuracy when the run measured it."""
    cols = [("final acc", "final_average_accuracy"), ("anytime acc", "average_anytime_accuracy"),
            ("forgetting", "forgetting"), ("online acc", "online_accuracy")]
    if any(g.get("near_future_accuracy", {}).get("mean") is not None for g in groups):
        cols.append(("near-future acc", "near_future_accuracy"))
    if any(g.get("blind_online_accuracy", {}).get("mean") is not None for g in groups):
        cols.append(("blind online", "blind_online_accuracy"))
    labels = [g["variant"] + ("  " + ",".join(f"{k}={v:g}" for k, v in g["hparams"].items())
                              if g["hparams"] else "") for g in groups]
    width = max([len("variant"), *map(len, labels)]) + 2
    lines = ["variant".ljust(width) + "".join(c.rjust(17) for c, _ in cols) + "   n"]
    for label, g in zip(labels, groups, strict=True):
        cells = []
        for _, key in cols:
            s = g.get(key, {"mean": None})
            cells.append("n/a".rjust(17) if s["mean"] is None
                         else f"{s['mean']:.3f} ± {s['std']:.3f}".rjust(17))
        note = f"   {g['n']}" + (f" ({g['n_diverged']} diverged)" if g["n_diverged"] else "")
        lines.append(label.ljust(width) + "".join(cells) + note)
    return "\n".join(lines)


def write_run(
    run_dir: results.RunDirectory, config: dict, outs: list[VariantResult], plot: bool,
    complete: bool = True,
) -> dict:
    """Write config, members, evaluations, summaries and plots; returns the summary."""
    members, evals, index = [], [], 0
    for vr in outs:
        infos = []
        for m, (member, row) in enumerate(zip(vr.variant.members, vr.rows, strict=True)):
            info = {"member": index, "variant": vr.variant.label, "learner": vr.variant.learner,
                    "seed": member.seed, "hparams": member.hparams}
            infos.append(info)
            members.append({**info, "task_classes": vr.result.extra["task_classes"][m], **row})
            index += 1
        evals.extend(results.eval_rows(vr.result, infos))
    summary_members = [
        {k: m[k] for k in ("member", "variant", "learner", "seed", "hparams", *results.METRICS,
                           "acc_matrix", "diverged", "diverged_block", "diverged_step",
                           "diverged_cause")}
        for m in members
    ]
    groups = results.group_summary(summary_members)
    summary = {"complete": complete, "members": summary_members, "groups": groups}
    run_dir.write_json("config.json", config)
    run_dir.write_json("members.json", [
        {k: m[k] for k in ("member", "variant", "learner", "seed", "hparams", "task_classes")}
        for m in members
    ])
    run_dir.write_jsonl("eval.jsonl", evals)
    run_dir.write_json("summary.json", summary)
    run_dir.write_text("summary.csv", results.summary_csv(groups))
    if plot:
        write_plots(run_dir, outs, groups)
    return summary


def write_plots(run_dir: results.RunDirectory, outs: list[VariantResult], groups) -> None:
    """``accuracy_matrix.png`` and ``anytime_accuracy.png`` (mean over seeds per group)."""
    panels, curves, task_ends = [], [], None
    for vr in outs:
        r = vr.result
        keys = [json.dumps(m.hparams, sort_keys=True) for m in vr.variant.members]
        ok = ~np.array([row["diverged"] for row in vr.rows])
        anytime = metrics.anytime_accuracy(r.acc, r.eval_task)
        for key in dict.fromkeys(keys):
            sel = np.array([k == key for k in keys]) & ok
            if not sel.any():
                continue
            hp = json.loads(key)
            label = vr.variant.label + (" " + ",".join(f"{k}={v:g}" for k, v in hp.items())
                                        if len(set(keys)) > 1 else "")
            panels.append((label, r.accuracy_matrix()[sel].mean(0)))
            during = r.eval_task >= 0
            curves.append((label, r.eval_step[during], anytime[sel][:, during].mean(0),
                           anytime[sel][:, during].std(0)))
        task_ends = r.eval_step[(r.eval_kind == EVAL_TASK_END) & (r.eval_task >= 0)]
    if not panels:
        return
    run_dir.write_with("accuracy_matrix.png", lambda p: plots.accuracy_matrices(panels, p))
    run_dir.write_with("anytime_accuracy.png",
                       lambda p: plots.anytime_curves(curves, task_ends, p))


def run_config(name, dataset, ds, variants, outs, command, wall_s) -> dict:
    """``config.json``: every setting of every variant, devices, timings and versions."""
    return {
        "experiment": name, "command": command, "dataset": dataset,
        "dataset_source": ds.source,
        "variants": [{
            "label": v.label, "learner": v.learner, "stream": dataclasses.asdict(v.stream),
            "learner_config": dataclasses.asdict(v.learner_config),
            "model": dataclasses.asdict(v.model), "n_members": len(v.members),
        } for v in variants],
        "devices": [str(d) for d in jax.local_devices()],
        "backend": jax.default_backend(),
        "timing": {vr.variant.label: {"compile_s": vr.result.compile_s,
                                      "run_s": vr.result.run_s,
                                      "devices_used": vr.result.extra["devices"]}
                   for vr in outs},
        "wall_s": wall_s,
        "complete": len(outs) == len(variants),
        "versions": versions(),
    }


def run_experiment(
    name: str, dataset: str, variants: list[Variant], *, out: str | None, overwrite=False,
    data_dir=None, n_devices=None, quiet=False, plot=True, command=None,
    blocks_per_chunk: int | None = None,
) -> tuple[dict, Path | None]:
    """Load ``dataset``, run every variant, and write the run directory.

    Every variant is built and checked before the first one runs, so bad settings leave no
    directory. If a run is interrupted (or fails) after some variants finished, those are
    written with ``"complete": false`` in ``config.json`` and ``summary.json`` before the
    exception propagates. Returns ``(summary, run_dir_path or None)``.
    """
    run_dir = results.RunDirectory(out, overwrite) if out else None
    try:
        ds = data.load(dataset, data_dir)
        prepared = [prepare_variant(v, ds) for v in variants]
    except BaseException:
        if run_dir is not None:
            run_dir.abort()
        raise
    outs: list[VariantResult] = []
    t0 = time.perf_counter()
    try:
        for prep in prepared:
            v = prep.variant
            if not quiet:
                kind = v.stream.kind + (" (i.i.d.)" if v.stream.iid else "")
                print(f"{v.label}: {len(v.members)} member(s), {ds.name}, {kind} stream",
                      file=sys.stderr, flush=True)
            outs.append(run_variant(prep, ds, n_devices, quiet, blocks_per_chunk))
    except BaseException:
        if run_dir is not None and outs:
            config = run_config(name, dataset, ds, variants, outs, command,
                                time.perf_counter() - t0)
            write_run(run_dir, config, outs, plot, complete=False)
            path = run_dir.commit()
            print(f"{name}: stopped; the {len(outs)} finished variant(s) are in {path} "
                  "(marked incomplete)", file=sys.stderr)
        elif run_dir is not None:
            run_dir.abort()
        raise
    config = run_config(name, dataset, ds, variants, outs, command, time.perf_counter() - t0)
    if run_dir is not None:
        try:
            summary = write_run(run_dir, config, outs, plot)
            return summary, run_dir.commit()
        except BaseException:
            run_dir.abort()
            raise
    rows = [{"variant": vr.variant.label, "hparams": m.hparams, **row}
            for vr in outs for m, row in zip(vr.variant.members, vr.rows, strict=True)]
    return {"members": rows, "groups": results.group_summary(rows)}, None
