"""The reproduction page's anchor headings come from each run's own settings."""

import json

from experiments import results_table


def run_dir(tmp_path, name, model, learner_config, **variant):
    d = tmp_path / name
    d.mkdir()
    (d / "config.json").write_text(json.dumps(
        {"variants": [{"model": model, "learner_config": learner_config, **variant}]}))
    return d


def test_anchor_heading_names_each_setting_and_the_flags_that_differ_from_the_preset(tmp_path):
    preset = run_dir(tmp_path, "a", {"input_norm": "standard", "init": "torch"},
                     {"memory": "per_task", "ref_draw": "random"})
    head, extra = results_table.anchor_heading(preset)
    assert head.startswith("Avalanche's protocol: inputs standardised")
    assert "with replacement" in head and extra == ""
    # a run made before ref_draw and init existed: their defaults (cyclic, Flax)
    old = run_dir(tmp_path, "b", {"input_norm": "standard"}, {"memory": "per_task"})
    head, extra = results_table.anchor_heading(old)
    assert "Avalanche's protocol" not in head
    assert "Flax's initialisation" in head and "read cyclically" in head
    assert extra == " --set init=flax --set ref_draw=cyclic"


def test_anchor_heading_names_a_seed_count_other_than_the_presets(tmp_path):
    five = run_dir(tmp_path, "a", {"input_norm": "standard", "init": "torch"},
                   {"memory": "per_task", "ref_draw": "random"}, n_members=5)
    head, extra = results_table.anchor_heading(five)
    assert "seeds" not in head and extra == ""
    ten = run_dir(tmp_path, "b", {"input_norm": "standard", "init": "torch"},
                  {"memory": "per_task", "ref_draw": "cyclic"}, n_members=10)
    head, extra = results_table.anchor_heading(ten)
    assert head.endswith(", 10 seeds")
    assert extra == " --seeds 10 --set ref_draw=cyclic"


def test_page_pools_the_anchor_runs_that_differ_only_in_their_seeds(tmp_path):
    """Seeds 0-1 and 2-3 of the preset, run apart, read as one 4-seed section whose mean and
    (population) std are over all four members; both commands are named."""
    root = tmp_path / "results"
    root.mkdir()
    accs = {0: 0.80, 1: 0.78, 2: 0.82, 3: 0.76}
    for name, seeds in (("agem_pmnist_10", (0, 1)), ("agem_pmnist_10b", (2, 3))):
        variant = {"label": "agem", "learner": "agem", "n_members": 2,
                   "stream": {"task_free": False},
                   "model": {"input_norm": "standard", "init": "torch"},
                   "learner_config": {"memory": "per_task", "ref_draw": "random"}}
        d = run_dir(root, name, **{k: variant[k] for k in ("model", "learner_config")},
                    **{k: v for k, v in variant.items() if k not in ("model", "learner_config")})
        cfg = json.loads((d / "config.json").read_text())
        cfg.update(experiment="experiments.agem_pmnist", dataset="mnist",
                   command=["experiments.agem_pmnist", "--seed", str(seeds[0]), "--seeds", "2"])
        (d / "config.json").write_text(json.dumps(cfg))
        members = [{"member": i, "variant": "agem", "seed": s, "hparams": {"lr": 0.1},
                    "diverged": False, "final_average_accuracy": accs[s]}
                   for i, s in enumerate(seeds)]
        group = {"variant": "agem", "hparams": {"lr": 0.1}, "n": 2, "n_diverged": 0,
                 "final_average_accuracy": {"mean": sum(accs[s] for s in seeds) / 2,
                                            "std": 0.01}}
        (d / "summary.json").write_text(json.dumps(
            {"complete": True, "members": members, "groups": [group]}))
    page = tmp_path / "results.md"
    results_table.write_page(root, page)
    text = page.read_text()
    pooled = text.split("4 seeds, 2 runs pooled")[1]
    assert "`python -m experiments.agem_pmnist --seed 2 --seeds 2`" in pooled
    assert "0.790 ± 0.022" in pooled  # mean 0.79, population std sqrt(0.0005)
    assert "| 4 |" in pooled
    # runs that cannot be pooled (a seed in both) leave a line, and the page is still written
    summary = json.loads((root / "agem_pmnist_10b" / "summary.json").read_text())
    summary["members"][0]["seed"] = 0
    (root / "agem_pmnist_10b" / "summary.json").write_text(json.dumps(summary))
    results_table.write_page(root, page)
    text = page.read_text()
    assert "runs pooled" not in text
    assert "could not be pooled: seed 0 of agem is in both" in text
