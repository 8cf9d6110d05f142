"""Task plugins: a model, its trainable layer groups, how to read its data from the store, and metrics.

A task is found by name (:func:`get_task`); the fog names it in every train request and the agent and
the simulator build the same model from it, so master-weight keys are the bare model's state-dict keys.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from hyprstream.errors import ValidationError
from hyprstream.store.layer_table import layer_of


@dataclass(frozen=True)
class Dataset:
    """Features and labels as numpy arrays (rows aligned)."""

    x: np.ndarray
    y: np.ndarray

    def __len__(self) -> int:
        return len(self.y)


class Task(abc.ABC):
    """A learning task. Subclasses are stateless; models are built fresh from a seed."""

    name: str
    schema: pa.Schema  # schema of the store table "samples" that holds the task's local data
    table: str = "samples"

    @abc.abstractmethod
    def build_model(self, seed: int):
        """A freshly initialised ``torch.nn.Module``."""

    def layer_of(self, param_name: str) -> str:
        """The layer group a parameter belongs to (default: its top-level module)."""
        return layer_of(param_name)

    def layer_groups(self, model) -> list[str]:
        """Layer groups in model order."""
        return list(dict.fromkeys(self.layer_of(n) for n, _ in model.named_parameters()))

    @abc.abstractmethod
    def load_reference_data(self, seed: int) -> tuple[Dataset, Dataset]:
        """(train, test) from the task's packaged reference data set (used by the simulator)."""

    @abc.abstractmethod
    def to_table(self, data: Dataset) -> pa.Table:
        """Rows of the store table for ``data``."""

    @abc.abstractmethod
    def from_table(self, table: pa.Table) -> Dataset:
        """Features and labels from store rows; raises ValidationError on a bad schema."""

    def loss(self):
        import torch

        return torch.nn.CrossEntropyLoss()


_REGISTRY: dict[str, Callable[[], Task]] = {}


def register(name: str) -> Callable[[type[Task]], type[Task]]:
    def deco(cls: type[Task]) -> type[Task]:
        _REGISTRY[name] = cls
        cls.name = name
        return cls

    return deco


def get_task(name: str) -> Task:
    from hyprstream.agent import tasks  # noqa: F401  (registers the built-in tasks)

    if name not in _REGISTRY:
        raise ValidationError(f"unknown task {name!r} (known: {', '.join(sorted(_REGISTRY))})")
    return _REGISTRY[name]()


def task_names() -> list[str]:
    from hyprstream.agent import tasks  # noqa: F401

    return sorted(_REGISTRY)
