from benchmarks.throughput import train_flops_per_sample


def test_flop_model_matches_the_documented_145_gflop_per_seed_pass():
    per_pass = 2 * train_flops_per_sample(784) * 60_000  # stream + replay rows
    assert abs(per_pass - 145e9) / 145e9 < 0.01
