"""Handwritten digits (scikit-learn's bundled 8x8 images, 10 classes) with a small MLP."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from hyprstream.agent.task import Dataset, Task, register
from hyprstream.errors import ValidationError

N_FEATURES = 64
N_CLASSES = 10


@register("digits")
class DigitsTask(Task):
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

        gen_state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        try:
            return DigitsMLP()
        finally:
            torch.random.set_rng_state(gen_state)

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

    def from_table(self, table: pa.Table) -> Dataset:
        if not table.schema.equals(self.schema, check_metadata=False):
            raise ValidationError(f"digits data must have schema {self.schema}, got {table.schema}")
        table = table.combine_chunks()
        feats = table.column("features").chunk(0) if table.num_rows else None
        if feats is None:
            return Dataset(np.empty((0, N_FEATURES), np.float32), np.empty(0, np.int64))
        x = feats.flatten().to_numpy(zero_copy_only=False).reshape(-1, N_FEATURES)
        y = table.column("label").to_numpy().astype(np.int64)
        if y.min() < 0 or y.max() >= N_CLASSES:
            raise ValidationError(f"digits labels must lie in [0, {N_CLASSES})")
        return Dataset(x, y)
