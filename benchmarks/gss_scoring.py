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

import argparse
import sys
from unittest import mock


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="benchmarks.gss_scoring", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="2,000 samples")
    p.add_argument("--json", default="bench_results/gss_scoring.json")
    args = p.parse_args(argv)

    import contextlib

    import jax
    import numpy as np

    from benchmarks import write_json
    from benchmarks.throughput import HIDDEN
    from ocljax import data, models, streams
    from ocljax.learners import gss
    from ocljax.run import driver

    per_class = 200 if args.quick else 600
    ds = data.synthetic.load(num_classes=10, train_per_class=per_class, test_per_class=100,
                             shape=(28, 28, 1), noise=60.0)
    cfg = streams.StreamConfig(kind="split", n_tasks=5, batch_size=10, task_free=True,
                               eval_every=0, eval_per_task=100)
    model = models.make_model("mlp", 10, width=HIDDEN[0], depth=len(HIDDEN))
    steps = len(ds.train_y) // cfg.batch_size
    rows = []
    for path in ("dense_gram", "per_sample") * 2:
        patch = (mock.patch.object(gss, "dense_gram", lambda *a: None) if path == "per_sample"
                 else contextlib.nullcontext())
        with patch:  # traced inside driver.run
            learner = gss.make(model, gss.Config())
            stream = streams.build(cfg, ds, [0])
            res = driver.run(learner, stream, ds, [gss.HParams(lr=0.1)], [0], n_devices=1,
                             compile_mode="optimized")
        acc = np.asarray(res.accuracy_matrix())
        rows.append({"path": path, "compile_s": res.compile_s, "run_s": res.run_s,
                     "ms_per_step": 1e3 * res.run_s / steps,
                     "final_average_accuracy": float(acc[:, -1].mean())})
        print(f"{path:10s}  compile {res.compile_s:5.1f} s  {rows[-1]['ms_per_step']:6.2f} ms/step"
              f"  final acc {rows[-1]['final_average_accuracy']:.4f}", flush=True)

    def best(path):
        return min(r["ms_per_step"] for r in rows if r["path"] == path)

    ratio = best("per_sample") / best("dense_gram")
    print(f"per-sample / dense-Gram time per step (fastest runs): {ratio:.2f}x")
    out = {"benchmark": "gss_scoring", "quick": args.quick, "backend": jax.default_backend(),
           "samples": len(ds.train_y), "steps": steps, "rows": rows,
           "per_sample_over_dense_gram_time_per_step": ratio}
    write_json(args.json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
