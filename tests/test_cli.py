"""Command-line runs end to end, and bad input: one clear message, exit 2, nothing written."""

import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest

from ocljax.cli import main
from ocljax.errors import ConfigError

TINY = ["--dataset", "synthetic", "--n-tasks", "2", "--set", "width=16", "--set", "depth=1",
        "--set", "buffer_size=20", "--eval-every", "10", "--quiet"]


def test_smoke_run_writes_a_complete_run_directory(tmp_path, capsys):
    out = tmp_path / "run"
    code = main([*TINY, "--learner", "finetune,er,finetune@iid,er@permuted", "--seeds", "2",
                 "--out", str(out)], prog="test")
    assert code == 0
    printed = capsys.readouterr().out
    assert "final acc" in printed and "±" in printed and "finetune@iid" in printed
    for name in ("config.json", "members.json", "eval.jsonl", "summary.json", "summary.csv",
                 "accuracy_matrix.png", "anytime_accuracy.png"):
        assert (out / name).is_file(), name
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["members"]) == 8 and len(summary["groups"]) == 4
    assert all(m["flops_per_step"] > 0 for m in summary["members"])
    m = summary["members"][0]
    for key in ("seed", "hparams", "final_average_accuracy", "average_anytime_accuracy",
                "forgetting", "online_accuracy", "acc_matrix"):
        assert key in m
    assert set(summary["groups"][0]["final_average_accuracy"]) == {"mean", "std"}
    config = json.loads((out / "config.json").read_text())
    assert config["versions"]["jax"]
    assert config["variants"][1]["learner_config"]["buffer_size"] == 20
    evals = [json.loads(line) for line in (out / "eval.jsonl").read_text().splitlines()]
    assert {e["kind"] for e in evals} == {"initial", "continual", "task_end"}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp leftovers


def test_seed_offsets_and_grid(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    assert main([*TINY, "--learner", "er", "--seeds", "3", "--seed", "10",
                 "--grid", "lr=0.05,0.2", "--out", str(a)], prog="t") == 0
    assert main([*TINY, "--learner", "er", "--seeds", "1", "--seed", "11",
                 "--set", "lr=0.2", "--out", str(b)], prog="t") == 0
    sweep = json.loads((a / "summary.json").read_text())
    single = json.loads((b / "summary.json").read_text())["members"][0]
    assert len(sweep["groups"]) == 2
    member = [m for m in sweep["members"] if m["seed"] == 11 and m["hparams"]["lr"] == 0.2][0]
    for key in ("final_average_accuracy", "online_accuracy", "acc_matrix"):
        np.testing.assert_allclose(member[key], single[key], atol=1e-6)



def test_rotated_and_blurry_streams_from_the_command_line(tmp_path):
    """``--stream rotated`` with blurry boundaries end to end: the settings reach config.json,
    a member of a sweep equals its seed run alone, and ``NAME@split`` in the same experiment
    gets the split stream with the same blur."""
    a, b = tmp_path / "a", tmp_path / "b"
    flags = [*TINY, "--stream", "rotated", "--set", "blurry=0.2", "--set", "max_rotation=90"]
    assert main([*flags, "--learner", "er,finetune@split", "--seeds", "2", "--out", str(a)],
                prog="t") == 0
    assert main([*flags, "--learner", "er", "--seed", "1", "--out", str(b)], prog="t") == 0
    streams_of = {v["label"]: v["stream"]
                  for v in json.loads((a / "config.json").read_text())["variants"]}
    assert streams_of["er"]["kind"] == "rotated" and streams_of["finetune@split"]["kind"] == "split"
    assert {s["blurry"] for s in streams_of.values()} == {0.2}
    assert streams_of["er"]["max_rotation"] == 90
    angles = {m["variant"]: m.get("task_angles")
              for m in json.loads((a / "members.json").read_text())}
    assert angles["finetune@split"] is None and 0 <= angles["er"][0] < 45 <= angles["er"][1] < 90
    sweep = json.loads((a / "summary.json").read_text())["members"]
    member = [m for m in sweep if m["variant"] == "er" and m["seed"] == 1][0]
    single = json.loads((b / "summary.json").read_text())["members"][0]
    for key in ("final_average_accuracy", "online_accuracy", "acc_matrix"):
        np.testing.assert_allclose(member[key], single[key], atol=1e-6)


BAD = [
    (["--learner", "nope"], "unknown learner 'nope'"),
    (["--dataset", "cifar1000"], "unknown dataset"),
    (["--set", "bufer_size=3"], "unknown setting"),
    (["--set", "buffer_size=lots"], "bad value 'lots' for buffer_size"),
    (["--set", "buffer_size"], "--set expects key=value"),
    (["--grid", "buffer_size=10,20"], "static setting"),
    (["--grid", "momentum=0.9"], "not a traced hyperparameter"),
    (["--n-tasks", "3"], "cannot be split into 3"),
    (["--batch-size", "1000"], "fewer than batch_size"),
    (["--set", "buffer_size=0"], "buffer_size must be >= 1"),
    (["--seeds", "0"], "--seeds must be >= 1"),
    (["--seed", "-1"], "seeds must lie in [0, 2**31)"),
    (["--set", "depth=0"], "depth must be >= 1"),
    (["--set", "width=0"], "width must be >= 1"),
    (["--grid", "lr=,"], "--grid lr: no values given"),
    (["--set", "replay_batch=30"], "cannot be drawn without replacement"),
    (["--set", "passes=0"], "passes must be >= 1"),
    (["--set", "optimizer=adagrad"], "unknown optimizer"),
    (["--model", "transformer"], "unknown model"),
    (["--dataset", "mnist", "--data-dir", "/nonexistent/dir"], "does not exist"),
]


@pytest.mark.parametrize("extra, message", BAD)
def test_bad_input_is_one_clear_error_and_writes_nothing(tmp_path, capsys, extra, message):
    out = tmp_path / "run"
    code = main([*TINY, "--learner", "er", *extra, "--out", str(out)], prog="t")
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and "Traceback" not in err
    assert not out.exists() and not list(tmp_path.iterdir())


def test_existing_run_directory_needs_overwrite(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    assert main([*TINY, "--out", str(out)], prog="t") == 2
    assert "already exists" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "precious"
    assert main([*TINY, "--out", str(out), "--overwrite"], prog="t") == 0
    assert (out / "summary.json").exists() and not (out / "keep.txt").exists()


def test_module_entry_point_reports_errors_without_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.quickstart", "--learner", "gem2", "--out",
         str(tmp_path / "r")], capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert "unknown learner 'gem2'" in proc.stderr and "Traceback" not in proc.stderr


def test_diverged_member_is_flagged_and_excluded(tmp_path):
    out = tmp_path / "run"
    i = TINY.index("buffer_size=20")
    tiny = TINY[: i - 1] + TINY[i + 1:]  # finetune has no buffer
    assert main([*tiny, "--learner", "finetune", "--seeds", "2", "--grid", "lr=0.1,1e30",
                 "--out", str(out)], prog="t") == 0
    summary = json.loads((out / "summary.json").read_text())
    good, bad = summary["groups"]
    assert good["n"] == 2 and good["n_diverged"] == 0
    assert bad["n"] == 0 and bad["n_diverged"] == 2
    assert bad["final_average_accuracy"]["mean"] is None
    flagged = [m for m in summary["members"] if m["diverged"]]
    assert len(flagged) == 2 and all(m["hparams"]["lr"] == 1e30 for m in flagged)
    assert all(m["diverged_block"] is not None for m in flagged)


def test_corrupt_data_file_is_named(tmp_path, capsys):
    from test_data import write_idx

    write_idx(tmp_path / "data" / "mnist")
    out = tmp_path / "run"
    code = main([*TINY, "--dataset", "mnist", "--data-dir", str(tmp_path / "data"),
                 "--out", str(out)], prog="t")
    err = capsys.readouterr().err
    assert code == 2 and "train-images-idx3-ubyte.gz: sha256" in err
    assert "Traceback" not in err and not out.exists()


def test_interrupted_experiment_keeps_finished_variants(tmp_path, monkeypatch, capsys):
    from ocljax.run import experiment

    real, calls = experiment.driver.execute, []

    def interrupt_second(*args, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kw)

    monkeypatch.setattr(experiment.driver, "execute", interrupt_second)
    out = tmp_path / "run"
    assert main([*TINY, "--learner", "er,er@iid", "--out", str(out)], prog="t") == 130
    assert "marked incomplete" in capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["complete"] is False
    assert {m["variant"] for m in summary["members"]} == {"er"}
    assert json.loads((out / "config.json").read_text())["complete"] is False


def test_precision_flag_reaches_the_model_config():
    from ocljax.cli import build_parser, plan

    preset = {"seeds": 1, "seed": 0, "learner": "er", "dataset": "digits"}
    args = build_parser("ocljax", "", preset).parse_args(["--precision", "bf16"])
    _, variants = plan(args, preset)
    assert variants[0].model.precision == "bf16"
    args.precision = None
    args.set = ["precision=fp8"]
    with pytest.raises(ConfigError, match="unknown precision 'fp8'"):
        plan(args, preset)


def test_flags_override_preset_settings_and_user_set_overrides_both():
    from ocljax.cli import build_parser, flag_defaults, plan

    preset = flag_defaults({"seeds": 1, "seed": 0, "learner": "er", "dataset": "synthetic",
                            "set": ["eval_every=100", "buffer_size=30"]})

    def planned(argv):
        args = build_parser("t", "", preset).parse_args(argv)
        return plan(args, preset)[1][0]

    assert planned([]).stream.eval_every == 100
    v = planned(["--eval-every", "0"])
    assert v.stream.eval_every == 0 and v.learner_config.buffer_size == 30
    assert planned(["--eval-every", "0", "--set", "eval_every=7"]).stream.eval_every == 7


def test_preset_settings_a_learner_lacks_are_ignored_but_user_typos_are_not(capsys):
    from ocljax.cli import build_parser, plan

    preset = {"seeds": 1, "seed": 0, "learner": "finetune", "dataset": "synthetic",
              "set": ["buffer_size=30"]}  # finetune has no buffer
    variant = plan(build_parser("t", "", preset).parse_args([]), preset)[1][0]
    assert variant.learner == "finetune"
    assert main(["--learner", "finetune", "--set", "bufer=1", "--no-out"], prog="t",
                preset=preset) == 2
    assert "unknown setting(s) bufer" in capsys.readouterr().err


def test_learner_needing_boundaries_is_refused_on_a_task_free_stream(capsys):
    code = main([*TINY, "--learner", "icarl", "--task-free", "--no-out"], prog="t")
    assert code == 2
    err = capsys.readouterr().err
    assert "icarl needs task boundaries" in err and "er_ncm" in err


def test_permuted_streams_drop_pixel_moving_default_augmentations_and_refuse_explicit_ones(
        capsys):
    """SCR's default view is a random resized crop: meaningless on permuted pixels, so a
    permuted stream keeps only its jitter (with a note); asking for a crop there is an error."""
    from ocljax import data
    from ocljax.cli import build_parser, plan
    from ocljax.run import experiment

    preset = {"seeds": 1, "seed": 0, "learner": "scr,rar", "dataset": "synthetic",
              "stream": "permuted"}
    scr_v, rar_v = plan(build_parser("t", "", preset).parse_args([]), preset)[1]
    assert scr_v.learner_config.augment == "jitter40"  # from the default "rrc50,jitter40"
    assert rar_v.learner_config.augment == "none"  # nothing to drop
    assert "augment 'rrc50,jitter40' -> 'jitter40'" in capsys.readouterr().err
    split = {**preset, "stream": "split"}
    assert plan(build_parser("t", "", split).parse_args([]), split)[1][0] \
        .learner_config.augment == "rrc50,jitter40"
    args = build_parser("t", "", preset).parse_args(["--set", "augment=crop4,jitter20"])
    with pytest.raises(ConfigError, match="augment='crop4,jitter20' moves pixels.*"
                                          "--set augment=jitter20"):
        plan(args, preset)
    # the library path refuses it too (a Variant built by hand)
    bad = dataclasses.replace(scr_v, learner_config=dataclasses.replace(
        scr_v.learner_config, augment="rrc50"))
    with pytest.raises(ConfigError, match="moves pixels"):
        experiment.prepare_variant(bad, data.load("synthetic"))


def test_without_spatial_keeps_only_pixel_wise_augmentations():
    from ocljax import augment

    assert augment.without_spatial("rrc50,jitter40") == "jitter40"
    assert augment.without_spatial("crop4,flip") == "none"
    assert augment.without_spatial("none") == "none"
    assert augment.without_spatial("jitter30") == "jitter30"


def test_a_rerun_loads_every_program_from_the_persistent_cache(tmp_path):
    import os

    cache = tmp_path / "cache"
    env = {**os.environ, "OCLJAX_CACHE_DIR": str(cache)}
    cmd = [sys.executable, "-m", "experiments.quickstart", *TINY, "--learner", "er",
           "--seeds", "2", "--no-out"]
    first = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-2000:]
    stored = set(os.listdir(cache))
    # every program is kept, however quickly it compiled: the chunk, the initialisation and
    # the linear probe at least (each compiles in well under a second here)
    assert sum(name.startswith("jit_single") for name in stored) >= 2, stored
    assert len(stored) >= 3
    second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-2000:]
    assert set(os.listdir(cache)) == stored  # nothing compiled anew
    assert first.stdout.splitlines()[-1] == second.stdout.splitlines()[-1]
