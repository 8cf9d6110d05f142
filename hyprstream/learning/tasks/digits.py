"""Handwritten digits (scikit-learn's bundled 8x8 images, 10 classes): an MLP (``digits``) and a
small CNN (``digits-cnn``) on the same data and store table.

Ingested records: ``{"features": [64 numbers in 0..1, row by row], "label": 0..9 (optional)}``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from hyprstream.learning.task import Dataset, Task, register, seeded
from hyprstream.learning.tasks._records import label_column, number_list
from hyprstream.errors import ValidationError

N_FEATURES = 64
N_CLASSES = 10



@register("digits")
class DigitsTask(Task):
    n_classes = N_CLASSES
    schema = pa.schema([
        pa.field("features", pa.list_(pa.float32(), N_FEATURES), nullable=False),
        pa.field("label", pa.int32(), nullable=False),
    ])

    def build_model(self, seed: int):
        import torch
        from torch import nn

        class DigitsMLP(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.fc1 = nn.Linear(N_FEATURES, 128)
                self.fc2 = nn.Linear(128, 64)
                self.head = nn.Linear(64, N_CLASSES)

            def forward(self, x):
                x = torch.relu(self.fc1(x))
                x = torch.relu(self.fc2(x))
                return self.head(x)

        return seeded(seed, DigitsMLP)

    def load_reference_data(self, seed: int) -> tuple[Dataset, Dataset]:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        bunch = load_digits()
        x = (bunch.data / 16.0).astype(np.float32)
        y = bunch.target.astype(np.int64)
        x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.25, random_state=seed, stratify=y)
        return Dataset(x_tr, y_tr), Dataset(x_te, y_te)

    def to_table(self, data: Dataset) -> pa.Table:
        flat = pa.array(np.ascontiguousarray(data.x, dtype=np.float32).reshape(-1))
        features = pa.FixedSizeListArray.from_arrays(flat, N_FEATURES)
        return pa.Table.from_arrays([features, pa.array(data.y.astype(np.int32))], schema=self.schema)

    def _check(self, table: pa.Table) -> pa.Table:
        if not table.schema.equals(self.schema, check_metadata=False):
            raise ValidationError(f"{self.name} data must have schema {self.schema}, got {table.schema}")
        return table.combine_chunks()

    def features(self, table: pa.Table) -> np.ndarray:
        table = self._check(table)
        if table.num_rows == 0:
            return np.empty((0, N_FEATURES), np.float32)
        feats = table.column("features").chunk(0)
        return feats.flatten().to_numpy(zero_copy_only=False).reshape(-1, N_FEATURES)

    def records_to_table(self, records: Sequence[Mapping[str, Any]]) -> pa.Table:
        x = np.stack([number_list(r, i, "features", N_FEATURES, lo=0.0, hi=1.0) for i, r in enumerate(records)]) \
            if records else np.empty((0, N_FEATURES), np.float32)
        return self.to_table(Dataset(x, label_column(records, N_CLASSES)))

    def example_input(self, batch: int, seed: int = 0) -> np.ndarray:
        return np.random.default_rng(seed).random((batch, N_FEATURES), dtype=np.float32)


@register("digits-cnn")
class DigitsCnnTask(DigitsTask):
    """The digits data as 1x8x8 images through two convolutions (the int8 path quantizes these
    statically, with calibration data)."""

    def build_model(self, seed: int):
        import torch
        from torch import nn

        class DigitsCNN(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
                self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
                self.fc = nn.Linear(32 * 4 * 4, 64)
                self.head = nn.Linear(64, N_CLASSES)

            def forward(self, x):
                x = x.reshape(-1, 1, 8, 8)
                x = torch.relu(self.conv1(x))
                x = torch.max_pool2d(torch.relu(self.conv2(x)), 2)
                x = torch.relu(self.fc(x.flatten(1)))
                return self.head(x)

        return seeded(seed, DigitsCNN)
