"""Checkpoints: a run stopped mid-way and resumed gives bit-identical numbers."""

import os

import numpy as np
import pytest
from conftest import tiny_learner

from ocljax import streams
from ocljax.errors import ConfigError
from ocljax.run import driver
from ocljax.run.checkpoint import Checkpointer, Interrupted

CFG = streams.StreamConfig(kind="split", n_tasks=2, batch_size=4, eval_every=4,
                           eval_per_task=8, near_future=2)


class StopAfter:
    """``should_stop`` that asks to stop after ``n`` polls (one poll per chunk)."""

    def __init__(self, n):
        self.n, self.signum = n, 15

    def __call__(self):
        self.n -= 1
        return self.n < 0


def run(ds, **kw):
    module, learner = tiny_learner("er")
    seeds = [0, 1, 2]
    stream = streams.build(CFG, ds, seeds)
    hps = [module.HParams(lr=lr) for lr in (0.1, 0.2, 1e30)]  # one member diverges
    return driver.run(learner, stream, ds, hps, seeds, n_devices=1, blocks_per_chunk=1, **kw)


def assert_same(a, b):
    for field in ("acc", "task_aware", "cumulative", "block_loss", "online_accuracy",
                  "near_future_accuracy", "blind_online_accuracy", "diverged_step",
                  "eval_step", "eval_kind", "eval_task"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field), err_msg=field)


def test_stop_and_resume_is_bit_identical(tiny_ds, tmp_path):
    whole = run(tiny_ds)
    ck = Checkpointer(tmp_path / "ck", every_s=1e9, keep=2)
    with pytest.raises(Interrupted):
        run(tiny_ds, checkpoint=ck, should_stop=StopAfter(1))  # 6 blocks; stops after 2
    assert ck.exists()
    with pytest.raises(Interrupted):  # resumed, stopped again later: keeps the last two
        run(tiny_ds, checkpoint=Checkpointer(tmp_path / "ck", every_s=1e9, keep=2),
            should_stop=StopAfter(1))
    assert sorted(int(p.name) for p in (tmp_path / "ck").iterdir() if p.name.isdigit()) == [2, 4]
    resumed = run(tiny_ds, checkpoint=Checkpointer(tmp_path / "ck"))
    assert_same(whole, resumed)


def corrupt(step_dir):
    """Overwrite every file of a checkpoint step's state with garbage."""
    for root, _, files in os.walk(step_dir / "state"):
        for name in files:
            with open(os.path.join(root, name), "wb") as f:
                f.write(b"\x00garbage")


def test_corrupt_newest_checkpoint_falls_back_to_the_previous(tiny_ds, tmp_path):
    whole = run(tiny_ds)
    with pytest.raises(Interrupted):
        run(tiny_ds, checkpoint=Checkpointer(tmp_path / "ck", every_s=0.0),
            should_stop=StopAfter(3))
    newest = max((p for p in (tmp_path / "ck").iterdir() if p.name.isdigit()),
                 key=lambda p: int(p.name))
    corrupt(newest)
    # resumed from the one before, saving at every chunk: it saves the unreadable step again
    # (which failed with "step already exists" while the bad one was left in place)
    with pytest.warns(RuntimeWarning, match="cannot be read"):
        resumed = run(tiny_ds, checkpoint=Checkpointer(tmp_path / "ck", every_s=0.0))
    assert_same(whole, resumed)
    # the step written again is readable: resuming from it warns of nothing
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        again = run(tiny_ds, checkpoint=Checkpointer(tmp_path / "ck", every_s=1e9))
    assert_same(whole, again)


def test_every_checkpoint_unreadable_starts_afresh(tiny_ds, tmp_path):
    """Checkpoints exist (so nothing was compiled ahead for a fresh start) but none can be
    read: the run initialises and evaluates from scratch and matches an uninterrupted one."""
    whole = run(tiny_ds)
    with pytest.raises(Interrupted):
        run(tiny_ds, checkpoint=Checkpointer(tmp_path / "ck", every_s=0.0),
            should_stop=StopAfter(2))
    for step in (p for p in (tmp_path / "ck").iterdir() if p.name.isdigit()):
        corrupt(step)
    with pytest.warns(RuntimeWarning, match="cannot be read"):
        fresh = run(tiny_ds, checkpoint=Checkpointer(tmp_path / "ck", every_s=1e9))
    assert_same(whole, fresh)


def test_checkpoint_of_another_layout_is_refused(tiny_ds, tmp_path):
    with pytest.raises(Interrupted):
        run(tiny_ds, checkpoint=Checkpointer(tmp_path / "ck", every_s=0.0),
            should_stop=StopAfter(1))
    module, learner = tiny_learner("er")
    stream = streams.build(CFG, tiny_ds, [0, 1])  # two members where the checkpoint has three
    with pytest.raises(ConfigError, match="laid out"):
        driver.run(learner, stream, tiny_ds, [module.HParams()] * 2, [0, 1], n_devices=1,
                   blocks_per_chunk=1, checkpoint=Checkpointer(tmp_path / "ck"))


def test_stop_asked_during_the_last_chunk_lets_the_run_finish(tiny_ds, tmp_path):
    """Once the last chunk is dispatched, a stop request no longer throws the run's work
    away (it raised with nothing to checkpoint, so a resume retrained the variant)."""
    whole = run(tiny_ds)
    polls = len(whole.block_loss[0])  # one poll per chunk of one block
    done = run(tiny_ds, checkpoint=Checkpointer(tmp_path / "ck", every_s=1e9),
               should_stop=StopAfter(polls - 1))  # True at the last poll only
    assert_same(whole, done)


def test_experiment_stops_before_its_next_variant(tmp_path, monkeypatch):
    """A stop that arrives while a variant finishes is honoured before the next variant
    starts: the finished one is kept, and a resume runs only the rest."""
    from ocljax.run import experiment
    from ocljax.sweep import Member

    real, started, finished = experiment.driver.execute, [], []

    def execute(*args, **kwargs):
        started.append(1)
        out = real(*args, **kwargs)
        finished.append(1)
        return out

    monkeypatch.setattr(experiment.driver, "execute", execute)
    model = experiment.ModelConfig(width=16, depth=1)
    variants = [experiment.Variant(name, name, streams.StreamConfig(n_tasks=2, eval_every=10),
                                   tiny_learner(name)[0].Config(), model, [Member(0, {})])
                for name in ("finetune", "er")]
    out = tmp_path / "run"
    with pytest.raises(Interrupted):
        experiment.run_experiment("t", "synthetic", variants, out=str(out), quiet=True,
                                  plot=False, should_stop=lambda: bool(finished))
    assert len(started) == len(finished) == 1  # er never started
    import json

    summary = json.loads((out / "summary.json").read_text())
    assert summary["complete"] is False
    assert {m["variant"] for m in summary["members"]} == {"finetune"}
    experiment.run_experiment("t", "synthetic", variants, out=str(out), quiet=True,
                              plot=False, resume=True)
    assert len(started) == len(finished) == 2  # only er ran
