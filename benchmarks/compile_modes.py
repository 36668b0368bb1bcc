"""Compile time and run time of one ER run under each CPU compile effort, measured in the
same process: ``full`` (XLA's defaults, LLVM -O3), ``optimized`` (LLVM -O2, what ``auto``
gives long runs) and ``fast`` (LLVM -O0 and elemental emitters, what ``auto`` gives short
runs).

    python -m benchmarks.compile_modes [--quick] [--models mlp,cnn,resnet18] [--json PATH]

Workloads (one seed, task-end evaluation, persistent compilation cache off):

- ``mlp``: the 60,000-sample synthetic split-MNIST-shaped stream of ``benchmarks.throughput``
  (12,000 with ``--quick``), MLP 784-256-256-10;
- ``cnn`` / ``resnet18``: the image rows of ``benchmarks.suite`` (synthetic 32x32x3, 2,000 and
  400 samples; a fifth with ``--quick``), the small CNN and the reduced ResNet-18.

Each effort runs twice per model, alternating, so that a shared host's drift hits all three.
Prints, per model, the best-of-two compile and run time of each effort and the ratios
optimized/full and fast/optimized, and each effort's final accuracy; writes JSON. Off a
CPU every effort compiles with XLA's defaults.
"""

from __future__ import annotations

import sys

EFFORTS = ("full", "optimized", "fast")
MODELS = ("mlp", "cnn", "resnet18")


def job(model: str, quick: bool) -> dict:
    """The ``benchmarks.suite`` driver job of ``model``'s workload (one seed)."""
    from benchmarks import suite

    if model == "mlp":
        return {"kind": "driver", "model": "mlp", "samples": 12_000 if quick else 60_000,
                "members": 1, "test_per_class": 1000, "eval_every": 0}
    n = {name: n_cpu for name, n_cpu, *_ in suite.IMAGE_ROWS}[model] // (5 if quick else 1)
    return {"kind": "driver", "model": model, "samples": n, "members": 1, **suite.IMAGE_JOB}


def main(argv=None) -> int:
    from benchmarks import quick_parser

    p = quick_parser("benchmarks.compile_modes", __doc__, "a fifth of each stream")
    p.add_argument("--models", default=",".join(MODELS),
                   help=f"comma-separated, from {', '.join(MODELS)}")
    args = p.parse_args(argv)
    models = [m for m in args.models.split(",") if m]
    unknown = sorted(set(models) - set(MODELS))
    if unknown or not models:
        p.error(f"unknown model(s) {', '.join(unknown) or '(none)'}; choose from "
                f"{', '.join(MODELS)}")

    import jax

    from benchmarks import suite, write_json
    from ocljax.sweep import enable_compilation_cache

    enable_compilation_cache("")  # measure compilation, not the cache
    rows, ratios = [], {}
    for model in models:
        for effort in EFFORTS * 2:
            r = suite.run_driver({**job(model, args.quick), "compile_mode": effort})
            rows.append({"model": model, "mode": effort, "compile_s": r["compile_s"],
                         "run_s": r["run_s"], "samples_per_s": r["seed_samples_per_s"],
                         "final_average_accuracy": r["final_average_accuracy"]})
            print(f"{model:8s} {effort:9s} compile {r['compile_s']:6.2f} s  run "
                  f"{r['run_s']:7.2f} s  {r['seed_samples_per_s']:9.0f} samples/s", flush=True)

        def best(effort, key, model=model):
            return min(r[key] for r in rows if r["mode"] == effort and r["model"] == model)

        accs = {e: sorted({r["final_average_accuracy"] for r in rows
                           if r["model"] == model and r["mode"] == e}) for e in EFFORTS}
        ratios[model] = {
            "compile_optimized_over_full": best("optimized", "compile_s") / best("full",
                                                                                  "compile_s"),
            "run_optimized_over_full": best("optimized", "run_s") / best("full", "run_s"),
            "compile_fast_over_optimized": best("fast", "compile_s") / best("optimized",
                                                                             "compile_s"),
            "run_fast_over_optimized": best("fast", "run_s") / best("optimized", "run_s"),
            "final_accuracy": accs,  # per effort (one value: its two runs agree)
        }
        q = ratios[model]
        print(f"{model}: optimized / full (best of 2): compile "
              f"{q['compile_optimized_over_full']:.2f}x, run {q['run_optimized_over_full']:.2f}x;"
              f" fast / optimized: compile {q['compile_fast_over_optimized']:.2f}x, run "
              f"{q['run_fast_over_optimized']:.2f}x; final accuracy full / optimized / fast: "
              + " / ".join(",".join(f"{a:.4f}" for a in accs[e]) for e in EFFORTS), flush=True)
    out = {"benchmark": "compile_modes", "quick": args.quick, "backend": jax.default_backend(),
           "rows": rows, "ratios": ratios}
    write_json(args.json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
