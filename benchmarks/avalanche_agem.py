"""Avalanche's own A-GEM on 17-task permuted MNIST: the anchor's distribution over seeds.

    python benchmarks/avalanche_agem.py --data-dir ../shared/data --seeds 0,1,2 \\
        [--draw random|cyclic] [--threads 1] [--json PATH] [--compare RUN_DIR ...]

Run it with a Python that has ``avalanche-lib`` (0.6.0 is the oldest release pip offers for
Python 3.11) and a ``torchvision`` matching its ``torch``; ocljax does not depend on either,
so this file imports nothing from ocljax and runs as a plain script. The measured setup (see
docs/results.md) was a separate venv: ``pip install torch==2.13.0 "torchvision==0.28.*"
avalanche-lib==0.6.0``. There torch was a CPU-only build and torchvision's wheel was built
against CUDA torch, so its C operators did not load and ``import torchvision`` failed in
``torchvision/_meta_registrations.py``; MNIST and the transforms need none of those operators,
and wrapping that module's body in ``try: ... except RuntimeError: pass`` let it import. With
a matching torch / torchvision pair no such step is needed.

Issue 4's anchor is one number, 0.81, from one seed of the continual-learning-baselines
experiment ``permuted_mnist/agem.py`` (December 2022). ocljax's preset
(``experiments.agem_pmnist``) and an independent PyTorch loop (``benchmarks.torch_agem``)
both give about 0.795 over many seeds. This script asks the remaining question: what does
Avalanche's *own code* give over several seeds? It builds the same run as that experiment:
``PermutedMNIST(17)`` with Avalanche's default transforms (standardised pixels), an MLP
784-256-256-10 with ReLU, no dropout and PyTorch's initialisation, ``avalanche.training.AGEM``
with 250 patterns per experience, a 256-row reference sample, SGD lr 0.1, batch 10, one
epoch, cross-entropy. It evaluates on the whole test stream after the last experience
(``Top1_Acc_Stream``, the metric of the published number) instead of after every
experience, which does not change training.

``--draw`` picks how the plugin reads the reference rows:

- ``random`` (default): each stored experience's ``256 // n`` rows drawn uniformly with
  replacement, as ``GroupBalancedInfiniteDataLoader`` did in Avalanche 0.1-0.3, the versions
  that produced and confirmed the 0.81. Installed by replacing the plugin's iterator after
  each memory update (``random_draw_iterator``); the training loop, the projection and the
  memory selection are Avalanche 0.6's code.
- ``cyclic``: Avalanche 0.6's loader unchanged (each experience's memory read in order,
  cyclically).

Each finished seed is appended to the JSON file at once (written atomically), so an
interrupted run keeps what finished, and a rerun skips seeds already there.
``--compare RUN_DIR ...`` sets the seeds against ocljax run directories (their
``summary.json``) with Welch's comparison of means; with ``--seeds ''`` and a finished
``--json`` it only compares, and needs neither Avalanche nor the data.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
               "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def mnist_root(data_dir: Path, root: Path) -> Path:
    """Lay the four MNIST files out as torchvision expects them (``ROOT/MNIST/raw``,
    uncompressed), so that Avalanche finds them and downloads nothing."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for name in MNIST_FILES:
        src = data_dir / "mnist" / f"{name}.gz"
        if not src.is_file():
            raise SystemExit(f"missing {src}: --data-dir must hold mnist/{name}.gz")
        dst = raw / name
        if not dst.exists():
            with gzip.open(src, "rb") as f, open(dst, "wb") as g:
                shutil.copyfileobj(f, g)
    return root


def random_draw_iterator(buffers, per_experience: int):
    """Reference batches as Avalanche 0.1-0.3 drew them: from each stored experience,
    ``per_experience`` rows uniformly with replacement, concatenated in experience order.

    The stored patterns are read through their (deterministic) training transforms once, when
    the iterator is built, instead of at every draw as Avalanche's data loader does: the same
    rows, about three times faster on a CPU."""
    import torch

    stored = []
    for b in buffers:
        items = [b[i] for i in range(len(b))]
        stored.append([torch.stack([torch.as_tensor(it[j]) for it in items])
                       for j in range(len(items[0]))])
    while True:
        parts = []
        for fields in stored:
            idx = torch.randint(0, len(fields[0]), (per_experience,))
            parts.append([f[idx] for f in fields])
        yield [torch.cat([p[j] for p in parts]) for j in range(len(parts[0]))]


def run_seed(seed: int, root: Path, draw: str, n_experiences: int = 17) -> dict:
    """One seed of the continual-learning-baselines A-GEM experiment; returns the final
    stream accuracy and the per-experience accuracies."""
    import random

    import numpy as np
    import torch
    from avalanche.benchmarks.classic import PermutedMNIST
    from avalanche.evaluation import metrics
    from avalanche.training import AGEM
    from avalanche.training.plugins import EvaluationPlugin
    from avalanche.training.plugins.agem import AGEMPlugin
    from torch import nn

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    bench = PermutedMNIST(n_experiences, seed=seed, dataset_root=str(root))
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 256), nn.ReLU(),
                          nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
    evaluator = EvaluationPlugin(metrics.accuracy_metrics(experience=True, stream=True),
                                 loggers=[])
    strategy = AGEM(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                    criterion=nn.CrossEntropyLoss(), patterns_per_exp=250, sample_size=256,
                    train_mb_size=10, train_epochs=1, eval_mb_size=1000, device="cpu",
                    evaluator=evaluator)
    plugin = next(p for p in strategy.plugins if isinstance(p, AGEMPlugin))
    if draw == "random":
        update = plugin.update_memory

        def update_memory(dataset, *args, **kwargs):
            update(dataset, *args, **kwargs)
            plugin.buffer_dliter = random_draw_iterator(
                plugin.buffers, plugin.sample_size // len(plugin.buffers))

        plugin.update_memory = update_memory
    t0 = time.perf_counter()
    for i, experience in enumerate(bench.train_stream):
        strategy.train(experience)
        print(f"  seed {seed}: experience {i + 1}/{n_experiences} trained "
              f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    res = strategy.eval(bench.test_stream)
    stream = [v for k, v in res.items() if k.startswith("Top1_Acc_Stream/eval_phase/test")]
    per_exp = [res[k] for k in sorted(
        (k for k in res if k.startswith("Top1_Acc_Exp/eval_phase/test")),
        key=lambda k: int(k.rsplit("Exp", 1)[1]))]
    return {"seed": seed, "final_accuracy": float(stream[0]),
            "per_experience": [float(a) for a in per_exp],
            "seconds": time.perf_counter() - t0}


def write_atomic(path: Path, obj) -> None:
    """Write JSON through a temporary file and a rename, so a reader never sees half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def ocljax_accuracies(run_dirs) -> list[float]:
    """Final average accuracy of every member in ocljax run directories (``summary.json``)."""
    accs = []
    for d in run_dirs:
        path = Path(d) / "summary.json"
        if not path.is_file():
            raise SystemExit(f"{path} not found: --compare takes ocljax run directories")
        accs += [m["final_average_accuracy"] for m in json.loads(path.read_text())["members"]]
    return accs


def welch(a, b) -> dict:
    """Welch's comparison of two samples' means: the difference ``mean(a) - mean(b)``, its
    standard error, the Welch-Satterthwaite degrees of freedom, the t statistic, and (where
    SciPy is installed) the two-sided p-value and the 95% interval of the difference."""
    import numpy as np

    a, b = np.asarray(a, float), np.asarray(b, float)
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    diff, se = a.mean() - b.mean(), float(np.sqrt(va + vb))
    df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    out = {"difference": float(diff), "se": se, "df": float(df), "t": float(diff / se)}
    try:
        from scipy import stats
    except ImportError:
        return out
    q = stats.t.ppf(0.975, df)
    out.update(p=float(2 * stats.t.sf(abs(out["t"]), df)),
               ci95=[float(diff - q * se), float(diff + q * se)])
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", type=Path, default=None,
                   help="holds mnist/*.gz (needed only when a seed has to run)")
    p.add_argument("--seeds", default="0", help="comma-separated; '' runs none")
    p.add_argument("--draw", choices=("random", "cyclic"), default="random")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument("--root", type=Path, default=None,
                   help="where to lay out MNIST for torchvision (default: a temp dir)")
    p.add_argument("--json", type=Path, default=None,
                   help="results file: finished seeds are kept and skipped on a rerun")
    p.add_argument("--compare", nargs="+", default=None, metavar="RUN_DIR",
                   help="ocljax run directories to compare the final accuracies with")
    args = p.parse_args(argv)

    import numpy as np

    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    out = {"draw": args.draw, "runs": []}
    if args.json and args.json.exists():
        out = json.loads(args.json.read_text())
        if out.get("draw") != args.draw:
            raise SystemExit(f"{args.json} holds draw={out.get('draw')!r}, not {args.draw!r}")
    done = {r["seed"] for r in out["runs"]}
    todo = [s for s in seeds if s not in done]
    for seed in sorted(set(seeds) & done):
        print(f"seed {seed}: already in {args.json}, skipped")
    if todo:
        if args.data_dir is None:
            raise SystemExit("--data-dir is needed to run seeds " + ",".join(map(str, todo)))
        import avalanche
        import torch

        if args.threads:
            torch.set_num_threads(args.threads)
        out.update(avalanche=avalanche.__version__, torch=torch.__version__)
        root = mnist_root(args.data_dir,
                          args.root or Path(tempfile.mkdtemp(prefix="avl_mnist_")))
    for seed in todo:
        r = run_seed(seed, root, args.draw)
        out["runs"].append(r)
        print(f"seed {seed}: final accuracy {r['final_accuracy']:.4f} "
              f"({r['seconds']:.0f} s)", flush=True)
        if args.json:
            write_atomic(args.json, out)
    if not out["runs"]:
        raise SystemExit("no runs: give --seeds, or --json with finished runs")
    accs = np.array([r["final_accuracy"] for r in out["runs"]])
    std = accs.std(ddof=1) if len(accs) > 1 else 0.0
    print(f"Avalanche {out.get('avalanche', '?')} A-GEM, draw={args.draw}: "
          f"{accs.mean():.4f} ± {std:.4f} over {len(accs)} seeds")
    if args.compare:
        ours = np.array(ocljax_accuracies(args.compare))
        print(f"ocljax: {ours.mean():.4f} ± {ours.std(ddof=1):.4f} over {len(ours)} seeds")
        w = welch(accs, ours)
        line = (f"Avalanche - ocljax: {w['difference']:+.4f} (standard error {w['se']:.4f}, "
                f"t = {w['t']:.2f}, {w['df']:.1f} df")
        if "p" in w:
            line += f", p = {w['p']:.2f}, 95% interval [{w['ci95'][0]:+.4f}, {w['ci95'][1]:+.4f}]"
        print(line + ")")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
