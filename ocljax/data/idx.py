"""The original IDX (LeCun) files of MNIST and Fashion-MNIST, verified by sha256.

IDX: a big-endian header (magic 2051 for images / 2049 for labels, item count, then rows and
columns for images) followed by uint8 data. Files are the gzip'd originals.
"""

from __future__ import annotations

import gzip
import hashlib
import struct
from pathlib import Path

import numpy as np

from ocljax.data.dataset import Dataset, validate
from ocljax.errors import DataError

FILES = {
    "train_x": "train-images-idx3-ubyte.gz",
    "train_y": "train-labels-idx1-ubyte.gz",
    "test_x": "t10k-images-idx3-ubyte.gz",
    "test_y": "t10k-labels-idx1-ubyte.gz",
}

# Published sha256 of the original files (the ones tensorflow-datasets 4.9.10 registers).
SHA256 = {
    "mnist": {
        "train-images-idx3-ubyte.gz": "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",  # noqa: E501
        "train-labels-idx1-ubyte.gz": "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",  # noqa: E501
        "t10k-images-idx3-ubyte.gz": "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",  # noqa: E501
        "t10k-labels-idx1-ubyte.gz": "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",  # noqa: E501
    },
    "fashion_mnist": {
        "train-images-idx3-ubyte.gz": "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",  # noqa: E501
        "train-labels-idx1-ubyte.gz": "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",  # noqa: E501
        "t10k-images-idx3-ubyte.gz": "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",  # noqa: E501
        "t10k-labels-idx1-ubyte.gz": "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",  # noqa: E501
    },
}

IMAGE_MAGIC, LABEL_MAGIC = 2051, 2049


def parse(raw: bytes, name: str = "<bytes>") -> np.ndarray:
    """Decode one uncompressed IDX file: images -> [N, H, W] uint8, labels -> [N] uint8."""
    if len(raw) < 8:
        raise DataError(f"{name}: too short to be an IDX file ({len(raw)} bytes)")
    magic, count = struct.unpack(">II", raw[:8])
    if magic == IMAGE_MAGIC:
        if len(raw) < 16:
            raise DataError(f"{name}: truncated IDX image header")
        rows, cols = struct.unpack(">II", raw[8:16])
        shape, offset = (count, rows, cols), 16
    elif magic == LABEL_MAGIC:
        shape, offset = (count,), 8
    else:
        raise DataError(f"{name}: bad IDX magic number {magic} (expected 2051 or 2049)")
    expected = int(np.prod(shape))
    if len(raw) - offset != expected:
        raise DataError(
            f"{name}: header promises {expected} bytes of data, file holds {len(raw) - offset}"
        )
    return np.frombuffer(raw, np.uint8, offset=offset).reshape(shape)


def published_as(digest: str) -> tuple[str, str] | None:
    """``(dataset, file name)`` whose published sha256 is ``digest``, or ``None``."""
    for name, sums in SHA256.items():
        for fname, published in sums.items():
            if published == digest:
                return name, fname
    return None


def read_file(path: Path, expected_sha256: str | None) -> np.ndarray:
    """Read, verify and decode one ``.gz`` IDX file."""
    try:
        blob = path.read_bytes()
    except OSError as err:
        raise DataError(f"{path}: cannot be read ({err.strerror or err})") from None
    if expected_sha256 is not None:
        digest = hashlib.sha256(blob).hexdigest()
        if digest != expected_sha256:
            known = published_as(digest)
            what = (f"it is {known[0]}'s {known[1]}" if known else
                    "corrupt, truncated or a different dataset's file")
            raise DataError(
                f"{path}: sha256 {digest[:16]}... does not match the published "
                f"{expected_sha256[:16]}... ({what}); replace it with the original file"
            )
    try:
        raw = gzip.decompress(blob)
    except (OSError, EOFError) as err:
        raise DataError(f"{path}: not a valid gzip file ({err})") from None
    return parse(raw, str(path))


def find_dir(name: str, data_dir: Path) -> Path | None:
    """The folder holding ``name``'s IDX files: ``data_dir/name`` or ``data_dir`` itself."""
    for cand in (data_dir / name, data_dir):
        if all((cand / f).is_file() for f in FILES.values()):
            return cand
    return None


def missing_note(data_dir: Path, name: str) -> str:
    """``" (missing in DIR: ...)"`` naming the IDX files absent from DIR, the folder
    (``data_dir/name`` or ``data_dir``) that holds the most of them; ``""`` when neither
    holds any."""
    best = max((data_dir / name, data_dir),
               key=lambda d: sum((d / f).is_file() for f in FILES.values()))
    missing = [f for f in FILES.values() if not (best / f).is_file()]
    if len(missing) == len(FILES):
        return ""
    return f" (missing in {best}: {', '.join(missing)})"


def load(name: str, data_dir: Path, verify: bool = True) -> Dataset:
    """Load MNIST-format dataset ``name`` from the IDX files under ``data_dir``."""
    folder = find_dir(name, data_dir)
    if folder is None:
        present = [f for f in FILES.values() if (data_dir / name / f).exists()] or [
            f for f in FILES.values() if (data_dir / f).exists()
        ]
        missing = sorted(set(FILES.values()) - set(present))
        raise DataError(f"{name}: missing IDX file(s) {', '.join(missing)} in {data_dir}")
    sums = SHA256.get(name, {}) if verify else {}
    arrays = {key: read_file(folder / fname, sums.get(fname)) for key, fname in FILES.items()}
    ds = Dataset(
        name=name,
        train_x=arrays["train_x"][..., None],
        train_y=arrays["train_y"].astype(np.int32),
        test_x=arrays["test_x"][..., None],
        test_y=arrays["test_y"].astype(np.int32),
        num_classes=10,
        source=f"idx:{folder}",
    )
    return validate(ds)
