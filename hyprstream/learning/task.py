"""Task plugins: a model, its trainable layer groups, how to read its data from the store, and metrics.

A task is found by name (:func:`get_task`); the fog names it in every train request and the agent and
the simulator build the same model from it, so master-weight keys are the bare model's state-dict keys.

Besides training (:meth:`Task.from_table`), a task tells the agent how to take in data as it arrives
(:meth:`Task.records_to_table`: JSON-like records from files, the local HTTP endpoint or MQTT into
rows of its store table), which inputs the model sees for any rows (:meth:`Task.features`, labelled
or not; rows without a label carry :data:`UNLABELLED`) and how to read the model's outputs
(:meth:`Task.interpret`). A task whose features depend on a key's earlier rows (a sensor's previous
reading) says so with ``context_key`` and ``context_rows``; the agent then passes those rows first.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from hyprstream import plugins
from hyprstream.errors import ValidationError
from hyprstream.store.layer_table import layer_of


UNLABELLED = -1
"""The label of a stored row whose true label is unknown (ingested for inference only)."""


@dataclass(frozen=True)
class Dataset:
    """Features and labels as numpy arrays (rows aligned)."""

    x: np.ndarray
    y: np.ndarray

    def __len__(self) -> int:
        return len(self.y)


def holdout(data: Dataset, share: float, salt: bytes) -> tuple[Dataset, Dataset]:
    """``data`` split into (training, held out): an example is held out when a keyed hash of its content
    (features and label, keyed by ``salt``) falls below ``share``. The split depends on each example alone,
    not on its position, so it stays put as the store grows, compacts or ages rows out: an example held
    out once is never trained on later. ``share`` 0: nothing is held out."""
    if not 0.0 <= share < 1.0:
        raise ValidationError(f"a held-out share must be in [0, 1), got {share!r}")
    if share == 0.0 or len(data) == 0:
        return data, Dataset(data.x[:0], data.y[:0])
    import hashlib

    x = np.ascontiguousarray(data.x)
    y = np.ascontiguousarray(data.y)
    cut = int(share * 2**64)
    held = np.fromiter((int.from_bytes(hashlib.blake2b(x[i].tobytes() + y[i].tobytes(), digest_size=8,
                                                       key=salt[:64]).digest(), "big") < cut
                        for i in range(len(y))), dtype=bool, count=len(y))
    return Dataset(x[~held], y[~held]), Dataset(x[held], y[held])


class Task(abc.ABC):
    """A learning task. Subclasses are stateless; models are built fresh from a seed."""

    name: str
    schema: pa.Schema  # schema of the store table "samples" that holds the task's local data
    table: str = "samples"
    n_classes: int  # labels are 0 .. n_classes - 1
    time_column: str | None = None  # a timestamp column of ``schema`` (age retention), if any
    context_key: str | None = None  # features of a row depend on the previous rows of this key ...
    context_rows: int = 0  # ... this many of them
    class_weights: tuple[float, ...] | None = None  # loss weight of each class (a rare class weighted up), or None
    examples_per_record: int = 1  # training examples one stored record can enter (a window's features: its length)

    @property
    def privacy_unit(self) -> str:
        """What sample-level DP-SGD protects for this task (the ledger's ``unit``): one example, or one
        stored record that enters a group of examples (accounted for the whole group)."""
        if self.examples_per_record == 1:
            return "example"
        return f"record (group of {self.examples_per_record} examples)"

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
        """(train, test) from the task's reference data set, as stored (``to_table`` input).

        Model input is what ``from_table`` returns; the simulator evaluates on
        ``from_table(to_table(test))`` so that it sees exactly what a device would."""

    @abc.abstractmethod
    def to_table(self, data: Dataset) -> pa.Table:
        """Rows of the store table for ``data``."""

    def from_table(self, table: pa.Table) -> Dataset:
        """Features and labels of the labelled store rows (labels checked to lie in
        ``[0, n_classes)``); raises ValidationError on a bad schema."""
        x = self.features(table)
        y = table.column("label").to_numpy().astype(np.int64)
        keep = y != UNLABELLED
        x, y = x[keep], y[keep]
        if len(y) and (y.min() < 0 or y.max() >= self.n_classes):
            raise ValidationError(f"{self.name} labels must lie in [0, {self.n_classes})")
        return Dataset(x, y)

    def features(self, table: pa.Table) -> np.ndarray:
        """Model inputs for every row of ``table`` (labelled or not), in row order.

        The default is :meth:`from_table`'s features, right for tasks that store labelled rows only;
        a task that also stores :data:`UNLABELLED` rows (ingested for inference) overrides it.
        """
        return self.from_table(table).x

    def records_to_table(self, records: Sequence[Mapping[str, Any]]) -> pa.Table:
        """Store rows for ingested records (a missing ``label`` is :data:`UNLABELLED`).

        Raises ValidationError naming the record and field that does not fit. The default refuses
        every record: a task that the agent should feed from its ingestion sources overrides it.
        """
        raise ValidationError(f"task {self.name!r} takes no ingested records")

    def example_input(self, batch: int, seed: int = 0) -> np.ndarray:
        """A batch of valid model inputs (ONNX export, calibration, benchmarks); the default takes
        rows of the reference test set."""
        _, test = self.load_reference_data(seed)
        return np.ascontiguousarray(np.resize(test.x, (batch, *test.x.shape[1:])))

    def interpret(self, outputs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(prediction, score)`` per row from the model's outputs (default: class logits ->
        argmax and its softmax probability)."""
        z = outputs - outputs.max(axis=1, keepdims=True)
        p = np.exp(z)
        p /= p.sum(axis=1, keepdims=True)
        pred = p.argmax(axis=1)
        return pred.astype(np.int32), p[np.arange(len(p)), pred].astype(np.float32)

    def loss(self, reduction: str = "mean"):
        """Cross-entropy weighted by :attr:`class_weights`.

        ``"mean"`` (plain training, evaluation): the weighted mean over the batch, which divides by
        the batch's sum of weights. ``"none"``: each example's own weighted loss, independent of the
        other examples of the batch, as DP-SGD's per-example clipping needs.
        """
        import torch

        weight = None if self.class_weights is None else torch.tensor(self.class_weights)
        return torch.nn.CrossEntropyLoss(weight=weight, reduction=reduction)


def seeded(seed: int, make: Callable[[], Any]) -> Any:
    """``make()`` with torch's global generator seeded, restoring the caller's generator state."""
    import torch

    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        return make()
    finally:
        torch.random.set_rng_state(state)


_REGISTRY: dict[str, Callable[[], Task]] = {}

ENTRY_POINT_GROUP = "hyprstream.tasks"
"""Installed packages offer tasks under this entry-point group: ``name = "package.module:TaskClass"``
(docs/agent.md, "Your own task"). A device runs only tasks its operator installed: a train request
names a task, never a module to import."""


def register(name: str) -> Callable[[type[Task]], type[Task]]:
    def deco(cls: type[Task]) -> type[Task]:
        _REGISTRY[name] = cls
        cls.name = name
        return cls

    return deco


def get_task(name: str) -> Task:
    """The task called ``name``: a built-in one, or one an installed package offers (entry point group
    ``hyprstream.tasks``), loaded and checked at its first use. Raises ValidationError naming what is
    wrong (unknown name, a plugin that does not load, or that is not a complete :class:`Task`)."""
    from hyprstream.learning import tasks  # noqa: F401  (registers the built-in tasks)

    if name not in _REGISTRY:
        plugin = _plugins().get(name)
        if plugin is None:
            raise ValidationError(f"unknown task {name!r} (known: {', '.join(task_names())})")
        _REGISTRY[name] = _load_plugin(name, plugin)
    return _REGISTRY[name]()


def task_names() -> list[str]:
    """Every task name: the built-in ones and those of installed plugins."""
    from hyprstream.learning import tasks  # noqa: F401

    return sorted(set(_REGISTRY) | set(_plugins()))


def _plugins() -> dict[str, Any]:
    """The entry points of group ``hyprstream.tasks`` on the path now (a built-in name is never
    replaced by a plugin's)."""
    return plugins.entry_points(ENTRY_POINT_GROUP)


def _load_plugin(name: str, entry_point) -> type[Task]:
    cls, where = plugins.load_entry_point("task plugin", name, entry_point)
    if not (isinstance(cls, type) and issubclass(cls, Task)):
        raise ValidationError(f"{where} is {cls!r}, not a subclass of hyprstream.learning.task.Task")
    missing = sorted(getattr(cls, "__abstractmethods__", ()))
    if missing:
        raise ValidationError(f"{where} does not implement {', '.join(missing)}")
    for attr in ("schema", "n_classes"):
        if not hasattr(cls, attr):
            raise ValidationError(f"{where} does not set {attr}")
    if not isinstance(cls.schema, pa.Schema):
        raise ValidationError(f"{where}: schema must be a pyarrow.Schema, got {type(cls.schema).__name__}")
    cls.name = name
    return cls
