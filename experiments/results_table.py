"""Reproduce ``docs/results.md``: every learner on split MNIST, permuted MNIST and split
Fashion-MNIST, 5 seeds each, one command per row.

    python -m experiments.results_table --data-dir ../shared/data          # all rows
    python -m experiments.results_table --dry-run                          # print the commands
    python -m experiments.results_table --benchmarks split_mnist --learners er,agem

Each row is ``python -m experiments.BENCHMARK --learner NAME --out runs/results/BENCHMARK/NAME``
with the benchmark's preset and the learner's own defaults (the paper's settings; see each
learner's docstring). Rows whose run directory is already complete are skipped, so an
interrupted reproduction resumes where it stopped. Learners that need task boundaries run with
``--no-task-free`` (starred in the table); GDumb evaluates at task ends only (it retrains from
scratch at every evaluation). The page is rewritten from whatever rows exist after every row,
with the anchor runs (``experiments.agem_pmnist``, with standardised and with [0, 1] inputs)
whose run directories exist.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from experiments import agem_pmnist
from ocljax import learners, report
from ocljax.errors import OCLError
from ocljax.run.results import write_atomic

BENCHMARKS = ("split_mnist", "permuted_mnist", "split_fashion_mnist")
LEARNERS = ("finetune", "finetune@iid", "er", "er_ace", "er_aml", "der", "derpp", "clser",
            "mir", "dvc", "aser", "gss", "gem", "agem", "rar", "scr", "pcr", "cope", "ocm", "onpro",
            "gsa", "gdumb", "icarl", "lwf", "ewc_online", "mas", "er_ncm")
# OCM, OnPro and GSA: their Adam learning rates; OCM and OnPro 2 seeds (each step costs ~150
# ER steps)
EXTRA = {"gdumb": ["--eval-every", "0"],
         "ocm": ["--set", "lr=0.001", "--seeds", "2"],
         "onpro": ["--set", "lr=0.0005", "--seeds", "2"],
         "gsa": ["--set", "lr=0.001"]}
ANCHOR = "agem_pmnist"
# the anchor's run directories under the root: the preset's settings (5 seeds, then 10), then
# three variations
ANCHOR_RUNS = (ANCHOR, f"{ANCHOR}_10", f"{ANCHOR}_cyclic", f"{ANCHOR}_flaxinit", f"{ANCHOR}_unit")
ANCHOR_SEEDS = agem_pmnist.PRESET["seeds"]  # the preset's seed count
# runs of one setting that differ only in their seeds, shown pooled (``report.pool``) after the
# runs: seeds 0-9, then 10-19 (``--seed 10 --seeds 10``)
ANCHOR_POOLS = ((f"{ANCHOR}_10", f"{ANCHOR}_10b"),)
# experiments.agem_pmnist's settings; a run made before a setting existed has its default
PRESET = {"input_norm": "standard", "init": "torch", "ref_draw": "random"}
DEFAULTS = {"input_norm": "unit", "init": "flax", "ref_draw": "cyclic"}


def anchor_heading(run: Path, seeds: int | None = None) -> tuple[str, str]:
    """(heading, extra command-line settings) of an anchor run, from its own config.json (a
    run made before a setting existed has that setting's default; a seed count other than
    the preset's is named too, ``seeds`` when given: the count of runs pooled)."""
    variant = json.loads((run / "config.json").read_text())["variants"][0]
    given = {**variant["model"], **variant["learner_config"]}
    got = {key: given.get(key, default) for key, default in DEFAULTS.items()}
    parts = ["inputs standardised (0.1307 / 0.3081)" if got["input_norm"] == "standard" else
             "[0, 1] inputs",
             "PyTorch's initialisation" if got["init"] == "torch" else "Flax's initialisation",
             "reference rows drawn with replacement" if got["ref_draw"] == "random" else
             "reference rows read cyclically"]
    heading = ", ".join(parts)
    if got == PRESET:
        heading = "Avalanche's protocol: " + heading
    extra = "".join(f" --set {key}={value}" for key, value in got.items()
                    if value != PRESET[key])
    seeds = seeds or variant.get("n_members", ANCHOR_SEEDS)
    if seeds != ANCHOR_SEEDS:
        heading += f", {seeds} seeds"
        extra = f" --seeds {seeds}" + extra
    return heading[0].upper() + heading[1:], extra


NOTES = """## Notes on the numbers

- **ER on split MNIST**: 0.909 ± 0.011 against 0.92 in Avalanche's reference run of the same
  setting: within about one standard deviation.
- **A-GEM anchor** (Avalanche: 0.81 on 17-task permuted MNIST, full 60,000 images per task,
  one run, reported to two decimals): `python -m experiments.agem_pmnist` runs Avalanche's
  protocol (17 tasks, MLP 2x256, 250 patterns per task, reference batch 256, batch 10, SGD lr
  0.1, one pass, 102,000 steps per seed). Its 10-seed run (`--seeds 10`) took 44 min on the
  2-core AMD EPYC host, sharing it with other jobs, since the ninth round's faster projection
  (5 seeds would have taken over 6 hours there before it). The preset has three details of
  Avalanche's run that are not in the A-GEM paper; the first one decides the number:
  - *Input scale.* Avalanche's default MNIST transform standardises pixels (mean 0.1307, std
    0.3081), so the background pixels are -0.42, not 0, and every first-layer weight moves on
    every task; with [0, 1] pixels (the A-GEM paper's code) each permutation mostly moves its
    own weights. Standardising took final accuracy from 0.902 ± 0.002 to 0.793 ± 0.009 and
    nearly tripled forgetting (0.060 to 0.165; both with Flax's initialisation and the cyclic
    draw, before the ninth round). Repeated in the tenth round: 0.903 ± 0.002 with [0, 1]
    inputs (per seed 0.902, 0.907, 0.904, 0.899, 0.904) against 0.799 ± 0.015 standardised
    (per seed 0.782, 0.812, 0.818, 0.803, 0.780), the sections above.
  - *Initialisation.* PyTorch's default (uniform, std 1/sqrt(3 fan-in), biases too) against
    Flax's LeCun normal (std 1/sqrt(fan-in), zero biases): no effect on the mean beyond the
    spread over seeds (0.793 ± 0.004 against 0.793 ± 0.009 before the ninth round, 0.787 ±
    0.028 against 0.799 ± 0.015 in the tenth, cyclic draw).
  - *Reference draw.* Avalanche 0.1-0.3, the versions that set (October 2021) and confirmed
    (December 2022) the 0.81, draw each stored task's `256 // n` reference rows uniformly with
    replacement; since 0.4 they are read cyclically. Both are `--set ref_draw=random|cyclic`;
    the preset uses `random`. It does not close the gap: 0.789 ± 0.010 against 0.793 ± 0.004
    cyclic, 5 seeds each, before the ninth round; rerun in the tenth, the cyclic draw gave
    0.787 ± 0.028 (per seed 0.807, 0.813, 0.783, 0.795, 0.735; the section above), against
    0.796 ± 0.011 for the random draw's seeds 0-4.
  - *Rounding decides single seeds.* The preset's 5-seed table above was run before the
    ninth round, whose projection sums the same inner products leaf by leaf: the update is
    the same up to float32 rounding. Over 102,000 steps that
    rounding moves single seeds by up to 3 points: seeds 0-4 gave 0.787, 0.790, 0.777, 0.786,
    0.807 before and 0.808, 0.805, 0.795, 0.798, 0.776 after (0.796 ± 0.011). Only means over
    seeds carry over between versions.
  **Over 20 seeds the protocol gives 0.794 ± 0.012**: seeds 0-9 gave 0.797 ± 0.011 (per seed
  0.808, 0.805, 0.795, 0.798, 0.776, 0.817, 0.800, 0.785, 0.793, 0.794;
  `docs/bench/agem_pmnist_10/`), seeds 10-19 (`--seed 10 --seeds 10`, 43 min) 0.790 ± 0.011
  (per seed 0.794, 0.781, 0.808, 0.796, 0.807, 0.781, 0.786, 0.771, 0.792, 0.787;
  `docs/bench/agem_pmnist_10b/`); `python -m ocljax.report docs/bench/agem_pmnist_10
  docs/bench/agem_pmnist_10b --pool` pools them. That is 1.6 points, 1.4 standard deviations,
  below the published 0.81. (Seeds 10-19 were run to sharpen the estimate, with the decision
  taken beforehand to report the pooled 20 whatever they gave.) Five seeds of 20 (0, 1, 5, 12,
  14) reach 0.805 and would be reported as 0.81 at two decimals.
  **An independent PyTorch loop agrees with ocljax**:
  `python -m benchmarks.torch_agem --data-dir ../shared/data --seeds 0,1,2,3,4 --ref-draw
  random`, written from the paper and Avalanche's protocol and sharing no code with ocljax,
  gives **0.795 ± 0.006** (per seed 0.794, 0.800, 0.785, 0.799, 0.795;
  `docs/bench/torch_agem_random.json`) with the preset's draw, and **0.798 ± 0.012** (per
  seed 0.786, 0.802, 0.795, 0.817, 0.791; `docs/bench/torch_agem_cyclic.json`) with the
  cyclic one.
  **Avalanche's own code gives the same distribution, and 0.81 is one of its better seeds**
  (eleventh round). `benchmarks/avalanche_agem.py` runs avalanche-lib 0.6.0 (the oldest
  release pip offers for Python 3.11) as the continual-learning-baselines experiment does:
  `PermutedMNIST(17)` with Avalanche's transforms, an MLP 784-256-256-10 in PyTorch's
  initialisation, `avalanche.training.AGEM` with 250 patterns per experience, a 256-row
  reference sample, SGD lr 0.1, batch 10, one epoch; only the reference rows are drawn
  uniformly with replacement, as in Avalanche 0.1-0.3, instead of 0.6's cyclic read.
  Over 14 seeds (`--seeds 0,...,13`, 12 min per seed on one core; decided to extend from
  10 to 14 seeds after the first 6 had finished, before looking at any of seeds 10-13) it
  gives **0.797 ± 0.011** (per seed 0.800, 0.780, 0.793, 0.804, 0.787, 0.813, 0.808, 0.788,
  0.804, 0.804, 0.781, 0.795, 0.791, 0.814; `docs/bench/avalanche_agem_random.json`). The
  published 0.81 sits 1.2 of Avalanche's own standard deviations above Avalanche's own mean,
  and 3 of its 14 seeds reach 0.805. Against ocljax's 20 seeds, `python
  benchmarks/avalanche_agem.py --seeds '' --json docs/bench/avalanche_agem_random.json
  --compare docs/bench/agem_pmnist_10 docs/bench/agem_pmnist_10b` gives Avalanche − ocljax
  = **+0.0035 ± 0.0040** (Welch, t = 0.87, p = 0.39, 95% interval [−0.005, +0.012]): no
  difference that 34 seeds can see, and ocljax's mean is 0.3 of Avalanche's standard
  deviation from Avalanche's. **So ocljax matches Avalanche's A-GEM within one standard
  deviation of Avalanche's own run-to-run spread**, which is how we read the issue's anchor;
  read literally against the single published number, ocljax misses it by 1.4 of its
  standard deviations, and Avalanche's own runs miss it by 1.2 of theirs. Avalanche's own
  reproduction test accepts anything down to 0.03 below 0.81 (0.02 when the target was set),
  which both meet. The [0, 1]-input run (0.903) is close to the
  A-GEM paper's own permuted-MNIST figure (about 0.89, Chaudhry et al. 2019).
- **A-GEM on the split benchmarks** (0.52 / 0.46) is far below replay: it only stops the
  gradient from raising the memory loss, which does not prevent class-incremental forgetting
  of the output layer; the DER paper (Buzzega et al. 2020) reports the same pattern.
- **LwF, online EWC and MAS** end at finetune's level on the class-incremental split
  benchmarks (0.20), as van de Ven et al. 2019 and the survey of Mai et al. 2022 report for
  regularisation without replay; on permuted MNIST (domain-incremental) they gain 2-4 points.
- **GDumb and iCaRL on permuted MNIST** (0.18 / 0.22) are class-incremental methods on a
  domain-incremental stream: GDumb's class-balanced memory fills with the first task (every
  later sample's class already holds its share), so its model never sees later permutations;
  iCaRL's herding per class mixes tasks in one class mean. Both behave as their rules say.
- **SCR on permuted MNIST** trains on its stream rows and a jittered view only: the default
  view is a random resized crop, and a crop of permuted pixels is not a view of the same digit,
  so on permuted streams ocljax drops the crop (and refuses an explicit one). With the crop the
  same command gave 0.683 ± 0.010, below finetune; without it 0.807 ± 0.006.
- **Loss scale of MIR and RAR.** Both run ER's loss, one mean over the 10 incoming and 10
  replayed rows. The authors' code (and the survey code of Mai et al.) adds the incoming mean
  and the replayed mean instead, which with 10 + 10 rows and plain SGD is the same update at
  twice the learning rate: `--set replay_loss=sum` runs that convention. ER-ACE here keeps the
  model's linear head; its authors' code trains it with a cosine head.
- **Online accuracy** of GDumb is that of the untrained network (it has no model during the
  stream); SCR's is nearest-class-mean over the replayed rows; ER-ACE's is lower because new
  classes only compete among themselves in the incoming loss. Finetune's high online accuracy
  on split streams is label correlation (every batch of a task has the same two classes).
- **CoPE** at the presets' settings (lr 0.1, 1,000 rows, MLP width 256) gives 0.913 on split
  MNIST; with its authors' (lr 0.01, 2,000 rows, width 400; README) 0.939 ± 0.007 against the
  paper's 94.11 ± 0.76. On permuted MNIST (0.730, below ER) its prototypes, moved at momentum
  0.99, trail tasks of 1,000 samples; its online accuracy is low for the same reason.
- **OCM and OnPro** train with Adam at their authors' rates and on 2 seeds: each step pushes
  2,368 copies and views through the network (OCM: 50 minutes for its 2-seed split-MNIST row
  on this host). After the first task their incoming rows get no cross-entropy (only the
  memory rows do), which is why their online accuracy is low. On permuted MNIST the command
  line drops their crops (OCM: 0.311 with the crop, 0.697 without; finetune 0.687) and warns
  that their copies move permuted pixels.
- The presets' `lr=0.1`, `buffer_size`, `replay_batch=10` apply to every learner that has
  the setting (SCR's paper replays 100 rows; GDumb's uses lr 0.05; OCM's and OnPro's rows set
  their Adam rates); other settings are each
  learner's defaults, listed in its docstring. Wall times were measured while other jobs
  shared the 2 cores and are upper bounds.
"""

HEADER = """# Reproduction table

Produced by `python -m experiments.results_table --data-dir ../shared/data` (one
`python -m experiments.BENCHMARK --learner NAME` run per row, listed below the tables) on the
machine named at the end. Every row is 5 seeds (OCM and OnPro: 2, each of their steps costs
about 150 of ER's); mean ± std over seeds.

- **final acc**: average accuracy over all tasks after the last task; **anytime acc**: average
  over the stream of the accuracy on the tasks seen so far, each continual evaluation weighted
  by the steps since the previous one (runs made before 2026-11-29 took the plain mean of the
  evaluations, a few thousandths away on these schedules, where only each task's last, shorter
  block weighs differently: of this page, the anchor runs with 10 seeds and with other
  settings, whose config.json is older); **forgetting**: mean
  over tasks but the last of (best accuracy on the task) − (final accuracy on it); **online
  acc**: test-then-train accuracy on the incoming batches. Definitions in `ocljax/metrics`.
- Benchmarks (presets in `experiments/`): split MNIST and split Fashion-MNIST are 5 tasks of 2
  classes, all training images, batch 10, one pass, MLP 784-256-256-10, SGD lr 0.1, task-free;
  permuted MNIST is 10 tasks of 1,000 images each (GEM's protocol), batch 10, one pass.
  Replay methods use a 1,000-sample memory (500 on permuted MNIST) unless their docstring
  says otherwise. OCM and OnPro train with Adam at their authors' rates (1e-3, 5e-4).
"""


def row_dir(root: Path, bench: str, learner: str) -> Path:
    """Run directory of one row."""
    return root / bench / learner.replace("@", "-")


def complete(path: Path) -> bool:
    """Whether ``path`` holds a finished run."""
    try:
        return json.loads((path / "summary.json").read_text()).get("complete", False)
    except (FileNotFoundError, json.JSONDecodeError):
        return False


def command(bench: str, learner: str, root: Path, data_dir: str | None) -> list[str]:
    """The command that produces one row."""
    cmd = [sys.executable, "-m", f"experiments.{bench}", "--learner", learner,
           "--out", str(row_dir(root, bench, learner)), "--overwrite", "--no-plots", "--quiet"]
    name = learner.partition("@")[0]
    try:
        learners.check_stream(name, True)
    except OCLError:
        cmd.append("--no-task-free")
    cmd += EXTRA.get(name, [])
    if data_dir:
        cmd += ["--data-dir", data_dir]
    return cmd


def pooled_anchor(runs: list[Path]) -> list[str]:
    """The page's section for anchor runs that differ only in their seeds, pooled into one
    row (``report.pool``); nothing until every one of them is complete."""
    if not all(complete(r) for r in runs):
        return []
    why: list[str] = []
    try:
        rows = report.pool([r for d in runs for r in report.load_run(d)], why.append)
    except OCLError as err:  # e.g. a seed in two of the runs: the page goes on without it
        why.append(str(err))
        rows = []
    if len(rows) != 1 or not rows[0].pooled:
        return [f"_{' and '.join(map(str, runs))} could not be pooled: "
                f"{'; '.join(why) or 'their rows differ'}._"]
    head, _ = anchor_heading(runs[0], seeds=rows[0].n + rows[0].n_diverged)
    commands = [" ".join(["python -m", *argv]) for _, argv in report.run_commands(rows)]
    return [f"### {head}, {len(runs)} runs pooled",
            " and ".join(f"`{c}`" for c in commands) + ", then `python -m ocljax.report "
            + " ".join(map(str, runs)) + " --pool`", report.markdown(rows)]


def write_page(root: Path, page: Path) -> None:
    """Rewrite the results page from every complete row under ``root``."""
    rows, commands = [], []
    for bench in BENCHMARKS:
        for learner in LEARNERS:
            d = row_dir(root, bench, learner)
            if complete(d):
                rows += report.load_run(d)
                cfg = json.loads((d / "config.json").read_text())
                commands.append((bench, learner, cfg.get("wall_s"), cfg.get("versions", {})))
    parts = [HEADER, report.markdown(rows) if rows else "_No rows yet._"]
    anchor_parts = []
    for name in ANCHOR_RUNS:
        anchor = root / name
        if complete(anchor):
            head, extra = anchor_heading(anchor)
            anchor_parts += [f"### {head}", "`python -m experiments.agem_pmnist --data-dir "
                             f"../shared/data --out {anchor}{extra}`",
                             report.markdown(report.load_run(anchor))]
        for names in ANCHOR_POOLS:  # a pool follows its first run
            if names[0] == name:
                anchor_parts += pooled_anchor([root / d for d in names])
    if anchor_parts:
        parts += ["## Anchor: A-GEM on permuted MNIST (17 tasks)", *anchor_parts]
    parts.append(NOTES)
    if commands:
        lines = ["## Commands", "", "Each adds `--data-dir ../shared/data`; starred rows add "
                 "`--no-task-free`.", "", "| command | wall time (s) |", "|---|---|"]
        for bench, learner, wall, _ in commands:
            wall_text = f"{wall:.0f}" if wall else "n/a"
            extra = "".join(f" {a}" for a in EXTRA.get(learner.partition("@")[0], []))
            lines.append(f"| `python -m experiments.{bench} --learner {learner}{extra}` | "
                         f"{wall_text} |")
        v = commands[-1][3]
        lines += ["", f"Machine: {v.get('platform', '?')}; jax {v.get('jax', '?')}, "
                  f"Python {v.get('python', '?')}."]
        parts.append("\n".join(lines))
    write_atomic(page, "\n\n".join(parts) + "\n")


def main(argv=None) -> int:
    """Run the missing rows, then rewrite the page."""
    p = argparse.ArgumentParser(prog="experiments.results_table", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", dest="data_dir")
    p.add_argument("--root", default="runs/results", help="folder of the row run directories")
    p.add_argument("--page", default="docs/results.md")
    p.add_argument("--benchmarks", default=",".join(BENCHMARKS))
    p.add_argument("--learners", default=",".join(LEARNERS))
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    p.add_argument("--page-only", action="store_true", help="rewrite the page, run nothing")
    args = p.parse_args(argv)
    root, page = Path(args.root), Path(args.page)
    benches = [b for b in args.benchmarks.split(",") if b]
    names = [n for n in args.learners.split(",") if n]
    bad = [b for b in benches if b not in BENCHMARKS] + [
        n for n in names if n.partition("@")[0] not in learners.LEARNERS]
    if bad:
        print(f"experiments.results_table: error: unknown {', '.join(bad)}", file=sys.stderr)
        return 2
    failed = []
    for bench in benches:
        for name in names:
            if args.page_only or complete(row_dir(root, bench, name)):
                continue
            cmd = command(bench, name, root, args.data_dir)
            print(" ".join(cmd[1:]), flush=True)
            if args.dry_run:
                continue
            t0 = time.perf_counter()
            rc = subprocess.call(cmd)
            print(f"  -> exit {rc} in {time.perf_counter() - t0:.0f} s", flush=True)
            if rc:
                failed.append(f"{bench}/{name}")
            else:
                write_page(root, page)
    if not args.dry_run:
        page.parent.mkdir(parents=True, exist_ok=True)
        write_page(root, page)
        print(f"wrote {page}")
    if failed:
        print(f"failed rows: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
