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
