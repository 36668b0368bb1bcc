"""Helpers of the Avalanche cross-checks (benchmarks/avalanche_agem.py, avalanche_er.py); the
runs themselves need avalanche-lib, which ocljax does not install."""

import gzip
import json

import numpy as np
import pytest

from benchmarks import avalanche_agem


class _Buffer:
    """Stands in for an Avalanche dataset: indexable, items are (x, y, task)."""

    def __init__(self, xs, ys, task):
        self.xs, self.ys, self.task = xs, ys, task

    def __len__(self):
        return len(self.xs)

    def __getitem__(self, i):
        return self.xs[i], int(self.ys[i]), self.task


def test_random_draw_is_balanced_over_experiences_and_uniform_with_replacement():
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    a = _Buffer(torch.arange(5.0)[:, None], np.arange(5), 0)
    b = _Buffer(100 + torch.arange(3.0)[:, None], np.arange(3), 1)
    it = avalanche_agem.random_draw_iterator([a, b], per_experience=4)
    draws = [next(it) for _ in range(3000)]
    x = torch.stack([d[0][:, 0] for d in draws])  # (3000, 8)
    t = torch.stack([d[2] for d in draws])
    assert x.shape == (3000, 8)
    assert (x[:, :4] < 5).all() and (x[:, 4:] >= 100).all()  # 4 rows of each, in order
    assert (t[:, :4] == 0).all() and (t[:, 4:] == 1).all()
    # labels travel with their rows
    assert all(torch.equal(d[1][:4], d[0][:4, 0].long()) for d in draws[:20])
    # uniform over each experience's rows (with replacement: repeats within a batch)
    counts = torch.bincount(x[:, :4].long().flatten(), minlength=5).float()
    assert torch.allclose(counts / counts.sum(), torch.full((5,), 0.2), atol=0.02)
    assert any(len(set(r[:4].tolist())) < 4 for r in x[:50])


def test_mnist_root_lays_out_torchvision_raw_files(tmp_path):
    data = tmp_path / "data" / "mnist"
    data.mkdir(parents=True)
    for name in avalanche_agem.MNIST_FILES:
        with gzip.open(data / f"{name}.gz", "wb") as f:
            f.write(name.encode())
    root = avalanche_agem.mnist_root(tmp_path / "data", tmp_path / "root")
    for name in avalanche_agem.MNIST_FILES:
        assert (root / "MNIST" / "raw" / name).read_bytes() == name.encode()
    (data / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(SystemExit, match="t10k-labels"):
        avalanche_agem.mnist_root(tmp_path / "data", tmp_path / "root2")


def test_write_atomic_leaves_no_temporary_files(tmp_path):
    path = tmp_path / "out" / "r.json"
    avalanche_agem.write_atomic(path, {"runs": [1]})
    avalanche_agem.write_atomic(path, {"runs": [1, 2]})
    assert json.loads(path.read_text()) == {"runs": [1, 2]}
    assert [p.name for p in path.parent.iterdir()] == ["r.json"]


def test_welch_comparison_matches_the_formula():
    a, b = [0.80, 0.82, 0.79, 0.81], [0.79, 0.80, 0.78, 0.80, 0.79, 0.81]
    w = avalanche_agem.welch(a, b)
    va, vb = np.var(a, ddof=1) / 4, np.var(b, ddof=1) / 6
    assert w["difference"] == pytest.approx(np.mean(a) - np.mean(b))
    assert w["se"] == pytest.approx(np.sqrt(va + vb))
    assert w["df"] == pytest.approx((va + vb) ** 2 / (va ** 2 / 3 + vb ** 2 / 5))
    assert w["t"] == pytest.approx(w["difference"] / w["se"])
    if "p" in w:  # SciPy installed
        stats = pytest.importorskip("scipy.stats")
        ref = stats.ttest_ind(a, b, equal_var=False)
        assert w["p"] == pytest.approx(ref.pvalue)
        lo, hi = w["ci95"]
        assert lo < w["difference"] < hi


def test_compare_only_needs_no_avalanche(tmp_path, capsys):
    res = tmp_path / "avl.json"
    avalanche_agem.write_atomic(res, {"draw": "random", "avalanche": "0.6.0", "runs": [
        {"seed": s, "final_accuracy": a} for s, a in enumerate([0.80, 0.82, 0.79])]})
    run = tmp_path / "ocl"
    run.mkdir()
    (run / "summary.json").write_text(json.dumps({"members": [
        {"final_average_accuracy": a} for a in [0.79, 0.80, 0.78]]}))
    assert avalanche_agem.main(["--seeds", "", "--json", str(res), "--compare", str(run)]) == 0
    out = capsys.readouterr().out
    assert "0.8033 ± 0.0153 over 3 seeds" in out
    assert "ocljax: 0.7900 ± 0.0100 over 3 seeds" in out
    assert "Avalanche - ocljax: +0.0133" in out
    with pytest.raises(SystemExit, match="draw='random', not 'cyclic'"):
        avalanche_agem.main(["--seeds", "", "--json", str(res), "--draw", "cyclic"])
    with pytest.raises(SystemExit, match="--data-dir is needed"):
        avalanche_agem.main(["--seeds", "7", "--json", str(res)])


def test_avalanche_er_without_avalanche_says_what_to_install(monkeypatch):
    import builtins

    from benchmarks import avalanche_er

    real = builtins.__import__

    def no_avalanche(name, *args, **kwargs):
        if name == "avalanche" or name.startswith("avalanche."):
            raise ImportError("No module named 'avalanche'")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_avalanche)
    with pytest.raises(SystemExit, match="needs torch and avalanche-lib"):
        avalanche_er.main(["--quick"])
