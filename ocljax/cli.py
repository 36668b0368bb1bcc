"""Command line shared by every experiment module (``python -m experiments.NAME``).

Settings come from the experiment's preset, then the flags, then ``--set key=value`` (static
settings of the stream, model or learner, or a single value of a traced hyperparameter); traced
hyperparameters are swept with ``--grid key=v1,v2,...`` (one compiled program for the grid).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence

from ocljax import learners, streams
from ocljax.errors import ConfigError, Interrupted, OCLError, did_you_mean
from ocljax.precision import PRECISIONS
from ocljax.run.driver import COMPILE_MODES
from ocljax.sweep import (
    distributed,
    enable_compilation_cache,
    expand,
    parse_assignment,
    parse_value,
    request_cpu_devices,
    request_deterministic,
)

STREAM_FIELDS = {f.name: f.default for f in dataclasses.fields(streams.StreamConfig)}


def model_fields():
    """Model settings for ``--set``: ``model`` (the name), ``width``, ``depth``.

    The values are what ``parse_value`` parses against: ``width`` and ``depth`` default to
    ``None`` (the model's own default) but are set as ints.
    """
    from ocljax.run.experiment import ModelConfig

    fields = {f.name: f.default for f in dataclasses.fields(ModelConfig)}
    typed = {key: 0 if value is None else value for key, value in fields.items()}
    return {"model": typed.pop("name"), **typed}


def build_parser(prog: str, description: str, preset: dict) -> argparse.ArgumentParser:
    """The argument parser, with the experiment's preset as defaults."""
    p = argparse.ArgumentParser(prog=prog, description=description,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--learner", help="comma-separated learners; NAME@split, NAME@permuted, "
                   "NAME@rotated override the stream kind of one entry, NAME@iid trains it on "
                   "the i.i.d. mixture of the stream (joint upper bound). Learners: "
                   f"{', '.join(sorted(learners.REGISTRY))}")
    p.add_argument("--dataset",
                   help="digits | synthetic | mnist | fashion_mnist | cifar10 | cifar100")
    p.add_argument("--stream", choices=streams.KINDS)
    p.add_argument("--n-tasks", type=int, dest="n_tasks")
    p.add_argument("--batch-size", type=int, dest="batch_size", help="incoming samples per step")
    p.add_argument("--passes", type=int, help="training steps per incoming batch (mem_iters)")
    p.add_argument("--task-free", action=argparse.BooleanOptionalAction, dest="task_free",
                   default=None, help="hide task ids and boundaries from the learner")
    p.add_argument("--class-order", choices=("fixed", "random"), dest="class_order")
    p.add_argument("--eval-every", type=int, dest="eval_every",
                   help="steps between continual evaluations")
    p.add_argument("--near-future", type=int, dest="near_future", metavar="S",
                   help="also score each step's model on the incoming batch S batches later "
                   "(near-future accuracy, Hammoud et al. 2023; 0: off)")
    p.add_argument("--eval-dense", type=int, dest="eval_dense_every", metavar="N",
                   help="evaluate every N steps during the first --eval-dense-window steps of "
                   "each task (full-resolution stability gap; 0: off)")
    p.add_argument("--eval-dense-window", type=int, dest="eval_dense_window", metavar="W")
    p.add_argument("--model", help="mlp | cnn | cnn_bn | resnet18")
    p.add_argument("--precision", choices=PRECISIONS,
                   help="matmul precision: float32 (default), tf32 (GPU TensorFloat-32) or "
                   "bf16 (bfloat16 compute, float32 parameters)")
    p.add_argument("--compile", choices=COMPILE_MODES, default="auto", dest="compile_mode",
                   help="compile effort on a CPU: fast (LLVM optimisation off, elemental "
                   "emitters: ~60%% less compile time, slower elementwise code), optimized "
                   "(LLVM -O2: a quarter less compile time than XLA's default, same speed), full "
                   "(XLA's default -O3), or auto (default: fast for runs of a few seconds of "
                   "work, optimized otherwise)")
    p.add_argument("--compile-workers", type=int, dest="compile_workers", metavar="N",
                   help="threads that compile the variants ahead of their turn (default: one "
                   "per CPU core, at most 8; 1: compile each variant just before it runs)")
    p.add_argument("--seeds", type=int, help="number of seeds (members per grid point)")
    p.add_argument("--seed", type=int, help="first seed; member i uses seed + i")
    p.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                   help="sweep a traced hyperparameter (repeatable; product of grids)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="set a static setting or a single hyperparameter value (repeatable)")
    p.add_argument("--out", help="run directory to write (default: runs/NAME-TIMESTAMP)")
    p.add_argument("--no-out", action="store_true", dest="no_out", help="write no run dir")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    p.add_argument("--resume", metavar="RUN_DIR",
                   help="continue an interrupted run (same command) from its last checkpoint; "
                   "the results are bit-identical to an uninterrupted run")
    p.add_argument("--checkpoint-every", type=float, dest="checkpoint_every", default=60.0,
                   metavar="SECONDS", help="checkpoint at the first chunk boundary after this "
                   "many seconds (default 60; 0: every chunk)")
    p.add_argument("--keep-checkpoints", type=int, dest="keep_checkpoints", default=3,
                   metavar="K", help="checkpoints kept (default 3)")
    p.add_argument("--chunk-blocks", type=int, dest="chunk_blocks", metavar="N",
                   help="evaluation blocks per compiled call (default: about 2,000 steps); "
                   "checkpoints and stop requests happen between calls")
    p.add_argument("--probe-per-class", type=int, dest="probe_per_class", default=200,
                   metavar="N", help="training samples per class for the final linear probe "
                   "(default 200; 0: no probe)")
    p.add_argument("--data-dir", dest="data_dir",
                   help="folder with the original IDX .gz files (default: $OCLJAX_DATA_DIR)")
    p.add_argument("--devices", type=int, help="local devices to spread members over")
    p.add_argument("--cpu-devices", type=int, dest="cpu_devices",
                   help="virtual CPU devices to create (default: one per member, up to 8 per "
                   "core; ignored when XLA_FLAGS already sets it)")
    p.add_argument("--distributed", action="store_true",
                   help="join a multi-process run (jax.distributed; also OCLJAX_DISTRIBUTED=1): "
                   "members are sharded over the devices of all processes")
    p.add_argument("--deterministic", action="store_true",
                   help="deterministic GPU kernels (XLA_FLAGS=--xla_gpu_deterministic_ops=true)"
                   "; CPU and TPU runs are deterministic anyway (README 'Determinism', "
                   "docs/robustness.md)")
    p.add_argument("--no-plots", action="store_true", dest="no_plots")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.set_defaults(**{k: v for k, v in preset.items() if k not in ("set", "grid")})
    return p


# Traced hyperparameters that must be positive / non-negative wherever a learner has them.
POSITIVE = ("lr", "temperature")
NON_NEGATIVE = ("lam", "alpha", "beta", "gamma", "epsilon", "step_size", "min_lr", "momentum",
                "mean_threshold", "var_threshold", "reg_weight")
# Probabilities and moving-average decays, in [0, 1].
UNIT_INTERVAL = ("plastic_rate", "plastic_decay", "stable_rate", "stable_decay")


def check_hparams(learner: str, hparams: dict) -> None:
    """``ConfigError`` for a traced hyperparameter outside its meaningful range (a negative
    learning rate runs gradient ascent without any error of its own)."""
    for key, value in hparams.items():
        if key in POSITIVE and not value > 0:
            raise ConfigError(f"{key} must be > 0 (learner {learner}), got {value:g}")
        if key in NON_NEGATIVE and not value >= 0:
            raise ConfigError(f"{key} must be >= 0 (learner {learner}), got {value:g}")
        if key in UNIT_INTERVAL and not 0 <= value <= 1:
            raise ConfigError(f"{key} must be in [0, 1] (learner {learner}), got {value:g}")


def parse_grid(entries: list[str]) -> dict[str, list[str]]:
    """``["lr=0.1,0.3"]`` -> ``{"lr": ["0.1", "0.3"]}``."""
    grid = {}
    for text in entries:
        key, values = parse_assignment(text, "--grid")
        grid[key] = [v.strip() for v in values.split(",") if v.strip()]
        if not grid[key]:
            raise ConfigError(f"--grid {key}: no values given")
    return grid


def plan(args, preset: dict):
    """Turn parsed arguments into ``(dataset, [Variant])``; ``ConfigError`` on bad settings."""
    from ocljax.run.experiment import ModelConfig, Variant

    specs = [s.strip() for s in (args.learner or "").split(",") if s.strip()]
    if not specs:
        raise ConfigError("no learner given (--learner NAME[,NAME...])")
    stream_base = {k: getattr(args, k) for k in STREAM_FIELDS if getattr(args, k, None) is not None}
    stream_base["kind"] = args.stream or STREAM_FIELDS["kind"]
    model_settings = model_fields()
    model_base = {"model": args.model} if args.model else {}
    if args.precision:
        model_base["precision"] = args.precision
    sets = [parse_assignment(t, "--set") for t in [*preset.get("set", []), *args.set]]
    grid_text = parse_grid([*preset.get("grid", []), *args.grid])
    if args.seeds is None or args.seeds < 1:
        raise ConfigError(f"--seeds must be >= 1, got {args.seeds}")
    if args.seed is None or args.seed < 0 or args.seed + args.seeds > 2**31:
        raise ConfigError(
            f"seeds must lie in [0, 2**31): got --seed {args.seed} with --seeds {args.seeds}"
        )
    seeds = [args.seed + i for i in range(args.seeds)]

    used = set()
    variants = []
    for spec in specs:
        name, _, kind = spec.partition("@")
        module = learners.get(name)
        cfg_fields = learners.config_fields(name)
        hp_fields = learners.hparam_fields(name)
        stream_kw, model_kw, cfg_kw, hp_kw = dict(stream_base), dict(model_base), {}, {}
        if kind == "iid":
            stream_kw["iid"] = True
        elif kind:
            stream_kw["kind"] = kind
        for key, text in sets:
            for target, fields in ((stream_kw, STREAM_FIELDS), (model_kw, model_settings),
                                   (cfg_kw, cfg_fields), (hp_kw, hp_fields)):
                if key in fields:
                    target[key] = parse_value(key, text, fields[key])
                    used.add(key)
                    break
        grid = {}
        for key, values in grid_text.items():
            if key in cfg_fields or key in STREAM_FIELDS:
                raise ConfigError(
                    f"{key} is a static setting (it changes shapes or control flow) and cannot "
                    f"be swept with --grid; run one experiment per value with --set {key}=..."
                )
            if key not in hp_fields:
                raise ConfigError(
                    f"--grid {key}: not a traced hyperparameter of learner {name!r} "
                    f"(it has: {', '.join(hp_fields)})"
                )
            grid[key] = [parse_value(key, v, hp_fields[key]) for v in values]
            used.add(key)
        stream_cfg = streams.StreamConfig(**stream_kw)
        stream_cfg.check()
        try:
            cfg = module.Config(**cfg_kw)
        except TypeError as err:
            raise ConfigError(f"bad settings for {name}: {err}") from None
        cfg, augment_note = learners.fit_augment_to_stream(name, cfg, stream_cfg.kind,
                                                           explicit="augment" in cfg_kw)
        cfg, fit_note = learners.fit_to_stream(name, cfg, stream_cfg, set(cfg_kw))
        for note in (augment_note, fit_note, learners.stream_note(name, cfg, stream_cfg)):
            if note:
                print(f"note: {note}", file=sys.stderr)
        base = {**hp_fields, **hp_kw}
        if "model" in model_kw:
            model_kw["name"] = model_kw.pop("model")
        variants.append(Variant(spec, name, stream_cfg, cfg, ModelConfig(**model_kw),
                                expand(grid, base, seeds)))
        if hasattr(module, "check_config"):
            module.check_config(cfg)
        for member in variants[-1].members:
            check_hparams(name, member.hparams)
    # A preset's settings are defaults for the learners that have them (``buffer_size`` means
    # nothing to LwF); only the user's own --set keys must be used by some variant.
    unknown = [k for k, _ in (parse_assignment(t, "--set") for t in args.set) if k not in used]
    if unknown:
        known = sorted({*STREAM_FIELDS, *model_settings,
                        *(k for s in specs for k in learners.config_fields(s.partition("@")[0])),
                        *(k for s in specs for k in learners.hparam_fields(s.partition("@")[0]))})

        def explain_unknown(key: str) -> str:
            """Another learner's setting says whose it is; a typo gets the nearest names."""
            owners = [n for n in sorted(learners.LEARNERS)
                      if key in learners.config_fields(n) or key in learners.hparam_fields(n)]
            if owners:
                return f"{key} (a setting of {', '.join(owners)}, not of the learners given)"
            return key + did_you_mean(key, known)

        raise ConfigError(f"unknown setting(s) {', '.join(map(explain_unknown, unknown))}; "
                          f"known: {', '.join(known)}")
    return args.dataset, variants


# Stream settings that also have a flag: a preset's ``--set`` of one becomes the flag's default,
# so the flag given on the command line wins over the preset (and a user's --set over both).
FLAG_SETTINGS = ("n_tasks", "batch_size", "passes", "task_free", "class_order", "eval_every",
                 "near_future", "eval_dense_every", "eval_dense_window")


def flag_defaults(preset: dict) -> dict:
    """``preset`` with its ``set`` entries for ``FLAG_SETTINGS`` moved to flag defaults."""
    keep, moved = [], {}
    for text in preset.get("set", []):
        key, value = parse_assignment(text, "--set")
        if key in FLAG_SETTINGS:
            moved[key] = parse_value(key, value, STREAM_FIELDS[key])
        else:
            keep.append(text)
    return {**preset, **moved, "set": keep}


class StopOnSignal:
    """Context manager: the first SIGINT / SIGTERM sets ``signum`` and makes the instance
    (a ``should_stop`` callable) return True, so the driver checkpoints and stops at the next
    chunk boundary; a second SIGINT interrupts at once. Previous handlers are restored on
    exit. Outside the main thread it does nothing."""

    def __init__(self):
        self.signum = 0
        self.previous = {}

    def __call__(self) -> bool:
        return self.signum != 0

    def handle(self, signum, frame):
        if self.signum and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        print(f"\nsignal {signum}: stopping at the next chunk boundary after a checkpoint "
              "(Ctrl-C again to abort at once)", file=sys.stderr, flush=True)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self.handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        return False


def main(argv: Sequence[str] | None = None, *, prog: str = "ocljax", description: str = "",
         preset: dict | None = None) -> int:
    """Run an experiment from command-line arguments; returns the process exit status."""
    preset = flag_defaults({"seeds": 1, "seed": 0, "learner": "er", "dataset": "digits",
                            **(preset or {})})
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(prog, description, preset).parse_args(argv)
    try:
        dataset, variants = plan(args, preset)
        most = max(len(v.members) for v in variants)
        request_cpu_devices(args.cpu_devices or min(most, 8 * (os.cpu_count() or 1)))
        if args.deterministic:
            request_deterministic()
        distributed.initialize(force=args.distributed)
        enable_compilation_cache()
        from ocljax.run.experiment import format_table, run_experiment

        stamp = time.strftime("%Y%m%d-%H%M%S")
        if args.resume and (args.no_out or (args.out and args.out != args.resume)):
            raise ConfigError("--resume RUN_DIR names the run directory; drop --out / --no-out")
        if args.resume and args.overwrite:
            raise ConfigError("--resume continues a run and --overwrite starts it over: "
                              "choose one")
        if args.devices is not None and args.devices < 1:
            raise ConfigError(f"--devices must be >= 1, got {args.devices}")
        if args.chunk_blocks is not None and args.chunk_blocks < 1:
            raise ConfigError(f"--chunk-blocks must be >= 1, got {args.chunk_blocks}")
        if args.keep_checkpoints < 1 or args.checkpoint_every < 0 or args.probe_per_class < 0:
            raise ConfigError("--keep-checkpoints must be >= 1, --checkpoint-every and "
                              "--probe-per-class >= 0")
        out = None if args.no_out else (
            args.resume or args.out or os.path.join("runs", f"{prog.split('.')[-1]}-{stamp}")
        )
        with StopOnSignal() as stop:
            summary, path = run_experiment(
                prog, dataset, variants, out=out, overwrite=args.overwrite,
                data_dir=args.data_dir, n_devices=args.devices, quiet=args.quiet,
                plot=not args.no_plots, command=[prog, *argv], resume=bool(args.resume),
                checkpoint_every=args.checkpoint_every, keep_checkpoints=args.keep_checkpoints,
                probe_per_class=args.probe_per_class, should_stop=stop,
                blocks_per_chunk=args.chunk_blocks, compile_mode=args.compile_mode,
                compile_workers=args.compile_workers,
            )
    except OCLError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    except Interrupted as err:
        saved = ("; the finished variants and a checkpoint of the one running were saved"
                 if out else " (--no-out: nothing was saved)")
        print(f"{prog}: interrupted by signal {err.signum}{saved}", file=sys.stderr)
        return 128 + err.signum
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    print(format_table(summary["groups"]))
    if path is not None:
        print(f"\nrun directory: {path}")
    return 0


def entry_point() -> None:
    """The ``ocljax`` console script."""
    sys.exit(main())


if __name__ == "__main__":
    entry_point()
