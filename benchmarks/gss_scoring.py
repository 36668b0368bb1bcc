"""GSS's gradient inner products from Dense layers' inputs and output gradients
(``gss.dense_gram``, the library's path for MLPs) against materialised per-sample gradients
(``gss.per_sample_grads``, its path for other models), measured in the same process.

    python -m benchmarks.gss_scoring [--quick] [--json PATH]

Workload: one seed of GSS-Greedy (memory of 1,000 rows, 10 candidates, 10 replayed rows, SGD lr
0.1, MLP 784-256-256-10) on the synthetic split-MNIST-shaped stream of
``benchmarks.throughput``, cut to 6,000 samples (2,000 with ``--quick``), batch 10, task-end
evaluation. Each path runs twice, alternating. Prints the time per step, the
materialised/Dense-Gram ratio (fastest runs), the final accuracies (equal up to float32
rounding), and writes JSON.
"""

from __future__ import annotations

import sys
from unittest import mock


def main(argv=None) -> int:
    from benchmarks import quick_args, write_json

    args = quick_args("benchmarks.gss_scoring", __doc__, argv, "2,000 samples")

    import contextlib

    import jax

    from benchmarks.throughput import one_seed, short_workload
    from ocljax.learners import gss

    ds, cfg, model = short_workload(args.quick)
    rows = []
    for path in ("dense_gram", "per_sample") * 2:
        patch = (mock.patch.object(gss, "dense_gram", lambda *a: None) if path == "per_sample"
                 else contextlib.nullcontext())
        with patch:  # traced inside driver.run
            row = one_seed(gss.make(model, gss.Config()), ds, cfg, gss.HParams(lr=0.1))
        rows.append({"path": path, **row})
        print(f"{path:10s}  compile {row['compile_s']:5.1f} s  {row['ms_per_step']:6.2f} ms/step"
              f"  final acc {row['final_average_accuracy']:.4f}", flush=True)

    def best(path):
        return min(r["ms_per_step"] for r in rows if r["path"] == path)

    ratio = best("per_sample") / best("dense_gram")
    print(f"per-sample / dense-Gram time per step (fastest runs): {ratio:.2f}x")
    out = {"benchmark": "gss_scoring", "quick": args.quick, "backend": jax.default_backend(),
           "samples": len(ds.train_y),
           "steps": len(ds.train_y) // cfg.batch_size, "rows": rows,
           "per_sample_over_dense_gram_time_per_step": ratio}
    write_json(args.json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
