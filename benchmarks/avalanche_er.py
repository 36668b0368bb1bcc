"""Online ER in Avalanche, in a hand-written PyTorch loop and in ocljax, on one stream.

    python -m benchmarks.avalanche_er [--quick] [--json PATH]

Needs ``avalanche-lib`` beside ocljax and torch (a separate venv: see
``benchmarks/avalanche_agem.py`` for the one measured). Researchers coming from Avalanche ask
how much faster ocljax trains their online ER; this times the three on the same work, in one
process, one seed, one after the other:

- **the PyTorch loop** (``benchmarks.torch_er``, the baseline of every ocljax benchmark);
- **Avalanche**: ``OnlineNaive`` with a ``ReplayPlugin`` over a ``ReservoirSamplingBuffer``
  of 1,000, 10 incoming + 10 replayed rows per step, on ``split_online_stream`` experiences of
  10 samples. Its inputs are float tensors prepared beforehand (no per-sample transform), and
  it is timed on training alone (no evaluation): Avalanche's best case;
- **ocljax**: ``learners.er`` through the driver, one seed on one device, optimised; run
  time without compilation (printed separately), task-end evaluation.

Workload: ``benchmarks.throughput``'s split-MNIST-shaped synthetic stream (60,000 samples,
``--quick`` 12,000; 5 tasks), MLP 784-256-256-10, SGD lr 0.1, one pass, all three in the
stream order of seed 0. Prints samples/s and the ratios to the loop measured in this run;
writes JSON.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import sys
import time
import warnings

import numpy as np

from benchmarks import quick_args, write_json


def avalanche_er(train_x, train_y, test_x, test_y, order, task_ends, *, buffer_size=1000,
                 batch=10, replay=10, lr=0.1, seed=0) -> dict:
    """Train one seed of online ER with Avalanche on ``order`` ([n_batches, batch] pool
    indices; tasks end after the steps in ``task_ends``); returns the training time and the
    test accuracy after the pass."""
    import torch
    from avalanche.benchmarks.scenarios.dataset_scenario import benchmark_from_datasets
    from avalanche.benchmarks.scenarios.online import split_online_stream
    from avalanche.benchmarks.utils.classification_dataset import (
        _make_taskaware_tensor_classification_dataset as tensor_dataset,
    )
    from avalanche.training import OnlineNaive
    from avalanche.training.plugins import EvaluationPlugin, ReplayPlugin
    from avalanche.training.storage_policy import ReservoirSamplingBuffer

    from benchmarks.torch_er import _mlp, accuracy, images

    torch.manual_seed(seed)

    def tensor(x):
        return torch.from_numpy(np.ascontiguousarray(x))

    flat = order.reshape(-1)
    bounds = [0] + [e * batch for e in sorted(task_ends)]
    tasks = [tensor_dataset(images(tensor(train_x[flat[a:b]])),
                            torch.from_numpy(train_y[flat[a:b]].astype(np.int64)))
             for a, b in zip(bounds[:-1], bounds[1:], strict=True) if b > a]
    bench = benchmark_from_datasets(train=tasks)
    net = _mlp(int(np.prod(train_x.shape[1:])), (256, 256), int(train_y.max()) + 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        strategy = OnlineNaive(
            model=net, optimizer=torch.optim.SGD(net.parameters(), lr=lr), train_mb_size=batch,
            plugins=[ReplayPlugin(mem_size=buffer_size, batch_size=batch, batch_size_mem=replay,
                                  storage_policy=ReservoirSamplingBuffer(buffer_size))],
            evaluator=EvaluationPlugin(loggers=[]))
        online = split_online_stream(bench.train_stream, experience_size=batch, shuffle=False)
        steps, marks = 0, []
        t0 = time.perf_counter()
        for experience in online:
            strategy.train(experience)
            steps += 1
            if steps % 1000 == 0:
                marks.append(time.perf_counter() - t0)
        seconds = time.perf_counter() - t0
    acc = accuracy(net, tensor(test_x), tensor(test_y.astype(np.int64)))
    per_1000 = np.diff([0.0] + marks).tolist()
    return {"seconds": seconds, "steps": steps, "samples": int(flat.size),
            "final_test_accuracy": acc, "seconds_per_1000_steps": per_1000}


def main(argv=None) -> int:
    args = quick_args("benchmarks.avalanche_er", __doc__, argv,
                      "12,000 samples instead of 60,000")
    try:
        import avalanche
        import torch
    except ImportError as e:
        raise SystemExit(f"this benchmark needs torch and avalanche-lib ({e}); "
                         "see benchmarks/avalanche_agem.py for a venv that has them") from None

    from benchmarks import throughput, torch_er
    from ocljax import learners, streams

    ds, cfg, learner = throughput.workload(args.quick)
    cfg = dataclasses.replace(cfg, eval_every=0)  # task-end evaluation, as the loop does
    st = streams.build(cfg, ds, [0])
    order = st.orders[0]
    ends = set(np.cumsum(st.task_batches).tolist())
    n = int(order.size)
    print(f"online ER, {n:,} samples, MLP 784-256-256-10, batch 10 + 10 replayed, buffer 1,000; "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads), "
          f"avalanche {avalanche.__version__}", flush=True)

    loop = torch_er.run(ds.train_x, ds.train_y, ds.test_x, ds.test_y, order, ends)
    avl = avalanche_er(ds.train_x, ds.train_y, ds.test_x, ds.test_y, order, ends)
    ocl = throughput.one_seed(learner, ds, cfg, learners.er.HParams(lr=0.1))
    rows = {"pytorch_loop": {"seconds": loop["seconds"],
                             "final_accuracy": loop["final_test_accuracy"]},
            "avalanche": {"seconds": avl["seconds"], "final_accuracy": avl["final_test_accuracy"],
                          "steps": avl["steps"],
                          "seconds_per_1000_steps": avl["seconds_per_1000_steps"]},
            "ocljax": {"seconds": ocl["run_s"], "compile_s": ocl["compile_s"],
                       "final_accuracy": ocl["final_average_accuracy"]}}
    base = n / loop["seconds"]
    for name, row in rows.items():
        row["samples_per_s"] = n / row["seconds"]
        row["ratio_vs_torch_loop"] = row["samples_per_s"] / base
        extra = f", compile {row['compile_s']:.1f} s apart" if "compile_s" in row else ""
        print(f"{name:13s} {row['seconds']:7.2f} s  {row['samples_per_s']:9.0f} samples/s  "
              f"{row['ratio_vs_torch_loop']:6.2f}x the loop  "
              f"final accuracy {row['final_accuracy']:.3f}{extra}", flush=True)
    print("avalanche: seconds per 1,000 steps, in stream order: "
          + ", ".join(f"{t:.1f}" for t in avl["seconds_per_1000_steps"]))
    speedup = rows["avalanche"]["seconds"] / rows["ocljax"]["seconds"]
    print(f"ocljax / Avalanche: {speedup:.1f}x (training time, one seed)")
    write_json(args.json, {
        "benchmark": "avalanche_er", "quick": args.quick, "samples": n,
        "host": platform.node(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
        "avalanche": avalanche.__version__, "results": rows,
        "ocljax_vs_avalanche": speedup})
    return 0


if __name__ == "__main__":
    sys.exit(main())
