"""CIFAR-10 and CIFAR-100 from the original "python version" files (Krizhevsky 2009).

The archives ``cifar-10-python.tar.gz`` and ``cifar-100-python.tar.gz`` are verified against
the md5 sums published on the dataset page; an extracted folder (``cifar-10-batches-py`` /
``cifar-100-python``) is read as it is. Each member is a pickled dict (Python 2, protocol 2)
with ``b"data"``, a [N, 3072] uint8 array of rows holding the red, green and blue 32 x 32
planes one after another, and the labels (``b"labels"``; CIFAR-100: ``b"fine_labels"``, the 100
classes). The pickles are read with an unpickler that builds only dicts, lists, strings, numbers
and numpy arrays (and the latin-1 ``codecs.encode`` that Python 3's protocol-2 pickles use
for bytes), so a tampered file cannot run code.
"""

from __future__ import annotations

import codecs
import hashlib
import io
import pickle
import tarfile
from pathlib import Path

import numpy as np

from ocljax.data.dataset import Dataset, validate
from ocljax.errors import DataError

# name: (archive, published md5, folder inside it, training members, test members, label key,
# classes)
LAYOUT = {
    "cifar10": ("cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a",
                "cifar-10-batches-py", tuple(f"data_batch_{i}" for i in range(1, 6)),
                ("test_batch",), b"labels", 10),
    "cifar100": ("cifar-100-python.tar.gz", "eb9058c3a382ffc7106e4002c42a8d85",
                 "cifar-100-python", ("train",), ("test",), b"fine_labels", 100),
}
SIDE, CHANNELS = 32, 3


def _numpy_globals() -> dict:
    try:  # numpy >= 2 keeps these in numpy._core; old pickles name numpy.core
        from numpy._core.multiarray import _reconstruct, scalar
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core.multiarray import _reconstruct, scalar
    allowed = {"_reconstruct": _reconstruct, "scalar": scalar, "ndarray": np.ndarray,
               "dtype": np.dtype}
    out = {(module, name): obj for module in ("numpy", "numpy.core.multiarray",
                                              "numpy._core.multiarray")
           for name, obj in allowed.items()}
    # Python 3 writes bytes at protocol 2 as codecs.encode(text, "latin1"), a pure function
    out[("_codecs", "encode")] = codecs.encode
    return out


class _SafeUnpickler(pickle.Unpickler):
    """Builds plain containers and numpy arrays; refuses every other global."""

    allowed = _numpy_globals()

    def find_class(self, module, name):
        try:
            return self.allowed[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refuses to load {module}.{name}") from None


def unpickle(blob: bytes, name: str) -> dict:
    """One CIFAR member's dict, read safely; a ``DataError`` naming ``name`` when it is not one."""
    try:
        out = _SafeUnpickler(io.BytesIO(blob), encoding="bytes").load()
    except Exception as err:  # truncated, corrupt or tampered pickles raise many types
        raise DataError(f"{name}: not a readable CIFAR batch file ({err})") from None
    if not isinstance(out, dict):
        raise DataError(f"{name}: not a CIFAR batch file (holds a {type(out).__name__})")
    return out


def decode(batch: dict, label_key: bytes, classes: int, name: str) -> tuple[np.ndarray,
                                                                              np.ndarray]:
    """``([N, 32, 32, 3] uint8, [N] int32)`` from one member's dict."""
    if b"data" not in batch or label_key not in batch:
        keys = ", ".join(sorted(k.decode() if isinstance(k, bytes) else str(k) for k in batch))
        raise DataError(f"{name}: expected the keys data and {label_key.decode()}, found {keys}")
    data = np.asarray(batch[b"data"])
    labels = np.asarray(batch[label_key])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != CHANNELS * SIDE * SIDE:
        raise DataError(f"{name}: data must be uint8 [N, 3072], got {data.dtype} {data.shape}")
    if labels.shape != (data.shape[0],) or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{name}: {data.shape[0]} images but labels {labels.dtype} "
                        f"{labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= classes):
        raise DataError(f"{name}: labels must lie in [0, {classes}), got "
                        f"[{labels.min()}, {labels.max()}]")
    images = data.reshape(-1, CHANNELS, SIDE, SIDE).transpose(0, 2, 3, 1)  # planes -> HWC
    return np.ascontiguousarray(images), labels.astype(np.int32)


def find(name: str, data_dir: Path) -> Path | None:
    """The archive or extracted folder of ``name`` in ``data_dir`` or ``data_dir/name``."""
    archive, _, folder, train, test, *_ = LAYOUT[name]
    for base in (data_dir / name, data_dir):
        if (base / archive).is_file():
            return base / archive
        if all((base / folder / m).is_file() for m in train + test):
            return base / folder
    return None


def _members_from_archive(path: Path, name: str, verify: bool) -> dict[str, bytes]:
    archive, md5, folder, train, test, *_ = LAYOUT[name]
    try:
        blob = path.read_bytes()
    except OSError as err:
        raise DataError(f"{path}: cannot be read ({err.strerror or err})") from None
    if verify:
        digest = hashlib.md5(blob).hexdigest()
        if digest != md5:
            raise DataError(f"{path}: md5 {digest} does not match the published {md5} "
                            f"(corrupt, truncated or another file); replace it with the "
                            f"original {archive}")
    out = {}
    try:
        with tarfile.open(fileobj=io.BytesIO(blob), mode="r:gz") as tar:
            for member in train + test:
                try:
                    f = tar.extractfile(f"{folder}/{member}")
                except KeyError:
                    f = None
                if f is None:
                    raise DataError(f"{path}: has no {folder}/{member}")
                out[member] = f.read()
    except (tarfile.TarError, OSError, EOFError) as err:
        raise DataError(f"{path}: not a valid tar.gz archive ({err})") from None
    return out


def load(name: str, path: Path, verify: bool = True) -> Dataset:
    """Load ``name`` (``cifar10`` or ``cifar100``) from its archive (md5-verified unless
    ``verify`` is False) or its extracted folder, as ``find`` returns them."""
    _, _, _, train, test, label_key, classes = LAYOUT[name]
    if path.is_dir():
        members = {}
        for m in train + test:
            try:
                members[m] = (path / m).read_bytes()
            except OSError as err:
                raise DataError(f"{path / m}: cannot be read ({err.strerror or err})") from None
    else:
        members = _members_from_archive(path, name, verify)

    def split(names):
        parts = [decode(unpickle(members[m], f"{path}/{m}"), label_key, classes, f"{path}/{m}")
                 for m in names]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    (train_x, train_y), (test_x, test_y) = split(train), split(test)
    return validate(Dataset(name, train_x, train_y, test_x, test_y, classes, str(path)))


__all__ = ["LAYOUT", "decode", "find", "load", "unpickle"]
