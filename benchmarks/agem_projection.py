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
    from benchmarks import quick_args, write_json

    args = quick_args("benchmarks.agem_projection", __doc__, argv, "2,000 samples")

    import jax

    from benchmarks.throughput import one_seed, short_workload
    from ocljax.learners import agem

    ds, cfg, model = short_workload(args.quick)
    rows = []
    for mem_batch in (128, 256):
        learner_cfg = agem.Config(buffer_size=1000, mem_batch=mem_batch)
        for projection in ("leafwise", "raveled") * 2:
            fn = agem.project if projection == "leafwise" else project_raveled
            with mock.patch.object(agem, "project", fn):  # traced inside driver.run
                row = one_seed(agem.make(model, learner_cfg), ds, cfg, agem.HParams(lr=0.1))
            rows.append({"mem_batch": mem_batch, "projection": projection, **row})
            print(f"mem_batch {mem_batch:3d}  {projection:8s}  compile {row['compile_s']:5.1f} s  "
                  f"{row['ms_per_step']:6.2f} ms/step  final acc "
                  f"{row['final_average_accuracy']:.4f}", flush=True)

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
           "backend": jax.default_backend(), "samples": len(ds.train_y),
           "steps": len(ds.train_y) // cfg.batch_size,
           "rows": rows, "raveled_over_leafwise_time_per_step": ratios}
    write_json(args.json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
