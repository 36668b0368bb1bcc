"""An experiment's variants compile ahead of their turn, on threads (``CompileAhead``): the same
numbers as compiling each just before it runs, errors and messages at the variant's turn."""

import json
import threading

import pytest

from ocljax.cli import main
from ocljax.errors import ConfigError
from ocljax.run import experiment

TINY = ["--dataset", "synthetic", "--n-tasks", "2", "--set", "width=16", "--set", "depth=1",
        "--set", "buffer_size=20", "--eval-every", "10", "--learner", "er,finetune@iid",
        "--seeds", "2"]


def compiled_on(monkeypatch) -> list[tuple[str, str]]:
    """Record (variant label, thread name) of every variant compilation."""
    real, seen = experiment.compile_variant, []

    def spy(prep, *args, **kw):
        seen.append((prep.variant.label, threading.current_thread().name))
        return real(prep, *args, **kw)

    monkeypatch.setattr(experiment, "compile_variant", spy)
    return seen


def members(out) -> list[dict]:
    return json.loads((out / "summary.json").read_text())["members"]


def test_compiled_ahead_on_threads_gives_the_same_numbers(tmp_path, monkeypatch, capsys):
    seen = compiled_on(monkeypatch)
    assert main([*TINY, "--quiet", "--compile-workers", "1", "--out", str(tmp_path / "one")],
                prog="t") == 0
    assert [t for _, t in seen] == ["MainThread", "MainThread"]
    seen.clear()
    assert main([*TINY, "--quiet", "--compile-workers", "2", "--out", str(tmp_path / "two")],
                prog="t") == 0
    threads = {t for _, t in seen}
    assert len(threads) == 2 and all(t.startswith("ocljax-variant") for t in threads)
    one, two = members(tmp_path / "one"), members(tmp_path / "two")
    keys = ("final_average_accuracy", "average_anytime_accuracy", "forgetting",
            "online_accuracy", "acc_matrix", "linear_probe_accuracy")
    assert [[m[k] for k in keys] for m in one] == [[m[k] for k in keys] for m in two]
    assert ((tmp_path / "one" / "eval.jsonl").read_text()
            == (tmp_path / "two" / "eval.jsonl").read_text())


def test_messages_of_a_variant_compiled_ahead_are_printed_at_its_turn(tmp_path, capsys):
    assert main([*TINY, "--compile-workers", "2", "--no-out"], prog="t") == 0
    captured = capsys.readouterr()
    assert "compiling 2 variants on 2 threads" in captured.err
    lines = captured.out.splitlines()
    plan = [i for i, line in enumerate(lines) if "] memory:" in line]
    assert len(plan) == 2  # one memory plan per variant, printed once
    first_done = next(i for i, line in enumerate(lines) if line.startswith("[er] linear probe"))
    assert lines[plan[0]].startswith("[er]") and plan[0] < first_done
    assert lines[plan[1]].startswith("[finetune@iid]") and plan[1] > first_done


def test_compile_error_of_a_later_variant_waits_for_its_turn(tmp_path, monkeypatch, capsys):
    real = experiment.compile_variant

    def second_fails(prep, *args, **kw):
        if prep.variant.label == "finetune@iid":
            raise ConfigError("this sweep does not fit: (test)")
        return real(prep, *args, **kw)

    monkeypatch.setattr(experiment, "compile_variant", second_fails)
    out = tmp_path / "run"
    assert main([*TINY, "--quiet", "--compile-workers", "2", "--out", str(out)], prog="t") == 2
    err = capsys.readouterr().err
    assert "does not fit: (test)" in err and "marked incomplete" in err
    assert {m["variant"] for m in members(out)} == {"er"}  # the first one ran and was kept


def test_compile_workers_must_be_positive(tmp_path, capsys):
    assert main([*TINY, "--compile-workers", "0", "--out", str(tmp_path / "run")],
                prog="t") == 2
    assert "--compile-workers must be >= 1, got 0" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("workers", [1, 2])
def test_a_resumed_experiment_compiles_only_what_is_left(tmp_path, monkeypatch, workers):
    out = tmp_path / "run"
    real_execute, calls = experiment.driver.execute, []

    def interrupt_second(*args, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_execute(*args, **kw)

    monkeypatch.setattr(experiment.driver, "execute", interrupt_second)
    args = [*TINY, "--quiet", "--compile-workers", str(workers), "--checkpoint-every", "0"]
    assert main([*args, "--out", str(out)], prog="t") == 130
    monkeypatch.setattr(experiment.driver, "execute", real_execute)
    seen = compiled_on(monkeypatch)
    assert main([*args, "--resume", str(out)], prog="t") == 0
    assert [label for label, _ in seen] == ["finetune@iid"]
    assert {m["variant"] for m in members(out)} == {"er", "finetune@iid"}
