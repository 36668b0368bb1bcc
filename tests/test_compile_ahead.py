"""An experiment's variants compile ahead of their turn, on threads (``CompileAhead``): the same
numbers as compiling each just before it runs, errors and messages at the variant's turn."""

import json
import threading
import time

import pytest

from ocljax.cli import main
from ocljax.errors import ConfigError
from ocljax.run import driver, experiment

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


SPREAD = """
import json, sys
from ocljax.cli import main
out = {}
for seeds, devices in ((4, 1), (4, 4), (3, 4)):  # 4 members sharded; 3 padded to 4
    d = f"{sys.argv[1]}/s{seeds}d{devices}"
    assert main([*sys.argv[2:], "--quiet", "--seeds", str(seeds), "--devices", str(devices),
                 "--out", d], prog="t") == 0
    members = json.load(open(d + "/summary.json"))["members"]
    out[f"{seeds}/{devices}"] = [m["linear_probe_accuracy"] for m in members]
print(json.dumps(out))
"""


def test_probe_compiled_ahead_matches_over_sharded_and_padded_members(tmp_path):
    """The probe is compiled from the sweep's state shapes, before the run: its accuracies
    are the same whether the members sit on one device, are sharded over four, or are
    padded (3 members on 4 devices, where the final states are not the sweep's sharding)."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
           "JAX_PLATFORMS": "cpu"}
    assert TINY[-2:] == ["--seeds", "2"]
    args = TINY[:-2]
    proc = subprocess.run([sys.executable, "-c", SPREAD, str(tmp_path), *args], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    one = out["4/1"]
    assert len(one) == 8 and all(0 < a <= 1 for a in one)  # 2 variants x 4 seeds
    assert out["4/4"] == pytest.approx(one, abs=1e-6)
    # the first 3 seeds of each variant
    assert out["3/4"] == pytest.approx(one[:3] + one[4:7], abs=1e-6)


class FakeLowered:
    """Stands in for ``jax.stages.Lowered``: counts and slows its compilations."""

    def __init__(self, text, consts=(), fail=False):
        self.text, self.fail, self.calls = text, fail, 0
        self._lowering = type("L", (), {"const_args": list(consts)})()
        self.in_tree = self.out_tree = "tree"

    def as_text(self):
        return self.text

    def compile(self, options=None):
        self.calls += 1
        time.sleep(0.2)
        if self.fail:
            raise RuntimeError("compile failed")
        return ("executable", self.text, self.calls)


DEV = [type("D", (), {"id": 0})()]


def test_compile_once_shares_equal_programs_across_threads():
    from concurrent.futures import ThreadPoolExecutor

    once = driver.CompileOnce()
    a, b = FakeLowered("module A"), FakeLowered("module A")  # equal text, two lowerings
    with ThreadPoolExecutor(2) as pool:
        got = list(pool.map(lambda lw: once(lw, None, DEV), [a, b]))
    assert got[0] is got[1] and a.calls + b.calls == 1  # the second waited for the first
    assert (once.compiled, once.shared) == (1, 1)
    # different text, options or devices: compiled apart
    c = FakeLowered("module B")
    assert once(c, None, DEV)[1] == "module B" and c.calls == 1
    d = FakeLowered("module A")
    once(d, {"xla_backend_optimization_level": 0}, DEV)
    once(d, None, [type("D", (), {"id": 1})()])
    assert d.calls == 2 and once.compiled == 4
    # constants passed apart from the text: never shared
    e, f = FakeLowered("module A", consts=[1]), FakeLowered("module A", consts=[2])
    once(e, None, DEV), once(f, None, DEV)
    assert e.calls == f.calls == 1


def test_compile_once_error_reaches_every_waiter_and_is_not_kept():
    from concurrent.futures import ThreadPoolExecutor

    once = driver.CompileOnce()
    bad = [FakeLowered("module X", fail=True) for _ in range(2)]
    with ThreadPoolExecutor(2) as pool:
        jobs = [pool.submit(once, lw, None, DEV) for lw in bad]
        for job in jobs:
            with pytest.raises(RuntimeError, match="compile failed"):
                job.result()
    good = FakeLowered("module X")
    assert once(good, None, DEV)[1] == "module X" and good.calls == 1  # compiled again


def test_an_iid_variant_shares_its_programs_and_numbers_with_a_run_alone(tmp_path, monkeypatch):
    from ocljax.run import probing

    made, built = [], []
    real = driver.CompileOnce

    def spy():
        made.append(real())
        return made[-1]

    def counted(real_fn, name):
        def make(*args, **kw):
            built.append(name)
            return real_fn(*args, **kw)
        return make

    monkeypatch.setattr(experiment.driver, "CompileOnce", spy)
    # one Program and one probe function for both variants: each program is traced and
    # lowered once (jit's caches), not only compiled once
    monkeypatch.setattr(driver, "Program", counted(driver.Program, "program"))
    monkeypatch.setattr(probing, "probe_program", counted(probing.probe_program, "probe"))
    i = TINY.index("buffer_size=20")
    args = [*TINY[:i - 1], *TINY[i + 1:], "--quiet", "--compile-workers", "1"]
    assert main([*args, "--learner", "finetune,finetune@iid", "--out", str(tmp_path / "both")],
                prog="t") == 0
    # initialisation, chunk and probe are finetune's programs again
    # (the message says what was compiled: this failed once, in one CI run, with shared == 1)
    assert (len(made), made[0].shared, made[0].compiled) == (1, 3, 3), \
        [(c.shared, c.compiled, [k[0][:8] for k in c._jobs]) for c in made]
    assert sorted(built) == ["probe", "program"]
    assert main([*args, "--learner", "finetune@iid", "--out", str(tmp_path / "alone")],
                prog="t") == 0
    both = [m for m in members(tmp_path / "both") if m["variant"] == "finetune@iid"]
    alone = members(tmp_path / "alone")
    keys = ("final_average_accuracy", "online_accuracy", "acc_matrix", "linear_probe_accuracy")
    assert [[m[k] for k in keys] for m in both] == [[m[k] for k in keys] for m in alone]


def test_compile_efforts_from_the_command_line(tmp_path):
    # --compile optimized (LLVM -O2) and full (XLA's -O3) are both accepted, config.json
    # records the effort each variant compiled with, and an MLP's numbers agree bitwise
    runs = {}
    for mode in ("optimized", "full"):
        out = tmp_path / mode
        assert main([*TINY, "--quiet", "--compile", mode, "--out", str(out)], prog="t") == 0
        timing = json.loads((out / "config.json").read_text())["timing"]
        assert {t["compile"]["effort"] for t in timing.values()} == {mode}
        runs[mode] = members(out)
    for a, b in zip(runs["optimized"], runs["full"], strict=True):
        assert a["final_average_accuracy"] == b["final_average_accuracy"]
        assert a["acc_matrix"] == b["acc_matrix"]


def test_pyplot_is_imported_while_the_variants_compile(tmp_path, monkeypatch):
    # a run that plots starts importing pyplot before its variants compile; one that does
    # not plot (or writes no run directory) does not
    import matplotlib

    from ocljax.run import plots

    started = []
    real = plots.preload
    monkeypatch.setattr(plots, "preload", lambda: started.append(real()) or started[-1])
    assert main([*TINY, "--quiet", "--out", str(tmp_path / "plots")], prog="t") == 0
    assert len(started) == 1
    started[0].join(timeout=60)
    assert not started[0].is_alive() and matplotlib.get_backend().lower() == "agg"
    assert (tmp_path / "plots" / "accuracy_matrix.png").stat().st_size > 0
    assert main([*TINY, "--quiet", "--no-plots", "--out", str(tmp_path / "none")], prog="t") == 0
    assert main([*TINY, "--quiet", "--no-out"], prog="t") == 0
    assert len(started) == 1


def test_compile_clock_counts_the_phases_while_started():
    import jax
    import jax.numpy as jnp

    from ocljax.run.progress import CompileClock

    clock = CompileClock().start()
    jax.jit(lambda x: jnp.sin(x) * 3.0)(jnp.ones(3))  # a new function: traced, lowered, compiled
    clock.stop()
    done = clock.summary()
    assert done["traces"] >= 1 and done["lowerings"] >= 1 and done["xla_compiles"] >= 1
    assert done["trace_s"] > 0 and done["xla_s"] > 0
    jax.jit(lambda x: jnp.cos(x) + 1.0)(jnp.ones(3))  # after stop: not counted
    assert clock.summary() == done
    assert "XLA compiles" in clock.describe()


def test_an_experiment_reports_where_its_time_went(tmp_path, capsys):
    out = tmp_path / "run"
    assert main([*TINY, "--out", str(out)], prog="t") == 0
    line = [x for x in capsys.readouterr().err.splitlines() if x.startswith("time: ")]
    assert len(line) == 1 and "compiling" in line[0] and "training" in line[0]
    time_ = json.loads((out / "config.json").read_text())["time"]
    assert time_["traces"] > 0 and time_["xla_compiles"] > 0 and time_["run_s"] > 0
    assert 0 < time_["compile_s"] < time_["wall_s"] and time_["probe_s"] > 0
