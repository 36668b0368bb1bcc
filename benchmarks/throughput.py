"""Throughput of online ER through the real ocljax driver, against a hand-written PyTorch loop.

    python -m benchmarks.throughput [--quick] [--seeds 1,2,4,8] [--json PATH]

Workload: a split-MNIST-shaped stream (60,000 synthetic 28x28 uint8 samples, 10 classes,
5 tasks), MLP 784-256-256-10, batch 10 + 10 replayed, reservoir buffer 1,000, SGD lr 0.1, one
pass, task-free, continual evaluation on (every 100 steps on 500 test samples per task, full
10,000-sample test set at task ends). The PyTorch loop trains one seed on the same sample
order with the same evaluations (the same 2,500 test rows every 100 steps, the whole test set
at task ends), so every ratio compares equal work; it is also timed with task-end evaluation
only, which prices its continual evaluation. Prints seed-samples/s, the ratio to the PyTorch
loop, compile time separately, and the fraction of a GEMM peak measured in the same run;
writes JSON with a top-level ``speedup_vs_torch_eager`` (single seed).

Model FLOPs per sample: forward 2*MACs + backward 2*MACs (weights) + 2*MACs of every layer
but the first (input gradients) = 1.21 MFLOP, i.e. 145 GFLOP per seed-pass of 60,000
samples x 2 (stream + replay); evaluation FLOPs are not counted.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

from ocljax.sweep import devices_for, request_cpu_devices

HIDDEN = (256, 256)


def train_flops_per_sample(dim: int, hidden=HIDDEN, classes: int = 10) -> int:
    """FLOPs of one training sample through the MLP (see the module docstring)."""
    widths = [dim, *hidden, classes]
    macs = [a * b for a, b in zip(widths[:-1], widths[1:], strict=True)]
    return 2 * sum(macs) + 2 * sum(macs) + 2 * sum(macs[1:])


def gemm_peak_flops(n: int = 2048, repeats: int = 10, dtype: str = "float32") -> float:
    """Best matmul FLOP/s of one device (n x n by n x n of ``dtype``, jitted, under the
    ambient ``jax.default_matmul_precision``)."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.dtype(dtype))
    f = jax.jit(lambda a: a @ a)
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def workload(quick: bool):
    """The benchmark's dataset, stream config and learner."""
    from ocljax import data, learners, models, streams

    per_class = 1200 if quick else 6000
    ds = data.synthetic.load(num_classes=10, train_per_class=per_class, test_per_class=1000,
                             shape=(28, 28, 1), noise=60.0)
    cfg = streams.StreamConfig(kind="split", n_tasks=5, batch_size=10, task_free=True,
                               eval_every=100, eval_per_task=500)
    model = models.make_model("mlp", 10, width=HIDDEN[0], depth=len(HIDDEN))
    learner = learners.er.make(model, learners.er.Config(buffer_size=1000, replay_batch=10))
    return ds, cfg, learner


def short_workload(quick: bool):
    """The dataset, stream config and model of the per-learner benchmarks
    (``benchmarks.agem_projection``, ``benchmarks.gss_scoring``): the synthetic split-MNIST-shaped
    stream cut to 6,000 samples (2,000 with ``quick``), batch 10, task-end evaluation on 100 test
    rows per task, and the benchmark's MLP."""
    from ocljax import data, models, streams

    ds = data.synthetic.load(num_classes=10, train_per_class=200 if quick else 600,
                             test_per_class=100, shape=(28, 28, 1), noise=60.0)
    cfg = streams.StreamConfig(kind="split", n_tasks=5, batch_size=10, task_free=True,
                               eval_every=0, eval_per_task=100)
    model = models.make_model("mlp", 10, width=HIDDEN[0], depth=len(HIDDEN))
    return ds, cfg, model


def one_seed(learner, ds, cfg, hp) -> dict:
    """Run ``learner`` on seed 0 of ``cfg``'s stream over ``ds``, optimised, on one device:
    compile and run time, time per step and final average accuracy."""
    import numpy as np

    from ocljax import streams
    from ocljax.run import driver

    stream = streams.build(cfg, ds, [0])
    res = driver.run(learner, stream, ds, [hp], [0], n_devices=1, compile_mode="optimized")
    steps = len(ds.train_y) // cfg.batch_size
    return {"compile_s": res.compile_s, "run_s": res.run_s,
            "ms_per_step": 1e3 * res.run_s / steps,
            "final_average_accuracy": float(np.asarray(res.accuracy_matrix())[:, -1].mean())}


def measure(S: int, quick: bool, one_device: bool = False) -> dict:
    """Run S seeds through the driver in this process, on the devices the CLI would use (or,
    with ``one_device``, all vmapped on a single device: the comparison for that default)."""
    import jax

    from ocljax import learners, streams
    from ocljax.run import driver

    ds, cfg, learner = workload(quick)
    seeds = list(range(S))
    stream = streams.build(cfg, ds, seeds)
    n_dev = 1 if one_device else devices_for(S, len(jax.local_devices()))
    hps = [learners.er.HParams(lr=0.1)] * S
    res = driver.run(learner, stream, ds, hps, seeds, n_devices=n_dev, compile_mode="optimized")
    return {
        "seeds": S, "devices": n_dev, "compile_s": res.compile_s, "run_s": res.run_s,
        "seed_samples_per_s": S * len(ds.train_y) / res.run_s,
        "final_average_accuracy": float(res.accuracy_matrix()[:, -1].mean()),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="12,000 samples, seeds 1 and 4")
    p.add_argument("--seeds", help="comma-separated seed counts (default 1,2,4,8; quick 1,4)")
    p.add_argument("--json", default="bench_results/throughput.json")
    p.add_argument("--no-torch", action="store_true")
    p.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    p.add_argument("--one-device", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        # One seed count per process, with the virtual CPU devices the CLI would create for it.
        request_cpu_devices(args.worker)
        print(json.dumps(measure(args.worker, args.quick, args.one_device)))
        return 0
    counts = [int(s) for s in (args.seeds or ("1,4" if args.quick else "1,2,4,8")).split(",")]

    import jax
    import numpy as np

    from benchmarks import write_json
    from ocljax import streams

    ds, cfg, _ = workload(args.quick)
    n_samples = len(ds.train_y)
    flops_sample = train_flops_per_sample(784)
    peak = gemm_peak_flops()
    backend = jax.default_backend()
    device = jax.devices()[0].device_kind
    print(f"backend {backend} ({device}); GEMM peak {peak / 1e9:.1f} GFLOP/s (float32, "
          "one device, all host threads)")

    torch_info = None
    if not args.no_torch:
        try:
            import torch

            from benchmarks import torch_er

            st = streams.build(cfg, ds, [0])
            ends = set(np.cumsum(st.task_batches).tolist())
            args_ = (ds.train_x, ds.train_y, ds.test_x, ds.test_y, st.orders[0], ends)
            # the baseline: the loop with ocljax's continual evaluation (equal work)
            torch_info = torch_er.run(*args_, eval_every=cfg.eval_every,
                                      eval_idx=st.eval_continual)
            task_end = torch_er.run(*args_)
            torch_info["samples_per_s"] = torch_info["samples"] / torch_info["seconds"]
            torch_info["threads"] = torch.get_num_threads()
            torch_info["version"] = torch.__version__
            torch_info["task_end_only_seconds"] = task_end["seconds"]
            print(f"pytorch loop: {torch_info['seconds']:.2f} s per pass, "
                  f"{torch_info['samples_per_s']:.0f} samples/s, "
                  f"final accuracy {torch_info['final_test_accuracy']:.3f} "
                  f"({torch_info['continual_evaluations']} continual evaluations; "
                  f"{task_end['seconds']:.2f} s with task-end evaluation only)")
        except ImportError:
            print("pytorch is not installed: the baseline is skipped (pip install 'ocljax[bench]')")

    rows = []
    # The largest sweep once more, vmapped on one device: what spreading over devices buys.
    runs = [(S, False) for S in counts] + ([(max(counts), True)] if max(counts) > 1 else [])
    for S, one_device in runs:
        cmd = [sys.executable, "-m", "benchmarks.throughput", "--worker", str(S)]
        cmd += ["--quick"] if args.quick else []
        cmd += ["--one-device"] if one_device else []
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            print(proc.stderr[-2000:], file=sys.stderr)
            return 1
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        row["vmap_on_one_device"] = one_device
        rate = row["seed_samples_per_s"]
        row["fraction_of_gemm_peak"] = rate * flops_sample * 2 / peak
        if torch_info:
            row["ratio_vs_torch"] = rate / torch_info["samples_per_s"]
        rows.append(row)
        ratio = f"  {row['ratio_vs_torch']:6.2f}x torch" if torch_info else ""
        how = "vmap, 1 device " if one_device else f"on {row['devices']} device(s)"
        print(f"S={S:5d} {how}: {rate:12.0f} seed-samples/s{ratio}  "
              f"compile {row['compile_s']:5.1f} s  run {row['run_s']:6.2f} s  "
              f"{100 * row['fraction_of_gemm_peak']:5.1f}% of GEMM peak  "
              f"acc {row['final_average_accuracy']:.3f}", flush=True)

    single = next((r for r in rows if r["seeds"] == 1 and not r["vmap_on_one_device"]), None)
    out = {
        "benchmark": "throughput", "quick": args.quick, "samples_per_pass": n_samples,
        "workload": "online ER, MLP 784-256-256-10, batch 10 + 10 replay, buffer 1000, 1 pass",
        "backend": backend, "device": device, "host": platform.node(),
        "cpu_count": os.cpu_count(), "gemm_peak_flops": peak,
        "train_flops_per_sample": 2 * flops_sample, "torch": torch_info, "results": rows,
        "speedup_vs_torch_eager": single.get("ratio_vs_torch") if single else None,
    }
    write_json(args.json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
