"""Fashion-MNIST clothing images (28x28 grey, 10 classes) with a small CNN."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from hyprstream.learning.task import Dataset, Task, register, seeded
from hyprstream.learning.tasks._records import label_column, number_list
from hyprstream.errors import ValidationError

SIDE = 28
N_CLASSES = 10


@register("fashion_mnist")
class FashionMnistTask(Task):
    n_classes = N_CLASSES
    schema = pa.schema([
        pa.field("image", pa.list_(pa.uint8(), SIDE * SIDE), nullable=False),
        pa.field("label", pa.int32(), nullable=False),
    ])

    def build_model(self, seed: int):
        import torch
        from torch import nn

        class FashionCNN(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
                self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
                self.fc = nn.Linear(32 * 7 * 7, 64)
                self.head = nn.Linear(64, N_CLASSES)

            def forward(self, x):
                x = x.view(-1, 1, SIDE, SIDE)
                x = torch.max_pool2d(torch.relu(self.conv1(x)), 2)
                x = torch.max_pool2d(torch.relu(self.conv2(x)), 2)
                x = torch.relu(self.fc(x.flatten(1)))
                return self.head(x)

        return seeded(seed, FashionCNN)

    def load_reference_data(self, seed: int) -> tuple[Dataset, Dataset]:
        from hyprstream.data import fashion_mnist

        x_tr, y_tr = fashion_mnist.load("train")
        x_te, y_te = fashion_mnist.load("test")
        return Dataset(x_tr.reshape(len(x_tr), -1), y_tr), Dataset(x_te.reshape(len(x_te), -1), y_te)

    def to_table(self, data: Dataset) -> pa.Table:
        raw = np.ascontiguousarray(data.x, dtype=np.uint8).reshape(-1)
        images = pa.FixedSizeListArray.from_arrays(pa.array(raw), SIDE * SIDE)
        return pa.Table.from_arrays([images, pa.array(data.y.astype(np.int32))], schema=self.schema)

    def _check(self, table: pa.Table) -> pa.Table:
        if not table.schema.equals(self.schema, check_metadata=False):
            raise ValidationError(f"fashion_mnist data must have schema {self.schema}, got {table.schema}")
        return table.combine_chunks()

    def features(self, table: pa.Table) -> np.ndarray:
        table = self._check(table)
        if table.num_rows == 0:
            return np.empty((0, SIDE * SIDE), np.float32)
        raw = table.column("image").chunk(0).flatten().to_numpy(zero_copy_only=False)
        return _scale(raw.reshape(-1, SIDE * SIDE))

    def records_to_table(self, records: Sequence[Mapping[str, Any]]) -> pa.Table:
        """Records ``{"image": 784 grey levels 0..255 row by row, "label": 0..9 (optional)}``."""
        x = (np.stack([number_list(r, i, "image", SIDE * SIDE, lo=0.0, hi=255.0) for i, r in enumerate(records)])
             if records else np.empty((0, SIDE * SIDE)))
        return self.to_table(Dataset(np.rint(x).astype(np.uint8), label_column(records, N_CLASSES)))

    def example_input(self, batch: int, seed: int = 0) -> np.ndarray:
        return _scale(np.random.default_rng(seed).integers(0, 256, (batch, SIDE * SIDE)))


def _scale(x: np.ndarray) -> np.ndarray:
    return (x.astype(np.float32) / 255.0 - 0.2860) / 0.3530  # the training set's mean and std
