"""Can one seed use two CPU cores? One MLP training step split over two virtual CPU devices
(tensor parallelism) against the same step on one device, measured in the same process.

    python -m benchmarks.one_seed_split [--quick] [--json PATH]

Workload: the ER step's arithmetic without its buffer (20 rows, MLP 784-256-256-10, softmax
cross-entropy, SGD lr 0.1), a ``lax.scan`` of 3,000 steps (600 with ``--quick``) over random
data, three alternating rounds, best of each. Three programs:

- ``one device``: the whole step on device 0, with XLA's default thread pool;
- ``split``: the same step over two devices, Megatron-style (Shoeybi et al. 2019, Sec. 3): the
  first layer's kernel split by output columns, the second's by input rows, the rest
  replicated. Each device does half of the two large layers' work, and the step needs one
  all-reduce (the second layer's partial outputs, 20 x 256 floats); XLA's SPMD partitioner
  inserts it, and the benchmark counts the collectives in the compiled program;
- ``half width``: one device running a network whose first hidden layer has 128 units, i.e.
  one device's share of ``split``. ``split`` cannot be faster than this; the difference is
  what the collective and the two devices' synchronisation cost per step.

Prints ms per step, the ratio split / one device, and the per-step cost of the collective, and
writes JSON. The driver does not split members (``docs/performance.md``, "One seed"): this is
the measurement behind that choice on a 2-core host.
"""

from __future__ import annotations

import os
import sys
import time

ROWS, LR = 20, 0.1


def _mlp_loss(params, x, y):
    import jax
    import jax.numpy as jnp

    h = x
    for i, layer in enumerate(params):
        h = h @ layer["w"] + layer["b"]
        if i < len(params) - 1:
            h = jax.nn.relu(h)
    logp = jax.nn.log_softmax(h)
    return -jnp.mean(jnp.take_along_axis(logp, y[:, None], 1))


def _init(widths, seed=0):
    import numpy as np

    rng = np.random.default_rng(seed)
    return [{"w": (rng.standard_normal((a, b)) / np.sqrt(a)).astype(np.float32),
             "b": np.zeros(b, np.float32)} for a, b in zip(widths[:-1], widths[1:], strict=True)]


def _train(params, xs, ys, steps: int):
    """``steps`` SGD steps of ``ROWS`` rows each, as one ``lax.scan``."""
    import jax

    def body(p, i):
        x = jax.lax.dynamic_slice_in_dim(xs, i * ROWS, ROWS)
        y = jax.lax.dynamic_slice_in_dim(ys, i * ROWS, ROWS)
        g = jax.grad(_mlp_loss)(p, x, y)
        return jax.tree.map(lambda a, b: a - LR * b, p, g), None

    return jax.lax.scan(body, params, jax.numpy.arange(steps))[0]


def main(argv=None) -> int:
    from benchmarks import quick_args, write_json

    args = quick_args("benchmarks.one_seed_split", __doc__, argv, "600 steps")
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:  # before jax is imported
        os.environ["XLA_FLAGS"] = (flags + " --xla_force_host_platform_device_count=2").strip()

    import jax
    import numpy as np
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    if len(jax.devices()) < 2:
        sys.exit("benchmarks.one_seed_split needs two devices (it sets two virtual CPU devices "
                 "itself unless XLA_FLAGS already sets a count)")
    steps = 600 if args.quick else 3000
    rng = np.random.default_rng(1)
    xs = rng.random((steps * ROWS, 784), dtype=np.float32)
    ys = rng.integers(0, 10, steps * ROWS).astype(np.int32)
    d0 = jax.devices()[0]
    mesh = Mesh(np.array(jax.devices()[:2]), ("model",))
    rep = NamedSharding(mesh, P())
    cols, rows = NamedSharding(mesh, P(None, "model")), NamedSharding(mesh, P("model", None))
    split_spec = [{"w": cols, "b": NamedSharding(mesh, P("model"))},
                  {"w": rows, "b": rep},
                  {"w": rep, "b": rep}]

    def one_device(widths):
        fn = jax.jit(_train, static_argnums=3)
        put = lambda t: jax.device_put(t, d0)  # noqa: E731
        return fn, (put(_init(widths)), put(xs), put(ys))

    programs = {
        "one device": one_device((784, 256, 256, 10)),
        "split": (jax.jit(_train, static_argnums=3, in_shardings=(split_spec, rep, rep),
                          out_shardings=split_spec),
                  (jax.device_put(_init((784, 256, 256, 10)), split_spec),
                   jax.device_put(xs, rep), jax.device_put(ys, rep))),
        "half width": one_device((784, 128, 256, 10)),
    }
    compiled, times = {}, {name: [] for name in programs}
    for name, (fn, a) in programs.items():
        t0 = time.perf_counter()
        compiled[name] = fn.lower(*a, steps).compile()
        print(f"{name:10s} compiled in {time.perf_counter() - t0:.1f} s", flush=True)
    collectives = sum(compiled["split"].as_text().count(op)
                      for op in ("all-reduce-start(", "all-reduce(", "all-gather(",
                                 "reduce-scatter(", "collective-permute("))
    finals = {}
    for _ in range(3):
        for name, (_, a) in programs.items():
            jax.block_until_ready(compiled[name](*a))  # warm
            t0 = time.perf_counter()
            finals[name] = jax.block_until_ready(compiled[name](*a))
            times[name].append((time.perf_counter() - t0) / steps * 1e3)
    best = {name: min(ts) for name, ts in times.items()}
    # the split computes the same function: equal to one device up to float32 rounding
    def max_diff(a, b):
        return max(float(np.abs(np.asarray(u) - np.asarray(v)).max())
                   for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))

    diff = max_diff(finals["split"], finals["one device"])
    # and after one step, before chaos amplifies rounding: the same function
    one = {name: jax.jit(fn, static_argnums=3)(*a, 1) for name, (fn, a) in programs.items()
           if name != "half width"}
    diff1 = max_diff(one["split"], one["one device"])
    for name, ts in times.items():
        print(f"{name:10s} {best[name]:.3f} ms/step (runs: "
              + ", ".join(f"{t:.3f}" for t in ts) + ")")
    ratio = best["one device"] / best["split"]
    overhead = best["split"] - best["half width"]
    print(f"split: {ratio:.2f}x the one-device step; {collectives} collective(s) per step, "
          f"costing about {overhead * 1e3:.0f} us (split minus half width)")
    print(f"largest weight difference, split vs one device: {diff1:.1e} after one step, "
          f"{diff:.1e} after {steps} (float32 rounding, grown over the steps)")
    write_json(args.json, {
        "benchmark": "one_seed_split", "steps": steps, "rows_per_step": ROWS,
        "devices": [str(d) for d in jax.devices()[:2]], "cpu_count": os.cpu_count(),
        "ms_per_step": times, "best_ms_per_step": best,
        "one_device_over_split": ratio, "collectives_in_split_program": collectives,
        "collective_overhead_ms": overhead, "max_weight_difference": diff,
        "max_weight_difference_one_step": diff1,
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
