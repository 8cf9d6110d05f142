"""Fashion-MNIST (Xiao et al. 2017) from the IDX files of Debian's ``dataset-fashion-mnist`` package.

The files are looked up in ``$HYPRSTREAM_FASHION_MNIST`` or ``/usr/share/datasets/fashion-mnist``
(``apt-get install dataset-fashion-mnist``; ``scripts/dev.sh`` installs it).
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np

from hyprstream.errors import ConfigError

DEFAULT_DIR = Path("/usr/share/datasets/fashion-mnist")
ENV = "HYPRSTREAM_FASHION_MNIST"
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
           "Ankle boot")


def data_dir() -> Path:
    path = Path(os.environ.get(ENV, DEFAULT_DIR))
    if not (path / "train-images-idx3-ubyte.gz").is_file():
        raise ConfigError(f"Fashion-MNIST not found in {path}: apt-get install dataset-fashion-mnist, "
                          f"or set {ENV} to a folder with the four IDX .gz files")
    return path


def read_idx(path: Path) -> np.ndarray:
    """An IDX array (the MNIST file format): magic, dimensions, then big-endian data."""
    with gzip.open(path, "rb") as fh:
        raw = fh.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ConfigError("not an IDX file", source=str(path))
    dtype = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}.get(raw[2])
    if dtype is None:
        raise ConfigError(f"unknown IDX type code {raw[2]:#x}", source=str(path))
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    data = np.frombuffer(raw, dtype=dtype, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise ConfigError(f"IDX payload has {data.size} values, header says {shape}", source=str(path))
    return data.reshape(shape)


def load(split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images as uint8 (n, 28, 28), labels as int64 (n,)) for ``split`` "train" or "test"."""
    prefix = {"train": "train", "test": "t10k"}[split]
    d = data_dir()
    x = read_idx(d / f"{prefix}-images-idx3-ubyte.gz")
    y = read_idx(d / f"{prefix}-labels-idx1-ubyte.gz").astype(np.int64)
    if len(x) != len(y):
        raise ConfigError(f"{split}: {len(x)} images but {len(y)} labels", source=str(d))
    return x, y
