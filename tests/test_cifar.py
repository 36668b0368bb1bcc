"""CIFAR-10 / CIFAR-100 from the original python-version files, on small fakes of that format."""

import io
import pickle
import tarfile

import numpy as np
import pytest

from ocljax import data
from ocljax.data import cifar
from ocljax.errors import DataError


def batch(n, classes, label_key, seed):
    """One member as the originals hold it: bytes keys, [N, 3072] uint8 planes, list labels."""
    rng = np.random.default_rng(seed)
    return {b"batch_label": b"fake", label_key: [(i + seed) % classes for i in range(n)],
            b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            b"filenames": [b"f%d.png" % i for i in range(n)]}


def members(name, n=4):
    _, _, _, train, test, key, classes = cifar.LAYOUT[name]
    return {m: batch(n, classes, key, i) for i, m in enumerate(train + test)}


def write_folder(root, name, n=4):
    folder = root / cifar.LAYOUT[name][2]
    folder.mkdir(parents=True)
    content = members(name, n)
    for m, d in content.items():
        (folder / m).write_bytes(pickle.dumps(d, protocol=2))
    return folder, content


def write_archive(root, name, content):
    archive, _, folder, *_ = cifar.LAYOUT[name]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for m, d in content.items():
            blob = pickle.dumps(d, protocol=2)
            info = tarfile.TarInfo(f"{folder}/{m}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    root.mkdir(parents=True, exist_ok=True)
    (root / archive).write_bytes(buf.getvalue())
    return root / archive


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_extracted_folder_loads_with_pixels_in_place(tmp_path, name):
    _, content = write_folder(tmp_path, name)
    ds = data.load(name, tmp_path)
    _, _, _, train, test, key, classes = cifar.LAYOUT[name]
    assert ds.num_classes == classes
    assert ds.train_x.shape == (4 * len(train), 32, 32, 3) and ds.train_x.dtype == np.uint8
    assert ds.test_x.shape == (4, 32, 32, 3) and ds.test_y.dtype == np.int32
    first = content[train[0]]
    # row 0, pixel (row 5, column 7): the red, green and blue planes at offsets 0, 1024, 2048
    r, g, b = (first[b"data"][0, plane * 1024 + 5 * 32 + 7] for plane in range(3))
    np.testing.assert_array_equal(ds.train_x[0, 5, 7], [r, g, b])
    np.testing.assert_array_equal(ds.train_y[:4], first[key])
    np.testing.assert_array_equal(ds.test_y, content[test[0]][key])


def test_archive_is_read_and_checked_against_the_published_md5(tmp_path):
    content = members("cifar10")
    path = write_archive(tmp_path / "cifar10", "cifar10", content)
    assert cifar.find("cifar10", tmp_path) == path
    ds = cifar.load("cifar10", path, verify=False)  # a fake: its md5 is not the published one
    np.testing.assert_array_equal(ds.test_y, content["test_batch"][b"labels"])
    with pytest.raises(DataError, match="md5 .* does not match the published c58f3010"):
        data.load("cifar10", tmp_path)


def test_a_pickle_that_would_run_code_is_refused(tmp_path):
    folder, content = write_folder(tmp_path, "cifar10")

    class Evil:
        def __reduce__(self):
            import os

            return (os.system, ("echo pwned",))

    (folder / "data_batch_3").write_bytes(pickle.dumps({b"data": Evil()}, protocol=2))
    with pytest.raises(DataError, match="data_batch_3: not a readable CIFAR batch file.*refuses"):
        data.load("cifar10", tmp_path)


@pytest.mark.parametrize("damage,message", [
    (lambda d: d.update({b"data": d[b"data"][:, :100]}), "uint8 \\[N, 3072\\]"),
    (lambda d: d.update({b"labels": d[b"labels"][:2]}), "4 images but labels"),
    (lambda d: d.update({b"labels": [10, 0, 1, 2]}), "labels must lie in \\[0, 10\\)"),
    (lambda d: d.pop(b"labels"), "expected the keys data and labels"),
])
def test_malformed_members_are_named(tmp_path, damage, message):
    folder, content = write_folder(tmp_path, "cifar10")
    d = content["data_batch_2"]
    damage(d)
    (folder / "data_batch_2").write_bytes(pickle.dumps(d, protocol=2))
    with pytest.raises(DataError, match=f"data_batch_2: .*{message}"):
        data.load("cifar10", tmp_path)


def test_truncated_file_and_missing_data_are_clear_errors(tmp_path, monkeypatch):
    folder, _ = write_folder(tmp_path, "cifar100")
    blob = (folder / "train").read_bytes()
    (folder / "train").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(DataError, match="train: not a readable CIFAR batch file"):
        data.load("cifar100", tmp_path)
    # nothing there, and no tensorflow-datasets to fall back on: one error that says how
    monkeypatch.setattr(data.tfds_source, "available", lambda: "no tfds here")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="cifar-10-python.tar.gz or its extracted folder"):
        data.load("cifar10", empty)


def test_cli_runs_split_cifar10_from_a_data_dir(tmp_path):
    from ocljax.cli import main

    write_folder(tmp_path / "data", "cifar10", n=8)
    code = main(["--dataset", "cifar10", "--data-dir", str(tmp_path / "data"), "--learner", "er",
                 "--n-tasks", "2", "--set", "width=8", "--set", "depth=1", "--set",
                 "buffer_size=10", "--eval-every", "0", "--no-out", "--quiet"], prog="t")
    assert code == 0


@pytest.mark.parametrize("module,name,tasks", [("split_cifar10", "cifar10", 5),
                                               ("split_cifar100", "cifar100", 20)])
def test_presets_run_on_the_original_format(tmp_path, module, name, tasks):
    import importlib

    from ocljax.cli import main

    preset = importlib.import_module(f"experiments.{module}").PRESET
    assert preset["dataset"] == name and preset["n_tasks"] == tasks
    assert preset["model"] == "resnet18"
    # the preset on a small fake of the files; a tiny MLP keeps the test short
    write_folder(tmp_path / "data", name, n=300 if name == "cifar100" else 24)
    out = tmp_path / "run"
    code = main(["--data-dir", str(tmp_path / "data"), "--seeds", "1", "--model", "mlp",
                 "--set", "width=8", "--set", "depth=1", "--set", "buffer_size=10",
                 "--learner", "er", "--quiet", "--out", str(out)], prog=module, preset=preset)
    assert code == 0
    config = (out / "config.json").read_text()
    assert f'"{name}"' in config and '"n_tasks": ' + str(tasks) in config
