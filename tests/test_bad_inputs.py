"""Bad input, exhaustively: each case gives one clear message (exit status 2, exactly one
``error:`` line naming the offending thing and what to do, no traceback) and leaves no partial
results (no run directory, no hidden ``.NAME.*`` temporaries or checkpoints beside it).

CLI cases call ``ocljax.cli.main`` in-process with the quick-start preset and tiny settings; most
fail while the settings are planned, before anything is compiled. Library cases check the
exception type and message.
"""

import gzip
import json
import os
import re
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

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
TINY = ["--seeds", "1", "--set", "width=8", "--no-plots", "--quiet", "--probe-per-class", "0"]
# For cases that get as far as compiling (or run to the end while a check is missing): the
# smallest stream, 2 tasks of 20 samples, evaluated at task ends on 20 test samples.
TINY_RUN = ["--learner", "finetune", "--n-tasks", "2", "--eval-every", "0",
            "--set", "samples_per_task=20", "--set", "eval_per_task=20",
            "--set", "test_per_task=20"]

# (id, extra argv, message regex). Placeholders: {out} the run directory, {tmp} its
# grandparent (holding an empty folder "empty" and a plain file "afile").
CLI_CASES = [
    ("unknown learner", ["--learner", "xyzzy"], r"unknown learner 'xyzzy'; choose one of"),
    ("unknown learner in a list", ["--learner", "er,xyzzy"], r"unknown learner 'xyzzy'"),
    ("learner typo", ["--learner", "agme"],
     r"unknown learner 'agme' \(did you mean 'agem'\?\); choose one of"),
    ("no learner", ["--learner", ","], r"no learner given \(--learner NAME"),
    ("unknown stream of one entry", ["--learner", "er@bogus"],
     r"unknown stream 'bogus'; choose one of split, permuted"),
    ("unknown dataset", ["--dataset", "imagenet21k"], r"unknown dataset .imagenet21k.; choose"),
    ("dataset typo", ["--dataset", "fashion"],
     r"unknown dataset 'fashion' \(did you mean 'fashion_mnist'\?\)"),
    ("unknown --set key", ["--set", "bufer_size=5"],
     r"unknown setting\(s\) bufer_size \(did you mean 'buffer_size' or 'batch_size'\?\); known:"),
    ("--set of another learner's key", ["--learner", "finetune", "--set", "mem_batch=4"],
     r"unknown setting\(s\) mem_batch \(a setting of agem, not of the learners given\); known"),
    ("--set without a value", ["--set", "lr"], r"--set expects key=value, got 'lr'"),
    ("--set int typo", ["--set", "buffer_size=abc"], r"bad value 'abc' for buffer_size"),
    ("--set float typo", ["--set", "lr=fast"], r"bad value 'fast' for lr: expected float"),
    ("--set bool typo", ["--set", "task_free=maybe"], r"bad value 'maybe' for task_free"),
    ("--grid value typo", ["--grid", "lr=0.1,fast"], r"bad value 'fast' for lr"),
    ("--grid without values", ["--grid", "lr="], r"--grid expects key=value, got 'lr='"),
    ("zero batch", ["--batch-size", "0"], r"batch_size must be >= 1"),
    ("zero tasks", ["--n-tasks", "0"], r"n_tasks must be >= 1"),
    ("zero passes", ["--passes", "0"], r"passes must be >= 1"),
    ("zero seeds", ["--seeds", "0"], r"--seeds must be >= 1"),
    ("negative seed", ["--seed", "-1"], r"seeds must lie in \[0, 2\*\*31\): got --seed -1"),
    ("negative eval", ["--eval-every", "-1"], r"eval_every must be >= 0"),
    ("negative samples per task", ["--set", "samples_per_task=-1"],
     r"samples_per_task must be >= 0"),
    ("unknown class order", ["--set", "class_order=shuffled"],
     r"class_order must be 'fixed' or 'random', got 'shuffled'"),
    ("zero width", ["--set", "width=0"], r"width must be >= 1, got 0"),
    ("zero buffer", ["--learner", "er", "--set", "buffer_size=0"], r"buffer_size must be >= 1"),
    ("unknown optimizer", ["--set", "optimizer=adamw"],
     r"unknown optimizer 'adamw' \(did you mean 'adam'\?\); choose"),
    ("grid of a static setting", ["--learner", "er", "--grid", "buffer_size=10,20"],
     r"buffer_size is a static setting .* --set buffer_size"),
    ("grid of an unknown key", ["--grid", "momentum=0.1,0.9"],
     r"--grid momentum: not a traced hyperparameter of learner"),
    ("needs boundaries on a task-free stream", ["--learner", "icarl", "--task-free"],
     r"icarl needs task boundaries.*er_ncm"),
    ("agem per-task memory on a task-free stream",
     ["--learner", "agem", "--task-free", "--set", "memory=per_task"],
     r"agem needs task boundaries.*--set memory=reservoir"),
    ("agem unknown memory", ["--learner", "agem", "--set", "memory=bogus"],
     r"A-GEM memory must be one of reservoir, per_task, got 'bogus'"),
    ("agem reference batch smaller than its tasks",
     ["--learner", "agem", "--set", "memory=per_task", "--set", "mem_batch=4"],
     r"mem_batch=4 is smaller than max_tasks=20"),
    ("tasks do not divide the classes", ["--n-tasks", "3"], r"cannot be split into 3"),
    ("batch larger than a task", ["--batch-size", "5000"], r"fewer than batch_size"),
    ("batch larger than the permuted pool", ["--stream", "permuted", "--batch-size", "5000"],
     r"samples_per_task=\d+ is smaller than batch_size=5000"),
    ("empty task", ["--set", "samples_per_task=5"], r"task 0 has 5 training samples"),
    ("dense eval not a divisor", ["--set", "eval_dense_every=3"],
     r"eval_every \(10\) must be a multiple of eval_dense_every \(3\)"),
    ("dense window without interval", ["--set", "eval_dense_window=9"],
     r"eval_dense_window needs eval_dense_every"),
    ("negative near-future", ["--near-future", "-1"], r"near_future must be >= 0"),
    ("blurry out of range", ["--set", "blurry=1"], r"blurry must be in \[0, 1\), got 1"),
    ("blurry with one task", ["--n-tasks", "1", "--set", "blurry=0.1"],
     r"blurry=0.1 needs at least 2 tasks to mix, got n_tasks=1"),
    ("blurry that moves nothing", ["--set", "blurry=0.0001"],
     r"blurry=0.0001 moves no sample: .*; use blurry >= "),
    ("rotation beyond a turn", ["--stream", "rotated", "--set", "max_rotation=720"],
     r"max_rotation must be in \[0, 360\] degrees, got 720"),
    ("zero chunk", ["--chunk-blocks", "0"], r"--chunk-blocks must be >= 1"),
    ("zero checkpoints kept", ["--keep-checkpoints", "0"], r"--keep-checkpoints must be >= 1"),
    ("resume and overwrite", ["--resume", "{out}", "--overwrite"],
     r"--resume continues a run and --overwrite starts it over"),
    ("resume with another --out", ["--resume", "{out}", "--out", "{out}2"],
     r"--resume RUN_DIR names the run directory"),
    ("missing data dir", ["--dataset", "mnist", "--data-dir", "{tmp}/nowhere"],
     r"data directory .*nowhere does not exist"),
    ("data dir is a file", ["--dataset", "mnist", "--data-dir", "{tmp}/afile"],
     r"data directory .*afile is a file, not a directory"),
    ("data dir without files", ["--dataset", "mnist", "--data-dir", "{tmp}/empty"],
     r"mnist is not available .*--data-dir DIR"),
    ("unknown precision", ["--precision", "fp8"], r"argument --precision: invalid choice"),
    ("unknown model", ["--model", "vit"], r"unknown model 'vit'"),
]


def run_cli(argv, capsys):
    """``main`` on ``argv`` with the quick-start preset: (exit status, stderr)."""
    try:
        code = main(argv, prog="experiments.quickstart", description="", preset=PRESET)
    except SystemExit as exit_:  # argparse's own errors
        code = exit_.code
    return code, capsys.readouterr().err


def assert_clean_failure(code, err, pattern, parent: Path, before: set):
    """Exit status 2, one ``error:`` line matching ``pattern``, no traceback, and ``parent``
    holding exactly ``before`` (no run directory, no hidden temporaries or checkpoints)."""
    assert code == 2, err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1, err
    assert re.search(pattern, errors[0]), errors[0]
    assert set(os.listdir(parent)) == before, "partial results left behind"


def cli_failure(extra, pattern, tmp_path, capsys):
    """Run ``TINY + extra`` into ``tmp_path/runs/run`` and check it fails cleanly."""
    out = tmp_path / "runs" / "run"
    out.parent.mkdir()
    extra = [a.format(out=out, tmp=tmp_path) for a in extra]
    argv = [*TINY, *extra] if "--resume" in extra else [*TINY, "--out", str(out), *extra]
    code, err = run_cli(argv, capsys)
    assert_clean_failure(code, err, pattern, out.parent, set())


@pytest.mark.parametrize("case, extra, pattern", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_cli_bad_input(case, extra, pattern, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "afile").write_text("not a folder")
    cli_failure(extra, pattern, tmp_path, capsys)


# Settings refused only once the sweep is being set up (after the checkpoint plan
# ``.run.ckpt/plan.json`` was written: it must be removed again), or by range checks.
LATE_CASES = [
    ("more devices than there are", ["--devices", "99"], r"asked for 99 devices", ""),
    ("zero blind window", ["--learner", "blind", "--set", "window=0"],
     r"blind window must be >= 1, got 0",
     ""),
    ("sweep the memory model rejects", [*TINY_RUN, "--set", "width=1048576"],
     r"this sweep does not fit: 1 member\(s\) need .*; not even one member fits", ""),
    ("zero devices", [*TINY_RUN, "--devices", "0"], r"--devices must be >= 1",
     "--devices 0 is taken as 'all devices' (run_variant: n_devices or ...); the run goes on"),
    ("negative learning rate", [*TINY_RUN, "--set", "lr=-1"], r"lr must be > 0",
     "traced hyperparameters are never range-checked: lr=-1 runs gradient ascent"),
]


@pytest.mark.parametrize("case, extra, pattern",
                         [pytest.param(c, e, p, id=c) for c, e, p, _ in LATE_CASES])
def test_cli_bad_input_refused_late_leaves_nothing(case, extra, pattern, tmp_path, capsys):
    cli_failure(extra, pattern, tmp_path, capsys)


def damaged_copy(tmp_path: Path, damage) -> Path:
    """A copy of the shared MNIST files with ``t10k-labels`` passed through ``damage``."""
    if not (SHARED_DATA / "mnist").is_dir():
        pytest.skip("../shared/data/mnist is not present")
    target = tmp_path / "data" / "mnist"
    shutil.copytree(SHARED_DATA / "mnist", target)
    damage(target / "t10k-labels-idx1-ubyte.gz")
    return target.parent


def truncate(path: Path):
    path.write_bytes(path.read_bytes()[:100])


def random_bytes(path: Path):
    path.write_bytes(np.random.default_rng(0).bytes(4096))


def wrong_dataset(path: Path):  # a valid IDX file, but not the published one
    path.write_bytes(gzip.compress(bytes([0, 0, 8, 1, 0, 0, 0, 2, 3, 4])))


def bad_magic(path: Path):  # a valid gzip whose content is not IDX
    path.write_bytes(gzip.compress(bytes([0, 0, 9, 9, 0, 0, 0, 1, 0])))


@pytest.mark.parametrize("damage", [truncate, random_bytes, wrong_dataset, bad_magic])
def test_damaged_data_file_is_named(damage, tmp_path, capsys):
    data_dir = damaged_copy(tmp_path, damage)
    out = tmp_path / "runs" / "run"
    out.parent.mkdir()
    code, err = run_cli([*TINY, "--dataset", "mnist", "--data-dir", str(data_dir), "--out",
                         str(out)], capsys)
    assert_clean_failure(code, err, r"t10k-labels-idx1-ubyte.gz: sha256 .* does not match",
                         out.parent, set())


def test_another_datasets_files_are_recognised(tmp_path, capsys):
    """Fashion-MNIST asked for, MNIST's (intact) files given: the message says whose they are."""
    if not (SHARED_DATA / "mnist").is_dir():
        pytest.skip("../shared/data/mnist is not present")
    out = tmp_path / "run"
    code, err = run_cli([*TINY, "--dataset", "fashion_mnist", "--data-dir",
                         str(SHARED_DATA / "mnist"), "--out", str(out)], capsys)
    assert_clean_failure(code, err, r"train-images-idx3-ubyte.gz: sha256 .* \(it is mnist's "
                         r"train-images-idx3-ubyte.gz\); replace it", tmp_path, set())


def test_incomplete_data_dir_names_the_missing_files(tmp_path, capsys):
    folder = tmp_path / "data" / "mnist"
    folder.mkdir(parents=True)
    for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"):
        (folder / name).write_bytes(b"")  # never read: the set is incomplete
    out = tmp_path / "runs" / "run"
    out.parent.mkdir()
    code, err = run_cli([*TINY, "--dataset", "mnist", "--data-dir", str(tmp_path / "data"),
                         "--out", str(out)], capsys)
    assert_clean_failure(code, err, r"missing in .*mnist: t10k-images-idx3-ubyte.gz, "
                         r"t10k-labels-idx1-ubyte.gz", out.parent, set())


IDX_CASES = [
    ("bad magic", bytes([0, 0, 9, 9, 0, 0, 0, 1, 0]), r"bad IDX magic number 2313"),
    ("too short", b"\x00\x00", r"too short to be an IDX file \(2 bytes\)"),
    ("empty", b"", r"too short to be an IDX file \(0 bytes\)"),
    ("truncated image header", bytes([0, 0, 8, 3, 0, 0, 0, 1, 0, 0, 0, 2]),
     r"truncated IDX image header"),
    ("data shorter than the header says", bytes([0, 0, 8, 1, 0, 0, 0, 5, 1, 2]),
     r"header promises 5 bytes of data, file holds 2"),
]


@pytest.mark.parametrize("case, raw, pattern", IDX_CASES, ids=[c[0] for c in IDX_CASES])
def test_idx_file_errors(case, raw, pattern, tmp_path):
    path = tmp_path / "x.gz"
    path.write_bytes(gzip.compress(raw))
    with pytest.raises(DataError, match=rf"x.gz: {pattern}"):
        idx.read_file(path, None)  # unverified: the parser itself must catch it


def test_not_gzip_and_unreadable_without_checksum(tmp_path):
    path = tmp_path / "x.gz"
    path.write_bytes(b"plain text, not gzip")
    with pytest.raises(DataError, match="x.gz: not a valid gzip file"):
        idx.read_file(path, None)
    (tmp_path / "folder.gz").mkdir()
    with pytest.raises(DataError, match="folder.gz: cannot be read"):
        idx.read_file(tmp_path / "folder.gz", None)


def test_unwritable_output_directory(tmp_path, capsys):
    if os.geteuid() != 0:
        parent = tmp_path / "ro"
        parent.mkdir()
        parent.chmod(0o500)
    elif Path("/proc").is_dir():  # root writes anywhere but in a pseudo file system
        parent = Path("/proc")
    else:
        pytest.skip("running as root without /proc")
    before = set(os.listdir(parent)) if parent != Path("/proc") else None
    try:
        code, err = run_cli([*TINY, "--out", str(parent / "ocljax-run")], capsys)
    finally:
        if parent != Path("/proc"):
            parent.chmod(0o700)
    if before is None:  # /proc's listing changes with every process: look for ours only
        assert code == 2 and re.search(r"error: cannot write the run directory", err), err
        assert "Traceback" not in err
        assert not list(parent.glob("*ocljax-run*")), "partial results left behind"
    else:
        assert_clean_failure(code, err, r"cannot write the run directory", parent, before)


def test_output_directory_that_cannot_be_created(tmp_path, capsys):
    (tmp_path / "afile").write_text("a file where a folder should be")
    code, err = run_cli([*TINY, "--out", str(tmp_path / "afile" / "run")], capsys)
    assert_clean_failure(code, err, r"cannot write the run directory", tmp_path, {"afile"})


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
    assert out.read_text() == "not a directory"


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
    assert json.loads((root / "plan.json").read_text()) == {"experiment": "something else"}


def test_resume_of_a_complete_run(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "summary.json").write_text(json.dumps({"complete": True}))
    code, err = run_cli([*TINY, "--resume", str(out)], capsys)
    assert_clean_failure(code, err, r"already complete; nothing to resume", tmp_path, {"run"})


# Regression: this once deleted the folder's contents (RunDirectory.commit replaced it).
def test_resume_of_a_folder_that_is_not_a_run(tmp_path, capsys):
    folder = tmp_path / "runs"
    (folder / "old_run").mkdir(parents=True)
    (folder / "old_run" / "summary.json").write_text(json.dumps({"complete": True}))
    (folder / "notes.txt").write_text("mine")
    code, err = run_cli([*TINY, *TINY_RUN, "--resume", str(folder)], capsys)
    assert (folder / "notes.txt").exists() and (folder / "old_run").is_dir(), "deleted"
    assert_clean_failure(code, err, r"runs is not a run directory", tmp_path, {"runs"})


def test_resume_of_a_path_that_does_not_exist_says_it_starts_fresh(tmp_path, capsys):
    """The preemption watchdog resumes before any checkpoint exists, so this is not an error;
    but a mistyped path must not pass silently for a resumed run."""
    out = tmp_path / "new_run"
    code, err = run_cli([*TINY, *TINY_RUN, "--resume", str(out)], capsys)
    assert code == 0, err
    assert re.search(r"nothing to resume at .*new_run .*starting a fresh run", err), err
    assert json.loads((out / "summary.json").read_text())["complete"]


def test_sweep_predicted_not_to_fit(tiny_ds):
    from conftest import tiny_learner

    module, learner = tiny_learner("er")
    cfg = streams.StreamConfig(kind="split", n_tasks=2, batch_size=4, eval_every=4,
                               eval_per_task=8)
    with pytest.raises(ConfigError, match=r"does not fit: 2 member\(s\) need .* not even one"):
        driver.run(learner, streams.build(cfg, tiny_ds, [0, 1]), tiny_ds,
                   [module.HParams()] * 2, [0, 1], n_devices=1, memory_limit=1000)


def test_member_count_mismatch(tiny_ds):
    from conftest import tiny_learner

    module, learner = tiny_learner("er")
    stream = streams.build(streams.StreamConfig(kind="split", n_tasks=2, batch_size=4),
                           tiny_ds, [0, 1])
    with pytest.raises(ConfigError, match=r"2 seeds, 1 hyperparameter sets and a stream for "
                       r"2 members: they must match"):
        driver.run(learner, stream, tiny_ds, [module.HParams()], [0, 1])
    with pytest.raises(ConfigError, match=r"3 seeds, 3 hyperparameter sets and a stream for "
                       r"2 members"):
        driver.run(learner, stream, tiny_ds, [module.HParams()] * 3, [0, 1, 2])


def bad_dataset(ds, case):
    """``ds`` (4 classes) broken in one way."""
    return {
        "train labels too large": lambda: ds._replace(train_y=ds.train_y + 10),
        "negative train labels": lambda: ds._replace(train_y=ds.train_y - 1),
        "test labels too large": lambda: ds._replace(test_y=ds.test_y + 10),
        "float labels": lambda: ds._replace(train_y=ds.train_y.astype(np.float32)),
        "images without channels": lambda: ds._replace(train_x=ds.train_x[..., 0]),
        "fewer labels than images": lambda: ds._replace(train_y=ds.train_y[:-5]),
        "empty test split": lambda: ds._replace(test_x=ds.test_x[:0], test_y=ds.test_y[:0]),
        "train and test shapes differ": lambda: ds._replace(test_x=ds.test_x[:, :2]),
    }[case]()


BAD_DATASETS = [
    ("train labels too large", r"synthetic train labels must lie in \[0, 4\), got \[10, 13\]"),
    ("negative train labels", r"synthetic train labels must lie in \[0, 4\), got \[-1, 2\]"),
    ("test labels too large", r"synthetic test labels must lie in \[0, 4\)"),
    ("float labels", r"train labels must be a 1-D integer array, got float32"),
    ("images without channels", r"train images must be \[N, H, W, C\], got \(96, 4, 4\)"),
    ("fewer labels than images", r"train: 96 images but 91 labels"),
    ("empty test split", r"synthetic test split is empty"),
    ("train and test shapes differ", r"train images \(4, 4, 1\) differ from test"),
]


@pytest.mark.parametrize("kind", ["split", "permuted", "rotated"])
@pytest.mark.parametrize("case, pattern", BAD_DATASETS, ids=[c[0] for c in BAD_DATASETS])
def test_stream_of_a_malformed_dataset(case, pattern, kind, tiny_ds):
    """``streams.build`` refuses a malformed dataset by name, rather than building a stream
    that trains on the wrong samples or evaluates garbage."""
    cfg = streams.StreamConfig(kind=kind, n_tasks=2, batch_size=4)
    with pytest.raises(DataError, match=pattern):
        streams.build(cfg, bad_dataset(tiny_ds, case), [0])
    with pytest.raises(DataError, match=pattern):
        data.validate(bad_dataset(tiny_ds, case))


def test_stream_without_members(tiny_ds):
    cfg = streams.StreamConfig(kind="split", n_tasks=2, batch_size=4)
    with pytest.raises(ConfigError, match="at least one member: seeds is empty"):
        streams.build(cfg, tiny_ds, [])


def test_random_class_order_with_an_empty_class(tiny_ds):
    """A class with no training samples makes the smallest possible task (random order) too
    small: the message names the task and the batch size."""
    ds = tiny_ds._replace(train_y=np.where(tiny_ds.train_y == 1, 0, tiny_ds.train_y))
    cfg = streams.StreamConfig(kind="split", n_tasks=4, batch_size=4, class_order="random")
    with pytest.raises(ConfigError, match=r"task 0 has 0 training samples, fewer than "
                       r"batch_size=4"):
        streams.build(cfg, ds, [0])


def test_a_resume_with_other_settings_names_the_nested_setting():
    from ocljax.run.experiment import differences

    saved = {"experiment": "t", "variants": [{"label": "er", "members": [{"seed": 0}]}]}
    asked = {"experiment": "t", "variants": [{"label": "er", "members": [{"seed": 1}]}]}
    assert differences(saved, asked) == ["variants[0].members[0].seed"]
    longer = {"experiment": "t", "variants": [*asked["variants"], {"label": "lwf"}]}
    assert differences(saved, longer) == ["variants"]  # a variant more: the whole list
    assert differences(saved, saved) == []
