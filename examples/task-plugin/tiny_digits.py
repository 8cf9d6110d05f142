"""A third-party task for Hyprstream: the digits data with a smaller model of two layer groups.

Installed next to Hyprstream on the devices (and wherever the simulator runs), it is found by its
entry point (``hyprstream.tasks``: ``tiny-digits``); a fog then names it in ``[rounds] task``.
It keeps the built-in digits task's store schema, data loading and ingestion, and brings its own
model: layer groups ``body`` and ``head`` (a parameter's group is its top-level module).
"""

from __future__ import annotations

from hyprstream.learning.task import seeded
from hyprstream.learning.tasks.digits import N_CLASSES, N_FEATURES, DigitsTask


class TinyDigits(DigitsTask):
    def build_model(self, seed: int):
        import torch
        from torch import nn

        class Tiny(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.body = nn.Linear(N_FEATURES, 32)
                self.head = nn.Linear(32, N_CLASSES)

            def forward(self, x):
                return self.head(torch.relu(self.body(x)))

        return seeded(seed, Tiny)
