"""Datasets by name, from the first source that has them.

``digits`` and ``synthetic`` are embedded (no files, no network). ``mnist`` and
``fashion_mnist`` come from, in order: the original IDX ``.gz`` files in ``data_dir`` (or
``$OCLJAX_DATA_DIR``), verified against their published sha256; then tensorflow-datasets
(download or a prepared data dir); otherwise one ``DataError`` saying how to provide them.
``cifar10`` and ``cifar100`` (32 x 32 x 3; CIFAR-100 with its 100 fine labels) come the same way
from the original python-version archive (md5-verified) or its extracted folder
(``ocljax.data.cifar``), then tensorflow-datasets.
"""

from __future__ import annotations

import os
from pathlib import Path

from ocljax.data import cifar, digits, idx, synthetic, tfds_source
from ocljax.data.dataset import Dataset, validate
from ocljax.errors import DataError, unknown_choice

EMBEDDED = {"digits": digits.load, "synthetic": synthetic.load}
IDX_DATASETS = tuple(idx.SHA256)
CIFAR_DATASETS = tuple(cifar.LAYOUT)
DATASETS = (*EMBEDDED, *IDX_DATASETS, *CIFAR_DATASETS)
ENV_VAR = "OCLJAX_DATA_DIR"


def how_to_provide(name: str) -> str:
    """Instructions for getting ``name`` onto a machine."""
    if name in CIFAR_DATASETS:
        archive, _, folder, *_ = cifar.LAYOUT[name]
        files = f"the original archive {archive} or its extracted folder {folder}"
    else:
        files = f"the original IDX files ({', '.join(idx.FILES.values())})"
    return (
        f"To provide {name}: put {files} in DIR or DIR/{name} and pass "
        f"--data-dir DIR (or set {ENV_VAR}=DIR); or `pip install 'ocljax[tfds]'` on a machine "
        "with internet so tensorflow-datasets downloads it (TFDS_DATA_DIR selects a prepared "
        "tfds data dir)."
    )


def load(name: str, data_dir: str | os.PathLike | None = None, download: bool = True) -> Dataset:
    """Load dataset ``name`` (one of ``DATASETS``) as a host ``Dataset``.

    A corrupt IDX file in ``data_dir`` is an error (never silently replaced by a download).
    """
    if name in EMBEDDED:
        return EMBEDDED[name]()
    if name not in DATASETS:
        raise DataError(unknown_choice("dataset", name, DATASETS))
    tried = []
    data_dir = data_dir or os.environ.get(ENV_VAR)
    if data_dir:
        path = Path(data_dir)
        if not path.exists():
            raise DataError(f"data directory {path} does not exist")
        if not path.is_dir():
            raise DataError(f"data directory {path} is a file, not a directory")
        if name in CIFAR_DATASETS:
            found = cifar.find(name, path)
            if found is not None:
                return cifar.load(name, found)
            archive, _, folder, *_ = cifar.LAYOUT[name]
            tried.append(f"neither {archive} nor a complete {folder} folder in {path} or "
                         f"{path / name}")
        elif idx.find_dir(name, path) is not None:
            return idx.load(name, path)
        else:
            tried.append(f"no complete set of IDX files in {path} or {path / name}"
                         + idx.missing_note(path, name))
    try:
        return tfds_source.load(name, os.environ.get("TFDS_DATA_DIR"), download=download)
    except DataError as err:
        tried.append(str(err))
    raise DataError(f"{name} is not available ({'; '.join(tried)}). {how_to_provide(name)}")


__all__ = ["DATASETS", "Dataset", "ENV_VAR", "load", "validate"]
