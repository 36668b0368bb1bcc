"""An experiment: one dataset, one or more variants (learner x stream), each a compiled sweep
over its members, written to one run directory."""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import platform
import shutil
import sys
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import jax
import numpy as np

from ocljax import data, learners, metrics, models, precision, streams
from ocljax.errors import ConfigError, unknown_choice
from ocljax.run import driver, plots, probing, results
from ocljax.run.checkpoint import Checkpointer, Interrupted
from ocljax.run.progress import CompileClock, Progress, describe_phases
from ocljax.streams.schedule import EVAL_TASK_END
from ocljax.sweep import Member, devices_for, distributed


@dataclass(frozen=True)
class ModelConfig:
    """Static model settings: ``name`` in ``ocljax.models.MODELS``, ``width`` and ``depth``
    (``None``: the model's own default; see ``ocljax.models.make_model``), the matmul
    ``precision`` (``ocljax.precision.PRECISIONS``) and ``input_norm``: ``unit`` feeds the
    network pixels in [0, 1]; ``standard`` subtracts the training pool's per-channel mean and
    divides by its std first (``ocljax.models.standardized``; Avalanche's and Mammoth's
    convention, e.g. MNIST 0.1307 / 0.3081); ``init``: ``flax`` (LeCun-normal kernels, zero
    biases) or ``torch`` (PyTorch's default uniform kernels and biases,
    ``ocljax.models.torch_initialised``), for parity with PyTorch libraries' numbers."""

    name: str = "mlp"
    width: int | None = None
    depth: int | None = None
    precision: str = "float32"
    input_norm: str = "unit"
    init: str = "flax"

    def __post_init__(self):
        precision.check(self.precision)
        for key, known in (("input_norm", models.INPUT_NORMS), ("init", models.INITS)):
            if getattr(self, key) not in known:
                raise ConfigError(unknown_choice(key, getattr(self, key), known))
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


def prepare_variant(variant: Variant, ds: data.Dataset,
                    compiler: driver.CompileOnce | None = None) -> Prepared:
    """Build the stream, model and learner of ``variant``; raises ``ConfigError`` for bad
    settings before anything is compiled. ``compiler``: the experiment's ``CompileOnce`` (on
    one ``ds``); variants with the same learner, config and model then get the same
    ``Learner`` object (``driver.memo``), so that sweeps whose programs are the same trace
    them once (e.g. finetune and finetune@iid)."""
    stream = streams.build(variant.stream, ds, [m.seed for m in variant.members])
    module = learners.get(variant.learner)
    learners.check_stream(variant.learner, variant.stream.task_free, variant.learner_config)
    learners.check_augment(variant.learner, variant.stream.kind, variant.learner_config)
    learner = driver.memo(
        compiler, ("learner", variant.learner, variant.learner_config, variant.model),
        lambda: module.make(build_model(variant.model, ds), variant.learner_config))
    hps = [module.HParams(**m.hparams) for m in variant.members]
    return Prepared(variant, stream, learner, hps)


def build_model(config: ModelConfig, ds: data.Dataset):
    """The ``ocljax.types.Model`` that ``config`` describes, for ``ds``'s classes (and, with
    ``input_norm="standard"``, its training pool's channel statistics)."""
    model = models.make_model(config.name, ds.num_classes, config.width, config.depth)
    if config.init == "torch":
        model = models.torch_initialised(model)
    model = precision.cast_model(model, config.precision)
    # outermost, so pixels are standardised in float32 before a bf16 cast, not after it
    if config.input_norm == "standard":
        model = models.standardized(model, *models.channel_stats(ds.train_x))
    return model


def variant_devices(prep: Prepared, n_devices: int | None) -> int | None:
    """Devices a variant's sweep is spread over: ``n_devices`` if given; otherwise as few
    rounds of members per local device as possible (every device of every process in a
    multi-process run: None)."""
    if n_devices is not None:
        return n_devices
    if distributed.process_count() > 1:
        return None
    return devices_for(len(prep.variant.members), len(jax.local_devices()))


@dataclass
class CompiledVariant:
    """A variant's programs, compiled and not run yet: the sweep (``driver.compile_sweep``)
    and, unless the probe is off or the learner exposes no features, the linear probe of its
    final states (``probing.compile_probe``)."""

    sweep: driver.Sweep
    probe: Callable | None


def probe_classes(probe_per_class: int) -> int:
    """Samples per class the linear probe is fitted on: 0 (off) in a multi-process run, whose
    final member states no single process holds."""
    return 0 if distributed.process_count() > 1 else probe_per_class


def compile_variant(
    prep: Prepared, ds: data.Dataset, n_devices: int | None, blocks_per_chunk: int | None = None,
    *, checkpoint: Checkpointer | None = None, compile_mode: str = "auto", log=None,
    probe_per_class: int = probing.PER_CLASS, compiler: driver.CompileOnce | None = None,
) -> CompiledVariant:
    """Compile a prepared variant's sweep (``ocljax.run.driver.compile_sweep``) and the
    linear probe of its final states (unless ``probe_per_class`` is 0), with the run's XLA
    options; a variant that will resume from ``checkpoint`` skips its initialisation
    programs. ``compiler``: a ``driver.CompileOnce`` shared by the experiment's variants, so
    that programs two variants have in common compile once."""
    seeds = [m.seed for m in prep.variant.members]
    sweep = driver.compile_sweep(
        prep.learner, prep.stream, ds, prep.hparams, seeds,
        n_devices=variant_devices(prep, n_devices), blocks_per_chunk=blocks_per_chunk,
        precision=prep.variant.model.precision, cost=True, log=log, compile_mode=compile_mode,
        fresh=checkpoint is None or not checkpoint.exists(), compiler=compiler)
    probe = None
    if probe_classes(probe_per_class) > 0:
        M = len(seeds)  # the final states: the members' learner states, padding dropped
        states = jax.tree.map(
            lambda a: jax.ShapeDtypeStruct((M, *a.shape[1:]), a.dtype,
                                           sharding=a.sharding if sweep.padded == M else None),
            sweep.abstract[0])
        probe = probing.compile_probe(prep.learner, prep.stream, ds, states, prep.hparams,
                                      seeds, probe_per_class, compiler_options=sweep.options,
                                      compiler=compiler)
    return CompiledVariant(sweep, probe)


def run_variant(
    prep: Prepared, ds: data.Dataset, n_devices: int | None, quiet: bool,
    blocks_per_chunk: int | None = None, *, probe_per_class: int = probing.PER_CLASS,
    checkpoint: Checkpointer | None = None, should_stop=None, compile_mode: str = "auto",
    compiled: CompiledVariant | None = None, compiler: driver.CompileOnce | None = None,
) -> VariantResult:
    """Run a prepared variant's members as one compiled sweep and compute their metrics
    (the linear probe too unless ``probe_per_class`` is 0). With a ``checkpoint``, the sweep
    resumes from it and saves to it (see ``ocljax.run.driver.run``). ``compiled``: the variant
    already compiled by ``compile_variant`` (with the same ``n_devices``, ``blocks_per_chunk``,
    ``checkpoint``, ``compile_mode`` and ``probe_per_class``); compiled here otherwise, with
    ``compiler`` (see ``compile_variant``)."""
    variant = prep.variant
    progress = None if quiet else Progress(variant.label,
                                           variant.stream.batch_size * len(variant.members))
    log = None if quiet else (lambda msg: print(f"[{variant.label}] {msg}", flush=True))
    if probe_per_class > 0 and probe_classes(probe_per_class) == 0 and log is not None:
        log("linear probe: skipped in a multi-process run")
    if checkpoint is not None and log is not None:
        checkpoint.log = log
    compile_wall = 0.0  # compiled here, in turn (not ahead on another thread)
    if compiled is None:
        t0 = time.perf_counter()
        compiled = compile_variant(prep, ds, n_devices, blocks_per_chunk, checkpoint=checkpoint,
                                   compile_mode=compile_mode, log=log,
                                   probe_per_class=probe_per_class, compiler=compiler)
        compile_wall = time.perf_counter() - t0
    sweep = compiled.sweep
    result = driver.execute(sweep, progress=progress, log=log,
                            keep_state=compiled.probe is not None, checkpoint=checkpoint,
                            should_stop=should_stop)
    result.extra["compile_wall_s"] = compile_wall
    if compiled.probe is not None:
        t0 = time.perf_counter()
        per_task = compiled.probe(result.final_state)
        result.extra["linear_probe_task_accuracy"] = per_task
        result.extra["linear_probe_accuracy"] = per_task.mean(-1)
        result.extra["probe_s"] = time.perf_counter() - t0
        if log is not None:
            log(f"linear probe: {result.extra['probe_s']:.1f} s")
    result.final_state = None  # not kept past the probe (nor pickled for resume)
    result.extra["devices"] = sweep.mesh.devices.size
    result.extra["task_classes"] = prep.stream.task_classes
    result.extra["member_info"] = prep.stream.member_info
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
    members, described, index = [], [], 0  # described: members.json, who each member is
    evals = eval_records(outs)
    for vr in outs:
        stream_info = vr.result.extra.get("member_info") or [{}] * len(vr.variant.members)
        for m, (member, row) in enumerate(zip(vr.variant.members, vr.rows, strict=True)):
            described.append({
                "member": index, "variant": vr.variant.label, "learner": vr.variant.learner,
                "seed": member.seed, "hparams": member.hparams,
                "task_classes": vr.result.extra["task_classes"][m], **stream_info[m]})
            members.append({**described[-1], **row})
            index += 1
    summary_members = [
        {k: m[k] for k in ("member", "variant", "learner", "seed", "hparams", *results.METRICS,
                           "acc_matrix", "diverged", "diverged_block", "diverged_step",
                           "diverged_cause")}
        for m in members
    ]
    groups = results.group_summary(summary_members)
    summary = {"complete": complete, "members": summary_members, "groups": groups}
    run_dir.write_json("config.json", config)
    run_dir.write_json("members.json", described)
    run_dir.write_jsonl(eval_file(), evals)
    run_dir.write_json("summary.json", summary)
    run_dir.write_text("summary.csv", results.summary_csv(groups))
    if plot:
        write_plots(run_dir, outs, groups)
    return summary


def eval_file() -> str:
    """``eval.jsonl``; ``eval.p{k}.jsonl`` for process k of a multi-process run."""
    if distributed.process_count() == 1:
        return "eval.jsonl"
    return f"eval.p{distributed.process_index()}.jsonl"


def eval_records(outs: list[VariantResult]) -> list[dict]:
    """The ``eval.jsonl`` rows of every member this process owns (all of them in a
    single-process run; in a multi-process run, those on its devices)."""
    rows, index = [], 0
    multi = distributed.process_count() > 1
    for vr in outs:
        infos, owned = [], []
        members = vr.variant.members
        mine = (distributed.owned_members(vr.result.extra.get("padded_members", len(members)))
                if multi else range(len(members)))
        for m, member in enumerate(members):
            if m in mine:
                infos.append({"member": index + m, "variant": vr.variant.label,
                              "seed": member.seed, "hparams": member.hparams})
                owned.append(m)
        if owned:
            rows.extend(results.eval_rows(vr.result, infos, owned))
        index += len(members)
    return rows


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


def time_summary(clock: CompileClock, ahead: CompileAhead | None, ran: list[VariantResult],
                 wall_s: float) -> dict:
    """Where an experiment's time went (``config.json``'s ``time``): its wall time up to the
    run directory; the wall time of compilation (``compile_s``: waiting for the variants to
    compile ahead, and compiling the others in turn, probes included); training (``run_s``)
    and the linear probes (``probe_s``) of the variants run; and the JAX compilation phases
    (``CompileClock``) summed over threads."""
    waited = ahead.wait_s if ahead is not None else 0.0
    in_turn = sum(vr.result.extra.get("compile_wall_s", 0.0) for vr in ran)
    return {"wall_s": wall_s, "compile_s": waited + in_turn,
            "run_s": sum(vr.result.run_s for vr in ran),
            "probe_s": sum(vr.result.extra.get("probe_s", 0.0) for vr in ran),
            **clock.summary()}


def describe_time(timing: dict) -> str:
    """The line an experiment prints at its end: ``time_summary`` in words."""
    t = timing
    return (f"time: {t['wall_s']:.1f} s; compiling {t['compile_s']:.1f} s "
            f"({describe_phases(t)}, summed over threads); training {t['run_s']:.1f} s; "
            f"linear probes {t['probe_s']:.1f} s")


def run_config(name, dataset, ds, variants, outs, command, wall_s,
               timing: dict | None = None) -> dict:
    """``config.json``: every setting of every variant, devices, timings and versions;
    ``timing``: the experiment's ``time_summary``."""
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
                                      "devices_used": vr.result.extra["devices"],
                                      "compile": vr.result.extra.get("compile")}
                   for vr in outs},
        "wall_s": wall_s,
        "time": timing,
        "complete": len(outs) == len(variants),
        "versions": versions(),
    }


def checkpoint_root(out: str | Path) -> Path:
    """Where the checkpoints of run directory ``out`` live: a hidden sibling
    ``.NAME.ckpt`` (beside ``RunDirectory``'s temporaries, so tools that copy a run's hidden
    siblings - e.g. ``tpu/watchdog.sh`` - carry them along)."""
    out = Path(out).resolve()
    return out.parent / f".{out.name}.ckpt"


# settings added after runs and checkpoints existed, per section of a variant: left out of
# the resume fingerprint and of pooling's comparison at their defaults, so a run made before
# they existed still resumes and pools with newer runs
LATER_FIELDS = {"model": (ModelConfig, ("input_norm", "init")),
                "stream": (streams.StreamConfig, ("blurry", "max_rotation"))}


def settings_fingerprint(section: str, settings: dict) -> dict:
    """A variant's ``model`` or ``stream`` settings (``dataclasses.asdict`` of its config, or
    a run's config.json / plan.json entry) less the ``LATER_FIELDS`` at their defaults."""
    config, later = LATER_FIELDS[section]
    return {k: v for k, v in settings.items()
            if not (k in later and v == config.__dataclass_fields__[k].default)}


def model_fingerprint(model: ModelConfig) -> dict:
    """The model settings a resumed run must match (``settings_fingerprint``)."""
    return settings_fingerprint("model", dataclasses.asdict(model))


def plan_fingerprint(name: str, dataset: str, variants: list[Variant],
                     blocks_per_chunk: int | None, compile_mode: str = "auto") -> dict:
    """Every setting that decides a run's numbers; a resumed run must match it exactly. (The
    compile mode decides rounding: named unless ``auto``, so older checkpoints still match.)"""
    extra = {} if compile_mode == "auto" else {"compile_mode": compile_mode}
    return results.clean({
        **extra,
        "experiment": name, "dataset": dataset, "blocks_per_chunk": blocks_per_chunk,
        "variants": [{
            "label": v.label, "learner": v.learner,
            "stream": settings_fingerprint("stream", dataclasses.asdict(v.stream)),
            "learner_config": dataclasses.asdict(v.learner_config),
            "model": model_fingerprint(v.model),
            "members": [{"seed": m.seed, "hparams": m.hparams} for m in v.members],
        } for v in variants],
    })


def differences(a, b, path: str = "") -> list[str]:
    """The paths (``variants[0].members[1].seed``) at which two JSON-like values differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted({*a, *b}, key=str)
                for d in differences(a.get(k), b.get(k), f"{path}.{k}" if path else str(k))]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b, strict=True))
                for d in differences(x, y, f"{path}[{i}]")]
    return [] if a == b else [path or "(the plan)"]


class Resumable:
    """The checkpoint side of one experiment run: the plan it belongs to, one orbax directory
    per variant, and a pickle of each finished variant's results."""

    def __init__(self, root: Path, fingerprint: dict, every_s: float, keep: int):
        self.root, self.every_s, self.keep = root, every_s, keep
        plan_file = root / "plan.json"
        self.created = not plan_file.exists()  # by this run: removed if it fails before work
        if plan_file.exists():
            saved = json.loads(plan_file.read_text())
            for v in saved.get("variants", []) if isinstance(saved, dict) else []:
                if isinstance(v, dict) and isinstance(v.get("stream"), dict):
                    # saved before the fingerprint left the stream's later settings out
                    v["stream"] = settings_fingerprint("stream", v["stream"])
            if saved != fingerprint:
                diff = differences(saved, fingerprint)
                shown = ", ".join(diff[:6]) + (f" and {len(diff) - 6} more" if len(diff) > 6
                                               else "")
                raise ConfigError(
                    f"the checkpoints in {root} belong to a run with other settings (differs "
                    f"in: {shown}); rerun the original command with --resume, or start over "
                    "with --overwrite")
        elif distributed.process_index() == 0:
            root.mkdir(parents=True, exist_ok=True)
            results.write_atomic(plan_file, json.dumps(fingerprint, indent=1, sort_keys=True))
        distributed.barrier("ocljax-checkpoint-plan")

    def checkpointer(self, i: int) -> Checkpointer:
        return Checkpointer(self.root / f"variant-{i}", self.every_s, self.keep)

    def finished(self, i: int, variant: Variant) -> VariantResult | None:
        path = self.root / f"variant-{i}.done.pkl"
        if not path.exists():
            return None
        try:
            result = pickle.loads(path.read_bytes())
        except Exception as err:  # noqa: BLE001 - unreadable: run the variant again
            print(f"warning: {path} cannot be read ({err}); running {variant.label} again",
                  file=sys.stderr)
            return None
        return VariantResult(variant, result, results.member_metrics(result))

    def save_finished(self, i: int, vr: VariantResult) -> None:
        if distributed.process_index() == 0:  # results are all-gathered: the same everywhere
            results.write_atomic(self.root / f"variant-{i}.done.pkl", pickle.dumps(vr.result))
        distributed.barrier(f"ocljax-variant-{i}-saved")


class CompileAhead:
    """Compiles an experiment's variants on a pool of threads before their turn to run.

    XLA compiles without holding the GIL, so on a host with several cores the variants'
    programs compile in parallel: the quick-start's three variants took 7-8 s of compilation
    one after the other on 2 cores. Every compilation finishes before the first variant
    runs: on a CPU no run then shares its cores with a compiler (its measured throughput stays
    clean), and on a GPU no run perturbs the kernel autotuning that XLA times on the device
    while it compiles. A variant's compile messages are held back
    and printed when its turn comes, and its errors (a sweep that does not fit) are raised
    then too, as if it had been compiled in turn. ``workers=1`` (or a multi-process run, whose
    processes must compile the same programs in step) compiles each variant just before it
    runs. Results do not depend on it: the same programs are compiled either way.

    A variant's programs are its sweep's (``driver.compile_sweep``) and its linear probe
    (``probing.compile_probe``, compiled from the final states' shapes). With ``compiler``, a
    ``driver.CompileOnce``, programs that several variants share (finetune and its i.i.d.
    upper bound have the same three) compile once."""

    def __init__(self, prepared: list[Prepared], todo: list[int], ds: data.Dataset,
                 n_devices: int | None, blocks_per_chunk: int | None, checkpointers: dict,
                 compile_mode: str, workers: int | None, quiet: bool,
                 probe_per_class: int = probing.PER_CLASS,
                 compiler: driver.CompileOnce | None = None):
        if workers is not None and workers < 1:
            raise ConfigError(f"--compile-workers must be >= 1, got {workers}")
        if workers is None:
            workers = min(os.cpu_count() or 1, 8)
        workers = min(workers, len(todo))
        self.prepared, self.quiet = prepared, quiet
        self.jobs: dict[int, tuple[Future, list[str]]] = {}
        self.pool = None
        self.wait_s = 0.0  # wall time spent waiting for the variants to compile ahead
        if workers < 2 or distributed.process_count() > 1:
            return
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="ocljax-variant")
        for i in todo:
            held: list[str] = []
            self.jobs[i] = (self.pool.submit(
                compile_variant, prepared[i], ds, n_devices, blocks_per_chunk,
                checkpoint=checkpointers.get(i), compile_mode=compile_mode,
                log=held.append, probe_per_class=probe_per_class, compiler=compiler), held)
        if not quiet:
            print(f"compiling {len(todo)} variants on {workers} threads", file=sys.stderr,
                  flush=True)
        t0 = time.perf_counter()
        try:
            wait([job for job, _ in self.jobs.values()])
            self.wait_s = time.perf_counter() - t0
        except BaseException:  # interrupted while waiting: start no further compilation
            self.cancel()
            raise
        finally:
            self.pool.shutdown(wait=False)  # nothing more is submitted; the jobs run on

    def compiled(self, i: int) -> CompiledVariant | None:
        """Variant ``i``'s compiled programs (None: compile them in turn); prints its held-back
        messages and raises its compile error, if any."""
        if i not in self.jobs:
            return None
        job, held = self.jobs.pop(i)
        try:
            return job.result()
        finally:
            if not self.quiet:
                label = self.prepared[i].variant.label
                for msg in held:
                    print(f"[{label}] {msg}", flush=True)

    def cancel(self) -> None:
        """Drop the compilations not started yet (a failed or interrupted experiment)."""
        for job, _ in self.jobs.values():
            job.cancel()
        self.jobs.clear()


def run_experiment(
    name: str, dataset: str, variants: list[Variant], *, out: str | None, overwrite=False,
    data_dir=None, n_devices=None, quiet=False, plot=True, command=None,
    blocks_per_chunk: int | None = None, resume: bool = False, checkpoint_every: float = 60.0,
    keep_checkpoints: int = 3, probe_per_class: int = probing.PER_CLASS, should_stop=None,
    compile_mode: str = "auto", compile_workers: int | None = None,
) -> tuple[dict, Path | None]:
    """Load ``dataset``, run every variant, and write the run directory.

    Every variant is built and checked before the first one runs, so bad settings leave no
    directory. With ``out``, progress is checkpointed (``checkpoint_root(out)``, every
    ``checkpoint_every`` seconds at a chunk boundary, the last ``keep_checkpoints`` kept) and
    ``resume=True`` continues an interrupted run from there with bit-identical results; the
    checkpoints are deleted once the run directory is complete. If a run is interrupted
    (``should_stop()``, e.g. on SIGTERM) or fails, the variants that finished are written with
    ``"complete": false`` before the exception propagates. Returns
    ``(summary, run_dir_path or None)``. ``compile_mode``: see ``ocljax.run.driver``.
    ``compile_workers``: threads that compile the variants ahead of their turn (see
    ``CompileAhead``; default: one per CPU core, at most 8 and one per variant; 1 compiles
    each variant just before it runs).
    """
    driver.check_compile_mode(compile_mode)
    if resume and not out:
        raise ConfigError("--resume needs the run directory to continue (--resume RUN_DIR)")
    multi = distributed.process_count() > 1
    lead_out = out if distributed.process_index() == 0 else None  # process 0 writes the run
    root = checkpoint_root(out) if out else None  # multi-process: on a shared file system
    if root is not None and root.exists() and not resume:
        if not overwrite:
            raise ConfigError(
                f"{out} has checkpoints of an interrupted run in {root}: pass --resume to "
                "continue it, or --overwrite to start over")
        distributed.barrier("ocljax-checkpoints-seen")  # every process saw them before removal
        if distributed.process_index() == 0:
            shutil.rmtree(root, ignore_errors=True)
        distributed.barrier("ocljax-checkpoints-removed")
    if resume and root is not None and not root.exists() and Path(out).is_dir():
        done = Path(out) / "summary.json"
        if done.exists() and json.loads(done.read_text()).get("complete"):
            raise ConfigError(f"{out} is already complete; nothing to resume")
        if not done.exists() and not (Path(out) / "config.json").exists():
            raise ConfigError(f"{out} is not a run directory (no summary.json, no checkpoints "
                              f"in {root}); nothing to resume - check the path")
    if resume and lead_out and not root.exists() and not Path(out).exists():
        # the preemption watchdog resumes before the first checkpoint exists: start afresh,
        # but say so (a mistyped path would otherwise look like a resumed run)
        print(f"note: nothing to resume at {out} (no run directory, no checkpoints): "
              "starting a fresh run there", file=sys.stderr, flush=True)
    if resume and lead_out:  # temporaries of a killed run (SIGKILL leaves them behind)
        for stale in Path(out).resolve().parent.glob(f".{Path(out).name}.*"):
            if stale.is_dir() and stale != root:
                shutil.rmtree(stale, ignore_errors=True)
    run_dir = results.RunDirectory(lead_out, overwrite or resume) if lead_out else None
    try:
        ds = data.load(dataset, data_dir)
        compiler = driver.CompileOnce()  # variants' programs (and learners) in common, once
        prepared = [prepare_variant(v, ds, compiler) for v in variants]
        saver = None
        if root is not None:
            saver = Resumable(root, plan_fingerprint(name, dataset, variants, blocks_per_chunk,
                                                     compile_mode),
                              checkpoint_every, keep_checkpoints)
    except BaseException:
        if run_dir is not None:
            run_dir.abort()
        raise
    outs: list[VariantResult] = []
    t0 = time.perf_counter()
    if plot and run_dir is not None:
        plots.preload()  # imported while the variants compile, plotted at the end
    ahead = None
    clock = CompileClock().start()
    ran: list[VariantResult] = []  # run by this call (not loaded from an interrupted one)
    try:
        finished = {i: saver.finished(i, p.variant) for i, p in enumerate(prepared)} \
            if saver is not None else {}
        checkpointers = {i: saver.checkpointer(i) for i in range(len(prepared))} \
            if saver is not None else {}
        todo = [i for i in range(len(prepared)) if finished.get(i) is None]
        ahead = CompileAhead(prepared, todo, ds, n_devices, blocks_per_chunk, checkpointers,
                             compile_mode, compile_workers, quiet, probe_per_class, compiler)
        for i, prep in enumerate(prepared):
            v = prep.variant
            done = finished.get(i)
            if done is not None:
                if not quiet:
                    print(f"{v.label}: finished before, results loaded from {saver.root}",
                          file=sys.stderr, flush=True)
                outs.append(done)
                continue
            stop, = distributed.agree(should_stop is not None and should_stop())
            if stop:  # asked while the previous variant finished its last chunk
                raise Interrupted(getattr(should_stop, "signum", 0))
            if not quiet:
                kind = v.stream.kind + (" (i.i.d.)" if v.stream.iid else "")
                print(f"{v.label}: {len(v.members)} member(s), {ds.name}, {kind} stream",
                      file=sys.stderr, flush=True)
            outs.append(run_variant(
                prep, ds, n_devices, quiet, blocks_per_chunk, probe_per_class=probe_per_class,
                checkpoint=checkpointers.get(i), should_stop=should_stop,
                compile_mode=compile_mode, compiled=ahead.compiled(i), compiler=compiler))
            ran.append(outs[-1])
            if saver is not None:
                saver.save_finished(i, outs[-1])
    except BaseException as err:
        clock.stop()
        if ahead is not None:
            ahead.cancel()
        if run_dir is not None and (outs or isinstance(err, Interrupted)):
            wall = time.perf_counter() - t0
            config = run_config(name, dataset, ds, variants, outs, command, wall,
                                time_summary(clock, ahead, ran, wall))
            write_run(run_dir, config, outs, plot and bool(outs), complete=False)
            path = run_dir.commit()
            print(f"{name}: stopped; the {len(outs)} finished variant(s) are in {path} "
                  "(marked incomplete)" + (f"; continue with --resume {out}"
                                           if saver is not None else ""), file=sys.stderr)
        elif run_dir is not None:
            run_dir.abort()
        if (saver is not None and saver.created and not outs
                and not isinstance(err, Interrupted) and distributed.process_index() == 0
                and not any(p.name.isdigit() for p in saver.root.glob("variant-*/*"))):
            shutil.rmtree(saver.root, ignore_errors=True)  # failed before any work: no trace
        raise
    clock.stop()
    wall = time.perf_counter() - t0
    timing = time_summary(clock, ahead, ran, wall)
    if not quiet and ran:
        print(describe_time(timing), file=sys.stderr, flush=True)
    config = run_config(name, dataset, ds, variants, outs, command, wall, timing)
    if run_dir is not None:
        try:
            summary = write_run(run_dir, config, outs, plot)
            path = run_dir.commit()
        except BaseException:
            run_dir.abort()
            raise
        if root is not None:
            shutil.rmtree(root, ignore_errors=True)
        distributed.barrier("ocljax-run-directory-written")
        return summary, path
    if out and multi:  # another process's rows, into the run directory process 0 wrote
        distributed.barrier("ocljax-run-directory-written")
        Path(out).mkdir(parents=True, exist_ok=True)
        results.write_atomic(Path(out) / eval_file(), results.jsonl(eval_records(outs)))
    rows = [{"variant": vr.variant.label, "hparams": m.hparams, **row}
            for vr in outs for m, row in zip(vr.variant.members, vr.rows, strict=True)]
    return {"members": rows, "groups": results.group_summary(rows)}, None
