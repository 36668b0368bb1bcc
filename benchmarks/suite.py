"""The ocljax benchmark suite: every performance claim of docs/performance.md, in one command.

    python -m benchmarks.suite [--quick] [--sections members,precision,...] [--out DIR]

Sections (each prints its rows as they finish and is written to ``DIR/suite.json``, atomically,
after every row, so an interrupted suite keeps what it measured):

- ``peak``       float32 GEMM peak of one device (and TF32 / bf16 on GPU): the roofline.
- ``torch``      the hand-written PyTorch loop of online ER (``benchmarks.torch_er``) on the
                 MLP workload: the baseline every ratio is taken against.
- ``members``    seed-samples/s of online ER through the real driver against the number of
                 members (seeds) in one compiled sweep, with the memory plan per member and
                 the fraction of the roofline floor.
- ``precision``  float32 / tf32 / bf16 matmuls at one sweep size: speed and final accuracy;
                 also optax's SGD chain against the fused SGD update ocljax uses.
- ``devices``    (CPU) a fixed sweep spread over 1, 2, 4, 8 virtual CPU devices.
- ``images``     the small CNN and the reduced ResNet-18 on CIFAR-shaped synthetic data
                 (32x32x3): PyTorch loop against ocljax, one seed and a sweep.
- ``long``       a 1,020,000-sample stream (permuted, 17 tasks over a 60,000-sample pool)
                 against a 60,000-sample one, run before and after it (a shared host's
                 speed drifts over a minute): device memory, throughput, the ratio, and the
                 long stream's throughput per 6,000 steps; once with continual evaluation,
                 once with a light task-end evaluation only (the streaming itself).
- ``compile``    compile time of every registered learner; a 4-point learning-rate grid
                 must trace once.

The MLP workload is a split-MNIST-shaped stream (60,000 synthetic 28x28 uint8 samples, 10
classes, 5 tasks, task-free), MLP 784-256-256-10, batch 10 + 10 replayed, reservoir buffer
1,000, SGD lr 0.1, one pass, with continual evaluation (500 test samples per task every 100
steps, the full test sets at task ends). Roofline floor per seed-sample: the larger of the
compute time (``benchmarks.throughput.train_flops_per_sample`` x 2 rows per incoming sample /
measured GEMM peak) and, on GPUs, the weight-traffic time (read + write the member's float32
weights once per step / HBM bandwidth, per incoming sample).

Each group of jobs runs in its own worker process (on CPU, one per virtual-device count, as
the CLI would configure it); a job that fails or times out is recorded with its error and the
suite goes on. ``--quick`` runs the same sections on small streams (a smoke test, ~3 min on 2
CPU cores).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import selectors
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.throughput import gemm_peak_flops, train_flops_per_sample

SECTIONS = ("peak", "torch", "members", "precision", "devices", "images", "long", "compile")
MLP_WEIGHTS = (784 * 256 + 256) + (256 * 256 + 256) + (256 * 10 + 10)  # 269,322 parameters
GPU_COMPILE_LEARNERS = ("finetune", "er", "agem", "scr")  # the compile section's, on a GPU
HBM_BYTES_PER_S = {"H200": 4.8e12, "H100": 3.35e12, "A100": 2.0e12}  # vendor peak bandwidth


# ----------------------------------------------------------------------------- the job list

# The image rows: light evaluation (50 test images per class, 50 per task continually) so
# that they time training, as the MLP rows mostly do; per model, the samples on a CPU and on a
# GPU and the members of the GPU sweep (4 on a CPU).
IMAGE_JOB = {"shape": [32, 32, 3], "test_per_class": 50, "eval_per_task": 50}
IMAGE_ROWS = (("cnn", 2_000, 10_000, 64), ("resnet18", 400, 4_000, 16))


def plan(gpu: bool, quick: bool, sections, data_dir: str | None = None) -> list[dict]:
    """The suite's jobs for a GPU or CPU host; each is a dict a worker can run alone.

    With ``data_dir`` holding MNIST, the MLP rows train on real split-MNIST (same shapes as
    the synthetic stream), so their accuracies mean something.
    """
    pool = 12_000 if quick else 60_000
    jobs = []
    real = {"dataset": "mnist", "data_dir": data_dir} if data_dir else {}

    def add(section, name, **kw):
        if section in sections:
            jobs.append({"section": section, "name": name, **kw})

    add("peak", "gemm_peak", kind="peak")
    add("torch", "torch_mlp", kind="torch", model="mlp", samples=pool,
        max_samples=(pool if not gpu else min(pool, 20_000)), **real)
    # Evaluation at task ends only, like the PyTorch loop; one row adds continual evaluation.
    mlp = {"kind": "driver", "model": "mlp", "samples": pool, "eval_every": 0, **real}
    if gpu:
        counts = [1, 64, 256] if quick else [1, 16, 64, 256, 1024, 2048, 4096]
    else:
        counts = [1, 4] if quick else [1, 2, 4, 8, 16, 32]
    for m in counts:
        add("members", f"er_mlp_m{m}", members=m, **mlp)
    if not gpu and not quick:
        add("members", "er_mlp_m16_one_device", members=16, devices=1, **mlp)
    m_cont = (256 if quick else 1024) if gpu else 4
    add("members", f"er_mlp_m{m_cont}_continual_eval", members=m_cont,
        **{**mlp, "eval_every": 100})
    m_prec = (256 if quick else 1024) if gpu else 4
    for prec in ("float32", "tf32", "bf16") if gpu else ("float32", "bf16"):
        add("precision", f"er_mlp_m{m_prec}_{prec}", members=m_prec, precision=prec, **mlp)
    # The learning rate folded into the loss (fused update) against optax's SGD chain.
    add("precision", f"er_mlp_m{m_prec}_sgd_optax", members=m_prec, optimizer="sgd_optax", **mlp)
    if not gpu:
        for d in (1, 2, 4, 8):
            add("devices", f"er_mlp_m16_d{d}", members=16, devices=d, cpu_devices=8,
                **{**mlp, "samples": 12_000 if not quick else 4_000})
    img = IMAGE_JOB
    for model, n_cpu, n_gpu, sweep in IMAGE_ROWS:
        n = (n_gpu if gpu else n_cpu) // (5 if quick else 1)
        add("images", f"torch_{model}", kind="torch", model=model, samples=n, max_samples=n, **img)
        add("images", f"er_{model}_m1", kind="driver", model=model, samples=n, members=1, **img)
        m = sweep if gpu else 4
        add("images", f"er_{model}_m{m}", kind="driver", model=model, samples=n, members=m, **img)
    m_long = (64 if quick else 128) if gpu else 2
    # each job runs the 60,000-sample stream before and after the long one (run_long); the
    # second evaluates only 10 test rows per task at task ends, so it times the streaming
    # itself: evaluation under all 17 permutations at each of 17 task ends grows as 17^2
    long = {"kind": "long", "model": "mlp", "stream": "permuted", "test_per_class": 100,
            "members": m_long, "samples": pool, "n_tasks": 17, "short_tasks": 1,
            "window_steps": pool // 10}
    add("long", "permuted_17_tasks", eval_every=1000, eval_per_task=100, **long)
    add("long", "permuted_17_tasks_light_eval", eval_every=0, test_per_task=10, **long)
    # a GPU compiles each learner in 20-30 s: a representative four fit a device session
    add("compile", "compile_per_learner", kind="compile",
        **({"learners": list(GPU_COMPILE_LEARNERS)} if gpu else {}))
    return jobs


def process_key(job: dict, gpu: bool) -> tuple:
    """Jobs with equal keys share a worker process."""
    if job["kind"] == "torch":
        return ("torch",)
    if gpu:
        return ("jax",)
    return ("jax", job.get("cpu_devices") or cpu_devices_for(job))


def cpu_devices_for(job: dict) -> int:
    """Virtual CPU devices the CLI would create for the job's sweep."""
    return max(1, min(job.get("members", 1), 8 * (os.cpu_count() or 1)))


# ----------------------------------------------------------------------------- the workers


def mlp_dataset(samples: int, shape=(28, 28, 1), test_per_class: int = 1000,
                dataset: str | None = None, data_dir: str | None = None):
    """Synthetic class-prototype images (or, with ``dataset``, that real dataset)."""
    from ocljax import data

    if dataset:
        return data.load(dataset, data_dir)
    return data.synthetic.load(num_classes=10, train_per_class=samples // 10,
                               test_per_class=test_per_class, shape=tuple(shape), noise=60.0)


def stream_config(job: dict):
    from ocljax import streams

    return streams.StreamConfig(
        kind=job.get("stream", "split"), n_tasks=job.get("n_tasks", 5), batch_size=10,
        task_free=True, eval_every=job.get("eval_every", 0),
        eval_per_task=job.get("eval_per_task", 500), test_per_task=job.get("test_per_task", 0),
    )


def run_driver(job: dict, sweep=None) -> dict:
    """Online ER through ``ocljax.run.driver`` for ``job['members']`` seeds. With
    ``job['window_steps']``, also the throughput of each window of that many steps (as the
    driver reports progress, at chunk boundaries). ``sweep``: the job's sweep, compiled by
    ``compile_driver`` (compiled here when None)."""
    from ocljax.run import driver

    sweep = sweep or compile_driver(job)
    M, cfg = sweep.members, sweep.stream.cfg
    marks = []
    res = driver.execute(sweep, progress=lambda step, total, s: marks.append((step, s)))
    samples = int(sweep.stream.schedule.steps.fresh.sum()) * cfg.batch_size
    mem = res.extra["memory"]
    windows = []
    if job.get("window_steps"):
        windows = window_rates(marks, job["window_steps"], M * cfg.batch_size)
    return {
        "members": M, "devices": int(sweep.mesh.devices.size), "precision": sweep.precision,
        "samples_per_seed": samples, "optimizer": job.get("optimizer", "sgd"),
        "compile_s": res.compile_s, "run_s": res.run_s,
        "seed_samples_per_s": M * samples / res.run_s,
        "final_average_accuracy": float(res.accuracy_matrix()[:, -1].mean()),
        "memory_per_member": mem["per_member"], "memory_per_device": mem["program"],
        "state_per_member": mem["state_per_member"], "shared_bytes": mem["shared"],
        "eval_batch": res.extra["eval_batch"],
        **({"window_seed_samples_per_s": windows} if windows else {}),
    }


def compile_driver(job: dict):
    """The compiled sweep (``ocljax.run.driver.compile_sweep``, ``job['compile_mode']``,
    default ``optimized``) of a driver job: online ER, SGD lr 0.1, buffer 1,000, 10 replayed
    rows, seeds ``0 .. members - 1``."""
    import jax

    from ocljax import learners, models, precision, streams
    from ocljax.run import driver
    from ocljax.sweep import devices_for

    ds = mlp_dataset(job["samples"], job.get("shape", (28, 28, 1)),
                     job.get("test_per_class", 1000), job.get("dataset"), job.get("data_dir"))
    prec = job.get("precision", "float32")
    model = precision.cast_model(models.make_model(job["model"], 10), prec)
    learner = learners.er.make(model, learners.er.Config(
        buffer_size=1000, replay_batch=10, optimizer=job.get("optimizer", "sgd")))
    M = job["members"]
    seeds = list(range(M))
    stream = streams.build(stream_config(job), ds, seeds)
    n_dev = job.get("devices") or devices_for(M, len(jax.local_devices()))
    return driver.compile_sweep(learner, stream, ds, [learners.er.HParams(lr=0.1)] * M, seeds,
                                n_devices=n_dev, precision=prec,
                                compile_mode=job.get("compile_mode", "optimized"),
                                blocks_per_chunk=job.get("blocks_per_chunk"))


def window_rates(marks: list[tuple[int, float]], window_steps: int, per_step: int) -> list:
    """Throughput of consecutive windows of at least ``window_steps`` steps, from progress
    marks ``(step, seconds since the run started)``; ``per_step``: seed-samples per step."""
    out, last = [], (0, 0.0)
    for step, sec in marks:
        if step - last[0] >= window_steps or (step == marks[-1][0] and step > last[0]):
            if sec > last[1]:
                out.append(per_step * (step - last[0]) / (sec - last[1]))
            last = (step, sec)
    return out


def run_long(job: dict) -> dict:
    """The long stream (``job['n_tasks']`` tasks over the pool) between two runs of the short
    one (``job['short_tasks']``), so that both sample the same stretch of a shared host's
    noise: the row's throughput, the short runs', and their ratio."""
    short = compile_driver({**job, "n_tasks": job["short_tasks"]})  # compiled once, run twice
    before = run_driver(job, short)
    long = run_driver(job)
    after = run_driver(job, short)
    rates = [before["seed_samples_per_s"], after["seed_samples_per_s"]]
    return {**long, "short_seed_samples_per_s": rates,
            "short_memory_per_member": before["memory_per_member"],
            "short_samples_per_seed": before["samples_per_seed"],
            "short_final_average_accuracy": [before["final_average_accuracy"],
                                             after["final_average_accuracy"]],
            "ratio_vs_short": long["seed_samples_per_s"] / (sum(rates) / len(rates))}


def run_torch(job: dict) -> dict:
    """The PyTorch loop on the job's workload (CUDA when available)."""
    import numpy as np
    import torch

    from benchmarks import torch_er
    from ocljax import streams

    ds = mlp_dataset(job["samples"], job.get("shape", (28, 28, 1)),
                     job.get("test_per_class", 1000), job.get("dataset"), job.get("data_dir"))
    st = streams.build(stream_config(job), ds, [0])
    ends = set(np.cumsum(st.task_batches).tolist())
    device = "cuda" if torch.cuda.is_available() else "cpu"
    steps = job["max_samples"] // 10
    out = torch_er.run(ds.train_x, ds.train_y, ds.test_x, ds.test_y, st.orders[0], ends,
                       model=job["model"], device=device, max_steps=steps)
    return {"device": device, "threads": torch.get_num_threads(), "version": torch.__version__,
            "seconds": out["seconds"], "samples": out["samples"],
            "samples_per_s": out["samples"] / out["seconds"],
            "final_average_accuracy": out["final_test_accuracy"]}


def run_peak(job: dict) -> dict:
    """Best float32 (and, on GPU, TF32 and bf16) square-matmul FLOP/s of one device."""
    import jax

    from ocljax import precision

    gpu = jax.default_backend() == "gpu"
    out = {"device_kind": jax.devices()[0].device_kind, "backend": jax.default_backend()}
    for name in ("float32", "tf32", "bf16") if gpu else ("float32",):
        with precision.matmul_precision(name):
            out[f"{name}_flops"] = gemm_peak_flops(
                8192 if gpu else 2048, dtype="bfloat16" if name == "bf16" else "float32")
    return out


def run_compile(job: dict) -> dict:
    """Compile time of each registered learner (or of ``job['learners']``; 4 members: a 4-point
    lr grid, one trace), optimised (``--compile optimized``) and, on a CPU, with ``--compile
    fast`` (LLVM optimisation off, elemental emitters), and their ratio (elsewhere both modes
    compile alike, so the fast compile is skipped and its fields are None)."""
    import jax

    from ocljax import learners, models, streams
    from ocljax.run import driver

    ds = mlp_dataset(2_000, test_per_class=50)
    cfg = streams.StreamConfig(kind="split", n_tasks=5, batch_size=10, eval_every=50,
                               eval_per_task=50)
    out = {}
    for name in job.get("learners") or sorted(learners.REGISTRY):
        module = learners.get(name)
        learner = module.make(models.make_model("mlp", 10))
        hp0 = module.HParams()
        # a 4-point learning-rate grid (one trace); a learner without one (the input-blind
        # baseline) runs 4 copies of its defaults
        hps = [hp0._replace(lr=lr) if "lr" in hp0._fields else hp0
               for lr in (0.01, 0.03, 0.1, 0.3)]
        seeds = [0, 0, 0, 0]
        stream = streams.build(cfg, ds, seeds)
        res = driver.run(learner, stream, ds, hps, seeds, n_devices=1,
                         compile_mode="optimized")
        out[name] = {"compile_s": res.compile_s, "run_s": res.run_s, "traces": res.trace_count,
                     "fast_compile_s": None, "fast_run_s": None, "fast_over_optimized": None}
        if jax.default_backend() == "cpu":
            fast = driver.run(learner, stream, ds, hps, seeds, n_devices=1, compile_mode="fast")
            out[name].update(fast_compile_s=fast.compile_s, fast_run_s=fast.run_s,
                             fast_over_optimized=fast.compile_s / res.compile_s)
    return out


RUNNERS = {"driver": run_driver, "long": run_long, "torch": run_torch, "peak": run_peak,
           "compile": run_compile}


def worker(jobs: list[dict]) -> None:
    """Run ``jobs`` in this process, one JSON line per job on stdout."""
    from ocljax.sweep import enable_compilation_cache

    if any(j["kind"] != "torch" for j in jobs):
        enable_compilation_cache("")  # measure compilation, not the cache
    for job in jobs:
        t = time.perf_counter()
        try:
            row = {**job, **RUNNERS[job["kind"]](job)}
        except Exception as err:  # noqa: BLE001 - recorded, the suite goes on
            row = {**job, "error": f"{type(err).__name__}: {err}"}
        row["wall_s"] = time.perf_counter() - t
        print("ROW " + json.dumps(row), flush=True)


# ----------------------------------------------------------------------------- the parent


def derive(row: dict, ctx: dict) -> dict:
    """Add ratios to the PyTorch loop and fractions of the roofline floor to a driver row."""
    if "seed_samples_per_s" not in row:
        return row
    rate = row["seed_samples_per_s"]
    base = ctx["torch"].get(row["model"])
    if base:
        row["ratio_vs_torch"] = rate / base
    peak = ctx.get("peak", {}).get(f"{row.get('precision', 'float32')}_flops")
    if row["model"] == "mlp" and peak:
        compute = 2 * train_flops_per_sample(784) / peak  # seconds per incoming sample
        traffic = 0.0
        bw = ctx.get("hbm_bytes_per_s")
        if bw:
            traffic = 2 * 4 * MLP_WEIGHTS / bw / 10  # per step, 10 incoming samples a step
        floor_rate = 1.0 / max(compute, traffic)
        row["roofline_floor_seed_samples_per_s"] = floor_rate
        row["fraction_of_roofline"] = rate / floor_rate
    return row


def describe(row: dict) -> str:
    if "error" in row:
        return f"{row['name']:28s} FAILED: {row['error'][:300]}"
    if row["kind"] == "peak":
        return f"{row['name']:28s} " + "  ".join(
            f"{k[:-6]} {v / 1e12:.2f} TFLOP/s" for k, v in row.items() if k.endswith("_flops"))
    if row["kind"] == "torch":
        return (f"{row['name']:28s} pytorch loop on {row['device']}: "
                f"{row['samples_per_s']:10.0f} samples/s ({row['seconds']:.2f} s for "
                f"{row['samples']} samples), acc {row['final_average_accuracy']:.3f}")
    if row["kind"] == "compile":
        return f"{row['name']:28s} " + ", ".join(
            compile_cell(k, v) for k, v in row.items() if isinstance(v, dict) and "compile_s" in v)
    text = (f"{row['name']:28s} M={row['members']:5d} on {row['devices']} dev: "
            f"{row['seed_samples_per_s']:12.0f} seed-samples/s")
    if "ratio_vs_torch" in row:
        text += f"  {row['ratio_vs_torch']:7.1f}x torch"
    if "fraction_of_roofline" in row:
        text += f"  {100 * row['fraction_of_roofline']:5.1f}% of roofline"
    if "ratio_vs_short" in row:
        text += (f"  {row['ratio_vs_short']:.3f}x the {row['short_samples_per_seed']:,}-sample "
                 f"stream ({', '.join(f'{r:.0f}' for r in row['short_seed_samples_per_s'])})")
    return text + (f"  compile {row['compile_s']:5.1f} s  run {row['run_s']:7.2f} s  "
                   f"{row['memory_per_member'] / 2**20:6.2f} MiB/member  "
                   f"acc {row['final_average_accuracy']:.3f}")


def compile_cell(name: str, v: dict) -> str:
    """One learner of the compile row: its optimised compile and, where measured (a CPU), its
    fast compile and their ratio, then its trace count."""
    text, notes = f"{name} {v['compile_s']:.1f} s", [f"{v['traces']} trace"]
    if v["fast_compile_s"] is not None:
        text += f", fast {v['fast_compile_s']:.1f} s"
        notes.insert(0, f"{v['fast_over_optimized']:.2f}x")
    return f"{text} ({'; '.join(notes)})"


def run_group(jobs: list[dict], cpu_devices: int | None, timeout: float, quick: bool):
    """Run ``jobs`` in one worker process; yields each row (or an error row per job)."""
    env = dict(os.environ)
    if cpu_devices and cpu_devices > 1:
        flag = f"--xla_force_host_platform_device_count={cpu_devices}"
        env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {flag}".strip()
    cmd = [sys.executable, "-m", "benchmarks.suite", "--worker", json.dumps(jobs)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)
    done, deadline = set(), time.monotonic() + timeout
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    while time.monotonic() < deadline:
        if not sel.select(timeout=max(0.1, deadline - time.monotonic())):
            continue
        line = proc.stdout.readline()
        if not line:
            break
        if line.startswith("ROW "):
            row = json.loads(line[4:])
            done.add(row["name"])
            yield row
    else:
        proc.kill()
    proc.wait()
    err = proc.stderr.read()[-1500:]
    for job in jobs:
        if job["name"] not in done:
            why = "timed out" if proc.returncode in (-9, None) else f"exit {proc.returncode}"
            yield {**job, "error": f"worker {why}: {err.strip()[-600:]}"}


def plot(rows: list[dict], path: Path) -> None:
    """Seed-samples/s against members and against devices, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, section, key, label in ((axes[0], "members", "members", "members (seeds) per sweep"),
                                    (axes[1], "devices", "devices", "devices")):
        pts = sorted((r[key], r["seed_samples_per_s"]) for r in rows
                     if r["section"] == section and "seed_samples_per_s" in r
                     and not r["name"].endswith("one_device"))
        if pts:
            xs, ys = zip(*pts, strict=True)
            ax.plot(xs, ys, "o-")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel("seed-samples / s")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_title("online ER, MLP: sweep size")
    axes[1].set_title("online ER, MLP: 16 members over devices")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small streams: a smoke test")
    p.add_argument("--sections", help=f"comma-separated subset of {', '.join(SECTIONS)}")
    p.add_argument("--out", default="bench_results", help="directory for suite.json and PNG")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per worker process")
    p.add_argument("--data-dir", help="directory with MNIST (e.g. ../shared/data): the MLP rows "
                   "then train on real split-MNIST instead of synthetic data")
    p.add_argument("--learners", help="comma-separated learners for the compile section "
                   "(default: every registered learner on a CPU, four on a GPU)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(json.loads(args.worker))
        return 0
    sections = SECTIONS if not args.sections else tuple(args.sections.split(","))
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        p.error(f"unknown section(s) {', '.join(sorted(unknown))}; choose from "
                f"{', '.join(SECTIONS)}")

    import jax

    from ocljax.run.results import write_atomic

    gpu = jax.default_backend() == "gpu"
    kind = jax.devices()[0].device_kind
    out_dir = Path(args.out).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    data_dir = str(Path(args.data_dir).resolve()) if args.data_dir else None
    jobs = plan(gpu, args.quick, sections, data_dir)
    if args.learners:
        from ocljax import learners
        from ocljax.errors import OCLError

        chosen = args.learners.split(",")
        for name in chosen:
            try:
                learners.get(name)
            except OCLError as err:
                p.error(str(err))
        jobs = [{**j, "learners": chosen} if j["kind"] == "compile" else j for j in jobs]
    bw = next((v for k, v in HBM_BYTES_PER_S.items() if k in kind), None) if gpu else None
    ctx = {"torch": {}, "hbm_bytes_per_s": bw}
    meta = {"benchmark": "ocljax suite", "quick": args.quick, "backend": jax.default_backend(),
            "device_kind": kind, "devices": len(jax.devices()), "host": platform.node(),
            "cpu_count": os.cpu_count(), "hbm_bytes_per_s": bw,
            "started": time.strftime("%Y-%m-%d %H:%M:%S"), "mlp_weights": MLP_WEIGHTS,
            "train_flops_per_incoming_sample": 2 * train_flops_per_sample(784),
            "mlp_data": "mnist" if data_dir else "synthetic"}
    print(f"ocljax benchmark suite on {meta['backend']} ({kind}), {len(jobs)} jobs", flush=True)
    rows = []
    groups: list[tuple[tuple, list[dict]]] = []
    for job in jobs:  # consecutive jobs with the same process key share a worker
        key = process_key(job, gpu)
        if groups and groups[-1][0] == key:
            groups[-1][1].append(job)
        else:
            groups.append((key, [job]))
    for key, group in groups:
        cpu_devices = key[1] if len(key) > 1 else None
        for row in run_group(group, cpu_devices, args.timeout, args.quick):
            if row["kind"] == "peak" and "error" not in row:
                ctx["peak"] = row
            if row["kind"] == "torch" and "error" not in row:
                ctx["torch"][row["model"]] = row["samples_per_s"]
            rows.append(derive(row, ctx))
            print(describe(rows[-1]), flush=True)
            write_atomic(out_dir / "suite.json",
                         json.dumps({**meta, "rows": rows}, indent=1) + "\n")
    if any(r["section"] in ("members", "devices") for r in rows):
        try:
            plot(rows, out_dir / "scaling.png")
        except ImportError:
            print("matplotlib is not installed: no scaling.png", flush=True)
    print(f"wrote {out_dir / 'suite.json'}", flush=True)
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
