import gzip
import struct

import numpy as np
import pytest

from ocljax import data
from ocljax.data import idx, tfds_source
from ocljax.errors import DataError


def write_idx(folder, n=12, rows=4, cols=4, seed=0):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for split, count in (("train", n), ("t10k", n // 2)):
        images = rng.integers(0, 256, size=(count, rows, cols), dtype=np.uint8)
        labels = rng.integers(0, 10, size=count, dtype=np.uint8)
        (folder / f"{split}-images-idx3-ubyte.gz").write_bytes(gzip.compress(
            struct.pack(">IIII", 2051, count, rows, cols) + images.tobytes()))
        (folder / f"{split}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(
            struct.pack(">II", 2049, count) + labels.tobytes()))
    return folder


def test_idx_roundtrip_without_checksum(tmp_path):
    folder = write_idx(tmp_path / "mnist")
    ds = idx.load("mnist", tmp_path, verify=False)
    assert ds.train_x.shape == (12, 4, 4, 1) and ds.train_x.dtype == np.uint8
    assert ds.test_y.shape == (6,) and ds.test_y.dtype == np.int32
    assert str(folder) in ds.source


def test_checksum_failure_names_the_file(tmp_path):
    write_idx(tmp_path)
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte\.gz: sha256"):
        data.load("mnist", tmp_path)


@pytest.mark.parametrize("payload, message", [
    (struct.pack(">II", 1234, 3) + b"abc", "bad IDX magic"),
    (struct.pack(">II", 2049, 5) + b"abc", "header promises 5 bytes"),
    (b"\x00\x01", "too short"),
])
def test_parse_rejects_malformed_files(payload, message):
    with pytest.raises(DataError, match=message):
        idx.parse(payload, "x")


def test_corrupt_gzip_and_missing_files(tmp_path):
    folder = write_idx(tmp_path)
    (folder / "t10k-labels-idx1-ubyte.gz").write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match="not a valid gzip"):
        idx.load("mnist", folder, verify=False)
    (folder / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match="missing IDX file.*t10k-labels"):
        idx.load("mnist", folder)


def test_unavailable_dataset_explains_how_to_provide_it(tmp_path, monkeypatch):
    monkeypatch.delenv(data.ENV_VAR, raising=False)
    monkeypatch.setattr(tfds_source, "available", lambda: "tensorflow is not installed")
    with pytest.raises(DataError) as err:
        data.load("fashion_mnist", tmp_path)
    text = str(err.value)
    assert "--data-dir" in text and "OCLJAX_DATA_DIR" in text and "ocljax[tfds]" in text
    with pytest.raises(DataError, match="does not exist"):
        data.load("mnist", tmp_path / "nowhere")
    with pytest.raises(DataError, match="unknown dataset 'cifar1000'"):
        data.load("cifar1000")


def test_embedded_digits():
    ds = data.load("digits")
    assert ds.train_x.shape[1:] == (8, 8, 1)
    assert len(ds.train_y) + len(ds.test_y) == 1797
    assert set(np.unique(ds.test_y)) == set(range(10))


def test_digits_read_without_sklearn_import_equal_load_digits(monkeypatch, tmp_path):
    """The direct CSV read gives scikit-learn's own arrays; a damaged file is a DataError."""
    from sklearn.datasets import load_digits

    from ocljax.data import digits

    images, y = digits.read_arrays()
    ref = load_digits()
    np.testing.assert_array_equal(images, ref.images)
    np.testing.assert_array_equal(y, ref.target)
    bad = tmp_path / "digits.csv.gz"
    bad.write_bytes(b"not gzip")
    monkeypatch.setattr(digits, "bundled_file", lambda: bad)
    with pytest.raises(DataError, match="unreadable digits file"):
        digits.read_arrays()


@pytest.mark.parametrize("name, counts", [
    ("mnist", [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]),
    ("fashion_mnist", [6000] * 10),
])
def test_real_offline_copies_load_and_verify(shared_data, monkeypatch, name, counts):
    monkeypatch.setenv(data.ENV_VAR, str(shared_data))
    ds = data.load(name)
    assert ds.train_x.shape == (60000, 28, 28, 1) and ds.test_x.shape == (10000, 28, 28, 1)
    assert np.bincount(ds.train_y).tolist() == counts
