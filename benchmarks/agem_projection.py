"""A-GEM's projection leaf by leaf (``ocljax.tree_math.vdot``, the library's) against the same
rule on raveled gradients (``jax.flatten_util.ravel_pytree``, what ocljax did before the ninth
round), measured in the same process.

    python -m benchmarks.agem_projection [--quick] [--json PATH]

Workload: one seed of task-free A-GEM (reservoir memory of 1,000 rows, SGD lr 0.1, MLP
784-256-256-10) on the synthetic split-MNIST-shaped stream of ``benchmarks.throughput``, cut to
6,000 samples (2,000 with ``--quick``), batch 10, task-end evaluation, reference batches of 128
and 256 rows. Each (reference batch, projection) pair runs twice, alternating. Prints the time
per step and the raveled/leafwise ratios of the fastest and of the slowest runs (the raveled
form's time varied across compilations of the same program), the final accuracies (equal up to
float32 rounding, which can move a short run by a few test rows), and writes JSON.

On XLA:CPU the raveled form's ``concatenate`` fused with the bias gradients into a loop fusion
that took most of each scanned step at 256 rows (``docs/performance.md``, ninth round).
"""

from __future__ import annotations

import argparse
import sys
from unittest import mock


def project_raveled(g, g_ref, active=True):
    """A-GEM's rule (Chaudhry et al. 2019, Eq. 11) on gradients raveled into one vector: the
    baseline this benchmark measures the library's leafwise ``agem.project`` against."""
    import jax.numpy as jnp
    from jax.flatten_util import ravel_pytree

    gf, unravel = ravel_pytree(g)
    rf, _ = ravel_pytree(g_ref)
    dot, rr = gf @ rf, rf @ rf
    conflict = active & (dot < 0)
    coef = jnp.where(conflict, dot / jnp.where(conflict, rr, 1.0), 0.0)
    return unravel(gf - coef * rf)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="benchmarks.agem_projection", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="2,000 samples")
    p.add_argument("--json", default="bench_results/agem_projection.json")
    args = p.parse_args(argv)


    import jax
    import numpy as np

    from benchmarks import write_json
    from benchmarks.throughput import HIDDEN
    from ocljax import data, learners, models, streams
    from ocljax.learners import agem
    from ocljax.run import driver

    per_class = 200 if args.quick else 600
    ds = data.synthetic.load(num_classes=10, train_per_class=per_class, test_per_class=100,
                             shape=(28, 28, 1), noise=60.0)
    cfg = streams.StreamConfig(kind="split", n_tasks=5, batch_size=10, task_free=True,
                               eval_every=0, eval_per_task=100)
    model = models.make_model("mlp", 10, width=HIDDEN[0], depth=len(HIDDEN))
    steps = len(ds.train_y) // cfg.batch_size
    rows = []
    for mem_batch in (128, 256):
        learner_cfg = agem.Config(buffer_size=1000, mem_batch=mem_batch)
        for projection in ("leafwise", "raveled") * 2:
            fn = agem.project if projection == "leafwise" else project_raveled
            with mock.patch.object(agem, "project", fn):  # traced inside driver.run
                learner = learners.agem.make(model, learner_cfg)
                stream = streams.build(cfg, ds, [0])
                res = driver.run(learner, stream, ds, [agem.HParams(lr=0.1)], [0],
                                 n_devices=1, compile_mode="optimized")
            acc = np.asarray(res.accuracy_matrix())
            rows.append({"mem_batch": mem_batch, "projection": projection,
                         "compile_s": res.compile_s, "run_s": res.run_s,
                         "ms_per_step": 1e3 * res.run_s / steps,
                         "final_average_accuracy": float(acc[:, -1].mean())})
            print(f"mem_batch {mem_batch:3d}  {projection:8s}  compile {res.compile_s:5.1f} s  "
                  f"{rows[-1]['ms_per_step']:6.2f} ms/step  final acc "
                  f"{rows[-1]['final_average_accuracy']:.4f}", flush=True)

    ratios = {}
    for mem_batch in (128, 256):
        def times(projection, mb=mem_batch):
            return [r["ms_per_step"] for r in rows
                    if r["mem_batch"] == mb and r["projection"] == projection]

        rav, leaf = times("raveled"), times("leafwise")
        ratios[str(mem_batch)] = {"fastest": min(rav) / min(leaf), "slowest": max(rav) / max(leaf)}
        accs = {r["projection"]: r["final_average_accuracy"] for r in rows
                if r["mem_batch"] == mem_batch}
        print(f"mem_batch {mem_batch}: raveled / leafwise time per step "
              f"{ratios[str(mem_batch)]['fastest']:.2f}x (fastest runs), "
              f"{ratios[str(mem_batch)]['slowest']:.2f}x (slowest runs); final accuracy "
              f"{accs['leafwise']:.4f} leafwise, {accs['raveled']:.4f} raveled")
    out = {"benchmark": "agem_projection", "quick": args.quick,
           "backend": jax.default_backend(), "samples": len(ds.train_y), "steps": steps,
           "rows": rows, "raveled_over_leafwise_time_per_step": ratios}
    write_json(args.json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
