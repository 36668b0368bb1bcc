import pytest

from benchmarks.throughput import train_flops_per_sample


def test_flop_model_matches_the_documented_145_gflop_per_seed_pass():
    per_pass = 2 * train_flops_per_sample(784) * 60_000  # stream + replay rows
    assert abs(per_pass - 145e9) / 145e9 < 0.01


def test_the_pytorch_loop_evaluates_as_often_as_the_driver():
    pytest.importorskip("torch")
    import numpy as np

    from benchmarks import torch_er
    from ocljax import data, streams

    ds = data.synthetic.load(num_classes=4, train_per_class=30, test_per_class=10,
                             shape=(4, 4, 1))
    cfg = streams.StreamConfig(kind="split", n_tasks=2, batch_size=4, task_free=True,
                               eval_every=4, eval_per_task=6)
    st = streams.build(cfg, ds, [0])  # 15 steps a task: continual at 4, 8, 12; ends at 15
    ends = set(np.cumsum(st.task_batches).tolist())
    out = torch_er.run(ds.train_x, ds.train_y, ds.test_x, ds.test_y, st.orders[0], ends,
                       buffer_size=8, replay=4, hidden=(8,), eval_every=cfg.eval_every,
                       eval_idx=st.eval_continual)
    assert out["continual_evaluations"] == (st.schedule.eval_kind == streams.EVAL_CONTINUAL).sum()
    assert out["continual_evaluations"] == 6
    plain = torch_er.run(ds.train_x, ds.train_y, ds.test_x, ds.test_y, st.orders[0], ends,
                         buffer_size=8, replay=4, hidden=(8,))
    assert plain["continual_evaluations"] == 0
    assert plain["final_test_accuracy"] == out["final_test_accuracy"]  # evaluation trains nothing
