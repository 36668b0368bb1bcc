"""``python -m ocljax.report``: tables from run directories, checked on hand-written summaries
and on a real run."""

import csv
import io
import json

import numpy as np
import pytest

from ocljax import report
from ocljax.cli import main as cli_main
from ocljax.errors import DataError


def fake_run(path, experiment, groups, task_free=True, complete=True):
    path.mkdir(parents=True)
    variants = [{"label": g[0], "learner": g[0].split("@")[0],
                 "stream": {"task_free": task_free, "iid": g[0].endswith("@iid")}}
                for g in groups]
    (path / "config.json").write_text(json.dumps(
        {"experiment": experiment, "dataset": "mnist", "variants": variants,
         "command": [experiment, "--learner", groups[0][0]]}))
    summary = {"complete": complete, "groups": [
        {"variant": label, "hparams": hp, "n": 5, "n_diverged": nd,
         **{m: {"mean": None, "std": None} for m in report.METRICS},
         "final_average_accuracy": {"mean": acc, "std": 0.01},
         "forgetting": {"mean": fgt, "std": 0.02}}
        for label, hp, acc, fgt, nd in groups]}
    (path / "summary.json").write_text(json.dumps(summary))
    return path


def test_table_marks_best_per_column_and_boundaries(tmp_path):
    a = fake_run(tmp_path / "a", "split_mnist", [("er", {}, 0.90, 0.05, 0)])
    b = fake_run(tmp_path / "b", "split_mnist", [("icarl", {}, 0.85, 0.02, 1)], task_free=False)
    c = fake_run(tmp_path / "c", "permuted_mnist", [("agem", {}, 0.7, 0.1, 0),
                                                    ("finetune@iid", {}, 0.9, 0.0, 0)])
    rows = [*report.load_run(a), *report.load_run(b), *report.load_run(c)]
    text = report.markdown(rows)
    split, perm = text.split("### permuted_mnist")
    assert "| er | **0.900 ± 0.010** | n/a | 0.050 ± 0.020 | n/a | 5 |" in split
    # lower forgetting is better; the boundary-aware row is starred, its divergence counted
    assert "| icarl* | 0.850 ± 0.010 | n/a | **0.020 ± 0.020** | n/a | 5 (1 diverged) |" in split
    assert "**0.700 ± 0.010**" in perm  # each benchmark has its own best ...
    assert "| finetune@iid | 0.900 ± 0.010 |" in perm  # ... and upper bounds are not ranked
    parsed = list(csv.DictReader(io.StringIO(report.to_csv(rows))))
    assert [r["variant"] for r in parsed] == ["er", "icarl", "agem", "finetune@iid"]
    assert parsed[1]["boundaries"] == "True" and parsed[0]["boundaries"] == "False"
    assert float(parsed[0]["final_average_accuracy_mean"]) == 0.9


def test_grids_show_hparams_and_incomplete_runs_are_labelled(tmp_path):
    a = fake_run(tmp_path / "a", "x", [("er", {"lr": 0.1}, 0.5, 0.1, 0),
                                       ("er", {"lr": 0.3}, 0.6, 0.1, 0)], complete=False)
    text = report.markdown(report.load_run(a))
    assert "er (incomplete) lr=0.1" in text and "er (incomplete) lr=0.3" in text


def test_missing_or_corrupt_run_dirs_are_clear_errors(tmp_path, capsys):
    with pytest.raises(DataError, match="not a finished run directory"):
        report.load_run(tmp_path)
    bad = fake_run(tmp_path / "bad", "x", [("er", {}, 0.5, 0.1, 0)])
    (bad / "summary.json").write_text("{not json")
    with pytest.raises(DataError, match="corrupt JSON"):
        report.load_run(bad)
    assert report.main([str(bad)]) == 2
    assert "corrupt JSON" in capsys.readouterr().err
    assert report.main([str(tmp_path / "bad"), "--columns", "nope"]) == 2


def test_report_of_a_real_run_writes_markdown_and_csv(tmp_path, capsys):
    run = tmp_path / "run"
    assert cli_main(["--dataset", "synthetic", "--n-tasks", "2", "--set", "width=16",
                     "--set", "depth=1", "--eval-every", "10", "--quiet", "--no-plots",
                     "--learner", "finetune,er", "--seeds", "2", "--out", str(run)],
                    prog="t") == 0
    capsys.readouterr()
    assert report.main([str(run), "--out", str(tmp_path / "rep")]) == 0
    printed = capsys.readouterr().out
    assert "| finetune* |" in printed and "| er* |" in printed and "±" in printed
    assert (tmp_path / "rep" / "report.md").read_text().strip() == printed.strip()
    assert len((tmp_path / "rep" / "report.csv").read_text().splitlines()) == 3


# --- plots, HTML and TensorBoard from hand-written run directories ---------------------------

def rich_run(path, blind=True):
    """Two tasks, groups er (seeds 0, 1; seed 2 diverged) and finetune (seed 0); evaluations at
    steps 0 (initial), 10, 20 (end of task 0), 30, 40 (end of task 1)."""
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({
        "experiment": "split_x", "dataset": "synthetic",
        "variants": [{"label": v, "learner": v, "stream": {"task_free": True, "iid": False}}
                     for v in ("er", "finetune")],
        "command": ["experiments.split_x", "--learner", "er,finetune", "--out", "a b"]}))
    R = {0: [[0.8, 0.0], [0.6, 0.9]], 1: [[1.0, 0.0], [0.4, 0.7]], 2: [[0.0, 0.0], [0.0, 0.0]],
         3: [[0.5, 0.0], [0.0, 1.0]]}
    members = [{"member": m, "variant": v, "seed": s, "hparams": {"lr": 0.1},
                "acc_matrix": R[m], "diverged": m == 2, "diverged_block": 1 if m == 2 else None}
               for m, v, s in ((0, "er", 0), (1, "er", 1), (2, "er", 2), (3, "finetune", 0))]
    stats = {"er": {"online_accuracy": {"mean": 0.972, "std": 0.001},
                    "near_future_accuracy": {"mean": 0.95, "std": 0.002},
                    "min_accuracy": {"mean": 0.4, "std": 0.1},
                    "flops_per_sample": {"mean": 1.2e9, "std": 0.0},
                    "memory_per_member_bytes": {"mean": 8283750, "std": 0.0},
                    "wall_s_per_member": {"mean": 0.25, "std": 0.0}},
             "finetune": {"online_accuracy": {"mean": 0.5, "std": 0.0},
                          "min_accuracy": {"mean": None, "std": None}}}
    if blind:
        stats["er"]["blind_online_accuracy"] = {"mean": 0.9, "std": 0.0}
        stats["er"]["blind_near_future_accuracy"] = {"mean": 0.875, "std": 0.0}
    groups = [{"variant": v, "hparams": {"lr": 0.1}, "n": n, "n_diverged": nd,
               "final_average_accuracy": {"mean": 0.65, "std": 0.05}, **stats[v]}
              for v, n, nd in (("er", 2, 1), ("finetune", 1, 0))]
    (path / "summary.json").write_text(json.dumps(
        {"complete": True, "members": members, "groups": groups}))
    # acc per member at steps 10, 20, 30, 40 (task 0, 0, 1, 1)
    acc = {0: [[0.5, 0.1], [0.8, 0.0], [0.4, 0.5], [0.6, 0.9]],
           1: [[0.7, 0.1], [1.0, 0.0], [0.2, 0.5], [0.4, 0.7]],
           2: [[None, None]] * 4,
           3: [[0.5, 0.0], [0.5, 0.0], [0.0, 1.0], [0.0, 1.0]]}
    lines = []
    for m in members:
        lines.append({"member": m["member"], "variant": m["variant"], "seed": m["seed"],
                      "hparams": m["hparams"], "step": 0, "kind": "initial", "task": -1,
                      "acc": [0.1, 0.1], "anytime_accuracy": None})
        for k, (step, task, kind) in enumerate(((10, 0, "continual"), (20, 0, "task_end"),
                                                (30, 1, "continual"), (40, 1, "task_end"))):
            a = acc[m["member"]][k]
            any_acc = None if a[0] is None else sum(a[:task + 1]) / (task + 1)
            lines.append({"member": m["member"], "variant": m["variant"], "seed": m["seed"],
                          "hparams": m["hparams"], "step": step, "kind": kind, "task": task,
                          "acc": a, "anytime_accuracy": any_acc,
                          "acc_task_aware": a, "cumulative_accuracy": 0.5})
    (path / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    return path


PLOTS = ("accuracy_matrix_grid.png", "anytime_accuracy.png", "online_near_future_blind.png",
         "stability_gap.png")


def test_blind_numbers_sit_beside_online_and_near_future_accuracy(tmp_path):
    rows = report.load_run(rich_run(tmp_path / "r"))
    text = report.markdown(rows, ["online_accuracy", "near_future_accuracy",
                                  "blind_online_accuracy"])
    assert ("| er | **0.972 ± 0.001** (blind 0.90) | **0.950 ± 0.002** (blind 0.88) "
            "| 0.900 ± 0.000 | 2 (1 diverged) |") in text  # blind column itself is not ranked
    assert "| finetune | 0.500 ± 0.000 | n/a | n/a | 1 |" in text
    assert "`(blind x)`" in text
    # without blind numbers the cell and the note are as before; the default columns gain
    # near-future accuracy, beside online accuracy, when the run measured it
    plain = report.markdown(report.load_run(rich_run(tmp_path / "p", blind=False)))
    assert "| online acc ↑ | near-future acc ↑ | seeds |" in plain
    assert "| **0.972 ± 0.001** | **0.950 ± 0.002** | 2 (1 diverged) |" in plain
    assert "blind" not in plain


def test_compute_columns_are_human_readable_and_never_bold(tmp_path):
    rows = report.load_run(rich_run(tmp_path / "r"))
    text = report.markdown(rows, ["flops_per_sample", "memory_per_member_bytes",
                                  "wall_s_per_member", "steps_per_sample"])
    assert "| er | 1.2 GFLOP | 7.9 MiB | 250 ms | n/a | 2 (1 diverged) |" in text
    assert report.human_flops(999.96e6) == "1.0 GFLOP"
    assert report.human_flops(512) == "512 FLOP"
    assert report.human_bytes(900) == "900 B" and report.human_bytes(1536) == "1.5 KiB"
    assert report.human_bytes(3 * 2**40) == "3.0 TiB"  # the driver's memory messages use it too
    assert report.human_seconds(12.34) == "12.3 s" and report.human_seconds(90) == "1.5 min"
    assert report.human_seconds(5400) == "1.5 h"
    rows[0].stats["flops_per_sample"] = {"mean": 2e6, "std": 1e5}
    assert "2.0 MFLOP ± 100.0 kFLOP" in report.markdown(rows, ["flops_per_sample"])


def test_series_are_seed_means_without_diverged_members(tmp_path):
    from ocljax import report_data

    rows = report.load_run(rich_run(tmp_path / "r"))
    names, labels = report.display_names(rows)
    er, ft = report_data.load_series(rows, names, labels)
    assert names == ["er", "finetune"]
    assert er.acc_matrices.shape == (2, 2, 2)  # member 2 diverged
    np.testing.assert_allclose(er.mean_matrix(), [[0.9, 0.0], [0.5, 0.8]])
    np.testing.assert_array_equal(er.steps, [10, 20, 30, 40])  # the initial row is left out
    np.testing.assert_array_equal(er.eval_task, [0, 0, 1, 1])
    assert er.task_ends == {0: 20, 1: 40}
    mean, std = report_data.nan_mean_std(er.anytime)
    np.testing.assert_allclose(mean, [0.6, 0.9, 0.4, 0.65])
    np.testing.assert_allclose(std, [0.1, 0.1, 0.05, 0.1])
    np.testing.assert_allclose(ft.task_acc[0, :, 1], [0.0, 0.0, 1.0, 1.0])
    scalars = report_data.tensorboard_scalars([er, ft])
    assert list(scalars) == ["er", "finetune"]
    assert ("anytime_accuracy/mean", 40, pytest.approx(0.65)) in scalars["er"]
    assert ("accuracy_on_task/0", 30, pytest.approx(0.3)) in scalars["er"]


def test_out_writes_tables_plots_and_a_self_contained_page(tmp_path, capsys):
    run = rich_run(tmp_path / "r")
    out = tmp_path / "rep"
    assert report.main([str(run), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert (out / "report.md").read_text().strip() == printed.strip()
    for name in PLOTS:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    page = (out / "report.html").read_text()
    assert page.count('src="data:image/png;base64,') == 4
    assert "<th>online acc ↑</th>" in page and "<h3>split_x (synthetic)</h3>" in page
    assert ('<td><strong>0.972 ± 0.001</strong> <span class="blind">(blind 0.90)</span></td>'
            in page)
    assert "experiments.split_x --learner er,finetune --out &#x27;a b&#x27;" in page
    parsed = list(csv.DictReader(io.StringIO((out / "report.csv").read_text())))
    assert parsed[0]["blind_online_accuracy_mean"] == "0.9"
    assert parsed[1]["blind_online_accuracy_mean"] == ""


def test_html_escapes_labels(tmp_path):
    run = fake_run(tmp_path / "r", "<b>x</b>", [("er&<i>", {}, 0.5, 0.1, 0)])
    out = tmp_path / "rep"
    assert report.main([str(run), "--out", str(out), "--no-plots"]) == 0
    page = (out / "report.html").read_text()
    assert "&lt;b&gt;x&lt;/b&gt;" in page and "er&amp;&lt;i&gt;" in page
    assert "<b>x</b>" not in page and "<i>" not in page
    assert not any((out / n).exists() for n in PLOTS)


def test_plots_without_their_data_are_skipped(tmp_path, capsys):
    old = fake_run(tmp_path / "old", "x", [("er", {}, 0.5, 0.1, 0)])  # no members, no evals
    out = tmp_path / "rep"
    assert report.main([str(old), "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["report.csv", "report.html", "report.md"]
    assert err.count("skipped") == 4 and "stability_gap.png skipped" in err
    assert "data:image/png" not in (out / "report.html").read_text()
    # a run without the blind metrics still gets its bars; one without eval.jsonl its matrices
    run = rich_run(tmp_path / "r", blind=False)
    (run / "eval.jsonl").unlink()
    out2 = tmp_path / "rep2"
    assert report.main([str(run), str(old), "--out", str(out2)]) == 0
    assert (out2 / "accuracy_matrix_grid.png").exists()
    assert (out2 / "online_near_future_blind.png").exists()
    assert not (out2 / "anytime_accuracy.png").exists()
    assert not (out2 / "stability_gap.png").exists()


def test_tensorboard_export_round_trips(tmp_path, capsys):
    from ocljax.run import tensorboard as tb

    run = rich_run(tmp_path / "r")
    assert report.main([str(run), "--tensorboard", str(tmp_path / "tb")]) == 0
    assert sorted(p.name for p in (tmp_path / "tb").iterdir()) == ["er", "finetune"]
    got = tb.read_scalars(tmp_path / "tb" / "finetune" / tb.EVENT_FILE)
    f32 = lambda x: float(np.float32(x))  # noqa: E731
    want = []
    for step, anytime, a0, a1 in ((10, 0.5, 0.5, 0.0), (20, 0.5, 0.5, 0.0),
                                  (30, 0.5, 0.0, 1.0), (40, 0.5, 0.0, 1.0)):
        want += [("anytime_accuracy/mean", step, f32(anytime)), ("anytime_accuracy/std", step, 0.0),
                 ("accuracy_on_task/0", step, f32(a0)), ("accuracy_on_task/1", step, f32(a1))]
    assert got == want
    er = tb.read_scalars(tmp_path / "tb" / "er" / tb.EVENT_FILE)
    assert ("anytime_accuracy/mean", 40, f32(0.65)) in er
    # no eval.jsonl: nothing to write, said on stderr, still exit 0
    capsys.readouterr()
    old = fake_run(tmp_path / "old", "x", [("er", {}, 0.5, 0.1, 0)])
    assert report.main([str(old), "--tensorboard", str(tmp_path / "tb2")]) == 0
    assert "no evaluation curves" in capsys.readouterr().err


def test_cli_rejects_non_run_directories_and_bad_flags(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert report.main([str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert "ocljax.report: error:" in err and "not a finished run directory" in err
    assert "config.json" in err
    (tmp_path / "file").write_text("x")
    assert report.main([str(tmp_path / "file")]) == 2
    assert "not a run directory" in capsys.readouterr().err
    run = rich_run(tmp_path / "r")
    assert report.main([str(run), "--html"]) == 2
    assert "give --out DIR" in capsys.readouterr().err
    (run / "eval.jsonl").write_text('{"member": 0}\n{broken\n')
    assert report.main([str(run), "--out", str(tmp_path / "o")]) == 2
    assert "eval.jsonl:2: corrupt JSON" in capsys.readouterr().err


def test_pool_merges_separate_seed_runs_into_the_sweep_they_split(tmp_path, capsys):
    """Seeds 0 and 1 run separately, pooled, give the statistics, matrices and curves of the
    2-seed sweep (seed i of a sweep equals a single run with seed i); a seed held twice is
    refused, and rows of other settings are left alone."""
    from ocljax import report_data

    tiny = ["--dataset", "synthetic", "--n-tasks", "2", "--set", "width=16", "--set", "depth=1",
            "--eval-every", "10", "--quiet", "--no-plots", "--learner", "er",
            "--probe-per-class", "0"]

    def run(name, *extra):
        assert cli_main([*tiny, *extra, "--out", str(tmp_path / name)], prog="t") == 0
        return tmp_path / name

    both = run("both", "--seeds", "2")
    first, second = run("s0", "--seeds", "1"), run("s1", "--seeds", "1", "--seed", "1")
    other = run("lr", "--seeds", "1", "--seed", "1", "--set", "lr=0.3")
    capsys.readouterr()
    (want,) = report.load_run(both)
    rows = report.pool([*report.load_run(first), *report.load_run(second),
                        *report.load_run(other)])
    assert len(rows) == 2 and rows[1].hparams == {"lr": 0.3} and not rows[1].pooled
    got = rows[0]
    assert got.n == 2 and got.run_dirs == [str(first), str(second)]
    for metric, stat in want.stats.items():
        if stat is None or metric in report.QUANTITIES:  # wall time, memory: per sweep
            continue
        assert got.stats[metric] == pytest.approx(stat, abs=1e-12), metric
    names, labels = report.display_names([want, got])
    a, b = report_data.load_series([want, got], names, labels)
    np.testing.assert_allclose(b.acc_matrices, a.acc_matrices)
    np.testing.assert_allclose(b.anytime, a.anytime)
    assert [d for d, _ in report.run_commands(rows)] == [str(first), str(second), str(other)]
    # the CLI: the pooled table reads like the sweep's
    assert report.main([str(first), str(second), "--pool", "--columns",
                        "final_average_accuracy,forgetting"]) == 0
    assert "| 2 |" in capsys.readouterr().out
    with pytest.raises(DataError, match="seed 0 of er is in both"):
        report.pool([*report.load_run(first), *report.load_run(both)])
    # a folder named twice pools with nobody; other settings stay apart, with a warning
    assert report.main([str(first), str(first), "--pool"]) == 0
    capsys.readouterr()
    other_tasks = run("t3", "--seeds", "1", "--seed", "1", "--set", "samples_per_task=40")
    said = []
    rows = report.pool([*report.load_run(first), *report.load_run(other_tasks)], said.append)
    assert len(rows) == 2 and not rows[0].pooled
    assert len(said) == 1 and "not pooled" in said[0] and "stream.samples_per_task" in said[0]
    # a run made before streams had ``blurry`` and ``max_rotation`` (and models ``init`` and
    # ``input_norm``) pools with a newer one
    cfg = json.loads((second / "config.json").read_text())
    for v in cfg["variants"]:
        del v["stream"]["blurry"], v["stream"]["max_rotation"]
        del v["model"]["init"], v["model"]["input_norm"]
    (second / "config.json").write_text(json.dumps(cfg))
    assert len(report.pool([*report.load_run(first), *report.load_run(second)])) == 1
    # ... but a setting away from its default still keeps runs apart
    assert report._settings({"stream": {"blurry": 0.1}}) != report._settings({"stream": {}})
    assert report._settings({"stream": {"blurry": 0.0}}) == report._settings({"stream": {}})
    assert report._settings({"model": {"init": "torch"}}) != report._settings({"model": {}})
    # a run whose config does not describe its variant is never pooled
    cfg = json.loads((second / "config.json").read_text())
    (second / "config.json").write_text(json.dumps({**cfg, "variants": []}))
    assert len(report.pool([*report.load_run(first), *report.load_run(second)])) == 2


def test_pool_leaves_out_a_metric_only_some_runs_measured(tmp_path):
    a, b = rich_run(tmp_path / "a"), rich_run(tmp_path / "b")
    summary = json.loads((b / "summary.json").read_text())
    for m in summary["members"]:
        m["seed"] += 10
        m["final_average_accuracy"] = 0.5
    for g in summary["groups"]:  # run b did not measure online accuracy
        g["online_accuracy"] = {"mean": None, "std": None}
    (b / "summary.json").write_text(json.dumps(summary))
    summary_a = json.loads((a / "summary.json").read_text())
    for m in summary_a["members"]:
        m["final_average_accuracy"], m["online_accuracy"] = 0.7, 0.9
    (a / "summary.json").write_text(json.dumps(summary_a))
    er, _ = report.pool([*report.load_run(a), *report.load_run(b)])
    assert er.n == 4 and er.n_diverged == 2  # two members of each run, one diverged in each
    assert er.stats["final_average_accuracy"]["mean"] == pytest.approx(0.6)
    assert er.stats["online_accuracy"]["mean"] is None
