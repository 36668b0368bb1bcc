"""An independent hand-written PyTorch A-GEM on permuted MNIST: a cross-check of the anchor.

    python -m benchmarks.torch_agem --data-dir ../shared/data [--seeds 0,1] [--samples-per-task N]
        [--ref-draw cyclic|random] [--input-norm standard|unit] [--json PATH]

``experiments.agem_pmnist`` reproduces Avalanche's A-GEM run (continual-learning-baselines,
0.81 final accuracy) with ocljax. This module runs the same protocol as a plain PyTorch loop,
written from the A-GEM paper (Chaudhry et al. 2019, Sec. 4, Eq. 11) and Avalanche's protocol,
sharing no code with ocljax's learner: if both give the same accuracy, a gap to 0.81 lies in
the protocol, not in ocljax's implementation.

Protocol (Avalanche's ``agem_pmnist``): 17 tasks, each the MNIST training set under its own
pixel permutation, shuffled, one pass in batches of 10; MLP 784-256-256-10 with PyTorch's
default initialisation; SGD lr 0.1; inputs standardised (0.1307 / 0.3081); after each task 250
uniformly random patterns of it join the memory; before each step the gradient of the loss on
a reference batch of ``256 // n`` patterns of each of the ``n`` stored tasks; the stream
gradient is projected when it conflicts with it. ``--ref-draw random`` draws each task's rows
uniformly with replacement (Avalanche 0.1-0.3, the versions that produced and confirmed the
0.81); ``cyclic`` reads each task's rows in order, cyclically (Avalanche >= 0.4). Final
accuracy: the mean over the 17 tasks' permuted test sets after the last task.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from benchmarks.torch_er import torch_model

MEAN, STD = 0.1307, 0.3081


def flat_grad(model):
    import torch

    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


def reference_indices(rng, regions: list[np.ndarray], mem_batch: int, step: int, draw: str):
    """Rows of the reference batch: ``mem_batch // n`` of each of the ``n`` stored regions,
    uniformly with replacement (``random``) or read in order from the region's start after
    ``step`` batches since the last boundary, cyclically (``cyclic``)."""
    per = mem_batch // len(regions)
    out = []
    for region in regions:
        if draw == "random":
            out.append(region[rng.integers(0, len(region), per)])
        else:
            k = min(per, len(region))
            start = step * k % len(region)
            out.append(region[(start + np.arange(k)) % len(region)])
    return np.concatenate(out)


def run_seed(x_train, y_train, x_test, y_test, seed: int, n_tasks: int = 17,
             samples_per_task: int | None = None, batch: int = 10, lr: float = 0.1,
             patterns: int = 250, mem_batch: int = 256, draw: str = "random") -> dict:
    """One seed of the protocol; returns final per-task accuracies and counts."""
    import torch

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    perms = [rng.permutation(x_train.shape[1]) for _ in range(n_tasks)]
    model = torch_model("mlp", (x_train.shape[1],), 10)  # 784-256-256-10, PyTorch's init
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    loss_fn = torch.nn.CrossEntropyLoss()
    mem_x, mem_y, regions = [], [], []
    n = samples_per_task or len(y_train)
    projected = steps = 0
    for t in range(n_tasks):
        xt = torch.from_numpy(x_train[:, perms[t]])
        yt = torch.from_numpy(y_train)
        order = rng.permutation(len(y_train))[:n]
        if regions:
            mx, my = torch.cat(mem_x), torch.cat(mem_y)
        for s, i in enumerate(range(0, n - batch + 1, batch)):
            rows = torch.from_numpy(order[i:i + batch])
            g_ref = None
            if regions:
                ref = torch.from_numpy(reference_indices(rng, regions, mem_batch, s, draw))
                opt.zero_grad()
                loss_fn(model(mx[ref]), my[ref]).backward()
                g_ref = flat_grad(model).clone()
            opt.zero_grad()
            loss_fn(model(xt[rows]), yt[rows]).backward()
            if g_ref is not None:
                g = flat_grad(model)
                dot = g @ g_ref
                if dot < 0:
                    g = g - dot / (g_ref @ g_ref) * g_ref
                    projected += 1
                    offset = 0
                    for p in model.parameters():
                        p.grad.copy_(g[offset:offset + p.numel()].view_as(p))
                        offset += p.numel()
            opt.step()
            steps += 1
        keep = order[rng.permutation(n)[:patterns]]  # uniform patterns of the task's data
        start = sum(len(r) for r in regions)
        regions.append(np.arange(start, start + len(keep)))
        mem_x.append(xt[keep])
        mem_y.append(yt[keep])
    accs = []
    with torch.no_grad():
        for t in range(n_tasks):
            logits = model(torch.from_numpy(x_test[:, perms[t]]))
            accs.append(float((logits.argmax(-1).numpy() == y_test).mean()))
    return {"seed": seed, "per_task": accs, "final_acc": float(np.mean(accs)),
            "projected_fraction": projected / max(steps, 1)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="benchmarks.torch_agem", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", required=True)
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--samples-per-task", type=int, default=None)
    p.add_argument("--ref-draw", choices=("cyclic", "random"), default="random",
                   help="random: with replacement, as Avalanche 0.1-0.3 and the preset")
    p.add_argument("--input-norm", choices=("standard", "unit"), default="standard")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    import torch

    from benchmarks import write_json
    from ocljax import data

    if args.threads:
        torch.set_num_threads(args.threads)
    ds = data.load("mnist", args.data_dir, download=False)

    def prep(x):
        x = x.reshape(len(x), -1).astype(np.float32) / 255.0
        return (x - MEAN) / STD if args.input_norm == "standard" else x

    x_train, x_test = prep(ds.train_x), prep(ds.test_x)
    y_train, y_test = ds.train_y.astype(np.int64), ds.test_y.astype(np.int64)
    runs = []
    for seed in (int(s) for s in args.seeds.split(",")):
        t0 = time.perf_counter()
        r = run_seed(x_train, y_train, x_test, y_test, seed,
                     samples_per_task=args.samples_per_task, draw=args.ref_draw)
        r["seconds"] = time.perf_counter() - t0
        print(f"seed {seed}: final acc {r['final_acc']:.4f}  projected "
              f"{r['projected_fraction']:.1%} of steps  ({r['seconds']:.0f} s)", flush=True)
        runs.append(r)
    accs = np.array([r["final_acc"] for r in runs])
    print(f"final acc {accs.mean():.4f} +- {accs.std(ddof=1) if len(accs) > 1 else 0.0:.4f} "
          f"over {len(accs)} seed(s)")
    if args.json:
        write_json(args.json, {"args": vars(args), "runs": runs,
                               "final_acc_mean": float(accs.mean())})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
