"""Compile time and run time of one ER run compiled fast (``--compile fast``, LLVM
optimisation off) against fully optimised, measured in the same process.

    python -m benchmarks.compile_modes [--quick] [--json PATH]

Workload: one seed of online ER on the 60,000-sample synthetic split-MNIST-shaped stream of
``benchmarks.throughput`` (12,000 with ``--quick``), task-end evaluation, persistent
compilation cache off. Each mode runs twice, alternating; prints the fast/optimised ratios
of compile and run time and writes JSON. On accelerators both modes compile alike.
"""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="benchmarks.compile_modes", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--json", default="bench_results/compile_modes.json")
    args = p.parse_args(argv)

    import dataclasses

    import jax

    from benchmarks import write_json
    from benchmarks.throughput import workload
    from ocljax import learners, streams
    from ocljax.run import driver
    from ocljax.sweep import enable_compilation_cache

    enable_compilation_cache("")  # measure compilation, not the cache
    ds, cfg, learner = workload(args.quick)
    cfg = dataclasses.replace(cfg, eval_every=0)  # task-end evaluation only
    rows = []
    for mode in ("optimized", "fast") * 2:
        stream = streams.build(cfg, ds, [0])
        res = driver.run(learner, stream, ds, [learners.er.HParams(lr=0.1)], [0], n_devices=1,
                         compile_mode=mode)
        rows.append({"mode": mode, "compile_s": res.compile_s, "run_s": res.run_s,
                     "samples_per_s": len(ds.train_y) / res.run_s,
                     "final_average_accuracy": float(res.accuracy_matrix()[:, -1].mean())})
        print(f"{mode:9s} compile {res.compile_s:5.1f} s  run {res.run_s:6.2f} s  "
              f"{rows[-1]['samples_per_s']:9.0f} samples/s", flush=True)

    def best(mode, key):
        return min(r[key] for r in rows if r["mode"] == mode)

    ratios = {"compile_fast_over_optimized": best("fast", "compile_s") /
              best("optimized", "compile_s"),
              "run_fast_over_optimized": best("fast", "run_s") / best("optimized", "run_s")}
    print(f"fast / optimized (best of 2): compile {ratios['compile_fast_over_optimized']:.2f}x, "
          f"run {ratios['run_fast_over_optimized']:.2f}x")
    out = {"benchmark": "compile_modes", "quick": args.quick, "backend": jax.default_backend(),
           "samples": len(ds.train_y), "rows": rows, **ratios}
    write_json(args.json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
