"""The benchmark suite's plan and arithmetic (the timings themselves live in benchmarks/)."""

import json
from pathlib import Path

import pytest

from benchmarks import suite


@pytest.mark.parametrize("gpu", [False, True])
def test_plan_covers_every_section_with_unique_names(gpu):
    jobs = suite.plan(gpu, quick=False, sections=suite.SECTIONS)
    names = [j["name"] for j in jobs]
    assert len(names) == len(set(names))
    sections = {j["section"] for j in jobs}
    assert sections == set(suite.SECTIONS) - ({"devices"} if gpu else set())
    members = [j["members"] for j in jobs if j["section"] == "members"]
    if gpu:
        assert {1024, 4096} <= set(members)  # the sweep sizes
        assert {j.get("precision") for j in jobs if j["section"] == "precision"} >= {
            "float32", "tf32", "bf16"}
    for long in (j for j in jobs if j["section"] == "long"):
        assert long["samples"] * long["n_tasks"] >= 1_000_000 and long["short_tasks"] == 1


def test_window_rates_split_progress_marks_into_windows():
    marks = [(2000, 1.0), (4000, 2.0), (6000, 4.0), (8000, 5.0), (9000, 5.5)]
    # windows: steps 0-4000 in 2 s, 4000-8000 in 3 s, the rest (1000 steps) in 0.5 s
    assert suite.window_rates(marks, 4000, per_step=20) == pytest.approx(
        [20 * 4000 / 2.0, 20 * 4000 / 3.0, 20 * 1000 / 0.5])
    assert suite.window_rates([(100, 1.0)], 4000, per_step=1) == [100.0]


def test_long_row_runs_the_short_stream_around_the_long_one():
    job = {"section": "long", "name": "t", "kind": "long", "model": "mlp", "stream": "permuted",
           "eval_every": 20, "eval_per_task": 10, "test_per_class": 5, "members": 1,
           "samples": 300, "n_tasks": 3, "short_tasks": 1, "window_steps": 30,
           "blocks_per_chunk": 1}
    row = {**job, **suite.run_long(job)}  # as the worker writes it
    assert row["samples_per_seed"] == 3 * row["short_samples_per_seed"] == 900
    assert len(row["short_seed_samples_per_s"]) == 2
    before, after = row["short_final_average_accuracy"]  # one compiled sweep, run twice
    assert before == after
    mean_short = sum(row["short_seed_samples_per_s"]) / 2
    assert row["ratio_vs_short"] == pytest.approx(row["seed_samples_per_s"] / mean_short)
    assert len(row["window_seed_samples_per_s"]) >= 2  # 90 steps in windows of >= 30
    assert "x the 300-sample stream" in suite.describe(row)


def test_plan_uses_real_mnist_when_given_a_data_dir():
    jobs = suite.plan(False, quick=True, sections=("members",), data_dir="/data")
    assert jobs and all(j["dataset"] == "mnist" and j["data_dir"] == "/data" for j in jobs)


def test_cpu_jobs_share_a_worker_only_with_the_same_device_count():
    jobs = suite.plan(False, quick=True, sections=("members", "devices"))
    keys = {j["name"]: suite.process_key(j, gpu=False) for j in jobs}
    assert keys["er_mlp_m1"] != keys["er_mlp_m4"]
    assert len({keys[n] for n in keys if "_d" in n}) == 1  # devices rows: 8 virtual devices
    assert {suite.process_key(j, gpu=True) for j in jobs} == {("jax",)}


def test_derive_ratio_and_roofline():
    ctx = {"torch": {"mlp": 1000.0}, "peak": {"float32_flops": 1e12}, "hbm_bytes_per_s": 4e12}
    row = suite.derive({"model": "mlp", "precision": "float32", "seed_samples_per_s": 5e5}, ctx)
    assert row["ratio_vs_torch"] == pytest.approx(500.0)
    compute = 2 * suite.train_flops_per_sample(784) / 1e12
    traffic = 2 * 4 * suite.MLP_WEIGHTS / 4e12 / 10
    assert row["roofline_floor_seed_samples_per_s"] == pytest.approx(1 / max(compute, traffic))
    assert row["fraction_of_roofline"] == pytest.approx(5e5 * max(compute, traffic))
    assert "ratio_vs_torch" not in suite.derive(
        {"model": "cnn", "seed_samples_per_s": 1.0}, {"torch": {}})


@pytest.mark.slow
def test_compile_modes_benchmark_writes_its_ratios(tmp_path):
    from benchmarks import compile_modes

    out = tmp_path / "modes.json"
    assert compile_modes.main(["--quick", "--models", "mlp", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert [r["mode"] for r in res["rows"]] == ["full", "optimized", "fast"] * 2
    q = res["ratios"]["mlp"]
    assert all(q[k] > 0 for k in ("compile_optimized_over_full", "run_optimized_over_full",
                                  "compile_fast_over_optimized", "run_fast_over_optimized"))
    accs = {round(r["final_average_accuracy"], 3) for r in res["rows"]}
    assert len(accs) == 1  # the three compilations agree to rounding
    with pytest.raises(SystemExit):  # an unknown model is refused before anything runs
        compile_modes.main(["--models", "vgg", "--json", str(out)])


def test_compile_section_runs_a_learner_without_a_learning_rate():
    # the input-blind baseline has no lr to grid over; the section once crashed on it
    out = suite.run_compile({"learners": ["blind"]})
    assert out["blind"]["traces"] == 1 and out["blind"]["compile_s"] > 0
    assert out["blind"]["fast_compile_s"] > 0  # a CPU compiles fast code too
    assert ", fast " in suite.describe({"name": "c", "kind": "compile", "blind": out["blind"]})
    # off a CPU both modes compile alike: no fast row, and the description still reads
    gpu_like = {**out["blind"], "fast_compile_s": None, "fast_run_s": None,
                "fast_over_optimized": None}
    text = suite.describe({"name": "c", "kind": "compile", "blind": gpu_like})
    assert "fast" not in text and "(1 trace)" in text


def test_gpu_plan_compiles_a_representative_subset():
    (job,) = [j for j in suite.plan(True, quick=False, sections=("compile",))]
    assert job["learners"] == list(suite.GPU_COMPILE_LEARNERS)
    (cpu,) = [j for j in suite.plan(False, quick=False, sections=("compile",))]
    assert "learners" not in cpu  # every registered learner


@pytest.mark.slow
def test_one_seed_split_benchmark_computes_the_same_step(tmp_path):
    # its own process: the benchmark sets two virtual CPU devices before jax is imported
    import os
    import subprocess
    import sys

    out = tmp_path / "split.json"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    subprocess.run([sys.executable, "-m", "benchmarks.one_seed_split", "--quick", "--json",
                    str(out)], check=True, env=env, cwd=Path(__file__).parents[1])
    res = json.loads(out.read_text())
    assert res["collectives_in_split_program"] == 1  # one all-reduce per step, as designed
    assert res["max_weight_difference_one_step"] < 1e-5  # the split is the same function
    assert set(res["best_ms_per_step"]) == {"one device", "split", "half width"}


@pytest.mark.slow
def test_loop_forms_benchmark_ends_every_form_in_the_same_state(tmp_path):
    from benchmarks import loop_forms

    out = tmp_path / "forms.json"
    assert loop_forms.main(["--quick", "--graphs", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    # while+graphs: the while form with XLA:GPU's command buffers, a no-op on a CPU
    assert set(res["best_ms_per_step"]) == {"while", "scan+cond", "scan+mask", "while+graphs"}
    assert res["graph_options"] == loop_forms.GRAPH_OPTIONS
    # the padded steps of the last block are skipped (while, cond) or discarded (mask)
    assert res["valid_steps"] < res["steps"]
    assert all(d < 1e-6 for d in res["max_state_difference_vs_while"].values())
