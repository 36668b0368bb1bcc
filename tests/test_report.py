"""``python -m ocljax.report``: tables from run directories, checked on hand-written summaries
and on a real run."""

import csv
import io
import json

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
