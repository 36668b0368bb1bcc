"""Bad input, exhaustively: each case gives one clear message, no traceback, and leaves no
partial results (no run directory, no hidden temporaries beside it)."""

import gzip
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from experiments.quickstart import PRESET
from ocljax import data, streams
from ocljax.cli import main
from ocljax.data import idx
from ocljax.errors import ConfigError, DataError
from ocljax.run import driver

SHARED_MNIST = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"
TINY = ["--seeds", "1", "--set", "width=8", "--no-plots", "--quiet", "--probe-per-class", "0"]

# (id, extra argv, message regex): every one must fail before anything is written
CLI_CASES = [
    ("unknown learner", ["--learner", "nope"], r"unknown learner 'nope'; choose one of"),
    ("unknown dataset", ["--dataset", "cifar1000"], r"unknown dataset 'cifar1000'"),
    ("unknown --set key", ["--set", "bufer_size=5"], r"unknown setting\(s\) bufer_size"),
    ("--set int typo", ["--set", "buffer_size=abc"], r"bad value 'abc' for buffer_size"),
    ("--set float typo", ["--set", "lr=fast"], r"bad value 'fast' for lr: expected float"),
    ("zero batch", ["--batch-size", "0"], r"batch_size must be >= 1"),
    ("zero tasks", ["--n-tasks", "0"], r"n_tasks must be >= 1"),
    ("zero seeds", ["--seeds", "0"], r"--seeds must be >= 1"),
    ("negative eval", ["--eval-every", "-1"], r"eval_every must be >= 0"),
    ("grid of a static setting", ["--learner", "er", "--grid", "buffer_size=10,20"],
     r"buffer_size is a static setting .* --set buffer_size"),
    ("grid of an unknown key", ["--grid", "momentum=0.1,0.9"],
     r"--grid momentum: not a traced hyperparameter of learner"),
    ("needs boundaries on a task-free stream", ["--learner", "icarl", "--task-free"],
     r"icarl needs task boundaries.*er_ncm"),
    ("tasks do not divide the classes", ["--n-tasks", "3"], r"cannot be split into 3"),
    ("batch larger than a task", ["--batch-size", "5000"], r"fewer than batch_size"),
    ("empty task", ["--set", "samples_per_task=5"], r"task 0 has 5 training samples"),
    ("dense eval not a divisor", ["--set", "eval_dense_every=3"],
     r"eval_every \(10\) must be a multiple of eval_dense_every \(3\)"),
    ("dense window without interval", ["--set", "eval_dense_window=9"],
     r"eval_dense_window needs eval_dense_every"),
    ("negative near-future", ["--near-future", "-1"], r"near_future must be >= 0"),
    ("zero chunk", ["--chunk-blocks", "0"], r"--chunk-blocks must be >= 1"),
    ("resume and overwrite", ["--resume", "{out}", "--overwrite"],
     r"--resume continues a run and --overwrite starts it over"),
    ("resume with another --out", ["--resume", "{out}", "--out", "{out}2"],
     r"--resume RUN_DIR names the run directory"),
    ("missing data dir", ["--dataset", "mnist", "--data-dir", "{tmp}/nowhere"],
     r"data directory .*nowhere does not exist"),
    ("data dir without files", ["--dataset", "mnist", "--data-dir", "{tmp}/empty"],
     r"mnist is not available .*--data-dir DIR"),
    ("unknown precision", ["--precision", "fp8"], r"argument --precision: invalid choice"),
    ("unknown model", ["--model", "vit"], r"unknown model 'vit'"),
]


def run_cli(argv, capsys):
    try:
        code = main(argv, prog="experiments.quickstart", description="", preset=PRESET)
    except SystemExit as exit_:  # argparse's own errors
        code = exit_.code
    return code, capsys.readouterr().err


def assert_clean_failure(code, err, pattern, parent: Path, before: set):
    assert code == 2, err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1, err
    import re

    assert re.search(pattern, errors[0]), errors[0]
    assert set(os.listdir(parent)) == before, "partial results left behind"


@pytest.mark.parametrize("case, extra, pattern", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_cli_bad_input(case, extra, pattern, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    out = tmp_path / "runs" / "run"
    out.parent.mkdir()
    extra = [a.format(out=out, tmp=tmp_path) for a in extra]
    argv = [*TINY, *extra] if "--resume" in extra else [*TINY, "--out", str(out), *extra]
    code, err = run_cli(argv, capsys)
    assert_clean_failure(code, err, pattern, out.parent, set())


def damaged_copy(tmp_path: Path, damage) -> Path:
    if not SHARED_MNIST.is_dir():
        pytest.skip("../shared/data/mnist is not present")
    target = tmp_path / "data" / "mnist"
    shutil.copytree(SHARED_MNIST, target)
    damage(target / "t10k-labels-idx1-ubyte.gz")
    return target.parent


def truncate(path: Path):
    path.write_bytes(path.read_bytes()[:100])


def random_bytes(path: Path):
    path.write_bytes(np.random.default_rng(0).bytes(4096))


def wrong_dataset(path: Path):  # a valid IDX file, but not the published one
    path.write_bytes(gzip.compress(bytes([0, 0, 8, 1, 0, 0, 0, 2, 3, 4])))


@pytest.mark.parametrize("damage", [truncate, random_bytes, wrong_dataset])
def test_damaged_data_file_is_named(damage, tmp_path, capsys):
    data_dir = damaged_copy(tmp_path, damage)
    out = tmp_path / "runs" / "run"
    out.parent.mkdir()
    code, err = run_cli([*TINY, "--dataset", "mnist", "--data-dir", str(data_dir), "--out",
                         str(out)], capsys)
    assert_clean_failure(code, err, r"t10k-labels-idx1-ubyte.gz: sha256 .* does not match",
                         out.parent, set())


def test_idx_parser_errors():
    with pytest.raises(DataError, match="bad IDX magic number"):
        idx.parse(bytes([0, 0, 9, 9, 0, 0, 0, 1, 0]), "x.idx")
    with pytest.raises(DataError, match="too short"):
        idx.parse(b"\x00\x00", "x.idx")


def test_not_gzip_without_checksum(tmp_path):
    path = tmp_path / "x.gz"
    path.write_bytes(b"plain text, not gzip")
    with pytest.raises(DataError, match="not a valid gzip file"):
        idx.read_file(path, None)


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_output_directory(tmp_path, capsys):
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o500)
    try:
        code, err = run_cli([*TINY, "--out", str(parent / "run")], capsys)
    finally:
        parent.chmod(0o700)
    assert_clean_failure(code, err, r"cannot write the run directory", parent, set())


def test_existing_run_dir_needs_overwrite_or_resume(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, err = run_cli([*TINY, "--out", str(out)], capsys)
    assert_clean_failure(code, err, r"already exists; pass --overwrite", tmp_path, {"run"})
    assert (out / "keep.txt").read_text() == "mine"


def test_out_is_a_file(tmp_path, capsys):
    out = tmp_path / "run"
    out.write_text("not a directory")
    code, err = run_cli([*TINY, "--out", str(out)], capsys)
    assert_clean_failure(code, err, r"exists and is not a directory", tmp_path, {"run"})


def test_checkpoints_without_resume_and_resume_of_other_settings(tmp_path, capsys):
    out = tmp_path / "run"
    root = tmp_path / ".run.ckpt"
    root.mkdir()
    (root / "plan.json").write_text(json.dumps({"experiment": "something else"}))
    code, err = run_cli([*TINY, "--out", str(out)], capsys)
    assert_clean_failure(code, err, r"has checkpoints of an interrupted run .* --resume",
                         tmp_path, {".run.ckpt"})
    code, err = run_cli([*TINY, "--resume", str(out)], capsys)
    assert_clean_failure(code, err, r"belong to a run with other settings", tmp_path,
                         {".run.ckpt"})


def test_resume_of_a_complete_run(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "summary.json").write_text(json.dumps({"complete": True}))
    code, err = run_cli([*TINY, "--resume", str(out)], capsys)
    assert_clean_failure(code, err, r"already complete; nothing to resume", tmp_path, {"run"})


def test_sweep_predicted_not_to_fit(tiny_ds):
    from conftest import tiny_learner

    module, learner = tiny_learner("er")
    cfg = streams.StreamConfig(kind="split", n_tasks=2, batch_size=4, eval_every=4,
                               eval_per_task=8)
    with pytest.raises(ConfigError, match=r"does not fit: 2 member\(s\) need .* at most"):
        driver.run(learner, streams.build(cfg, tiny_ds, [0, 1]), tiny_ds,
                   [module.HParams()] * 2, [0, 1], n_devices=1, memory_limit=1000)


def test_library_shape_and_count_errors(tiny_ds):
    from conftest import tiny_learner

    module, learner = tiny_learner("er")
    cfg = streams.StreamConfig(kind="split", n_tasks=2, batch_size=4)
    with pytest.raises(ConfigError, match="must match"):
        driver.run(learner, streams.build(cfg, tiny_ds, [0, 1]), tiny_ds, [module.HParams()],
                   [0, 1])
    bad = tiny_ds._replace(train_y=tiny_ds.train_y + 10) if hasattr(tiny_ds, "_replace") else None
    if bad is None:
        import dataclasses

        bad = dataclasses.replace(tiny_ds, train_y=tiny_ds.train_y + 10)
    with pytest.raises(DataError, match="label"):
        data.validate(bad)


def test_output_directory_that_cannot_be_created(tmp_path, capsys):
    (tmp_path / "afile").write_text("a file where a folder should be")
    code, err = run_cli([*TINY, "--out", str(tmp_path / "afile" / "run")], capsys)
    assert_clean_failure(code, err, r"cannot write the run directory", tmp_path, {"afile"})
