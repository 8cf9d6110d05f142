"""Model weights as Arrow layer tables: one row per parameter tensor.

Schema: ``layer`` (the layer group a tensor belongs to, e.g. ``fc1``), ``name`` (the parameter's
state-dict key, e.g. ``fc1.weight``), ``dtype`` (numpy dtype string), ``shape`` (list of int64) and
``data`` (the tensor's raw little-endian bytes, C order). Keys never depend on wrappers: a parameter
is named as in the bare model's ``state_dict``.

Reading a table back gives numpy views onto the Arrow buffers when the bytes are suitably aligned
(Arrow allocates 64-byte aligned buffers, so same-dtype tables are zero-copy), and copies otherwise.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from hyprstream.errors import ValidationError

if TYPE_CHECKING:
    import torch

LAYER_SCHEMA = pa.schema(
    [
        pa.field("layer", pa.string(), nullable=False),
        pa.field("name", pa.string(), nullable=False),
        pa.field("dtype", pa.string(), nullable=False),
        pa.field("shape", pa.list_(pa.int64()), nullable=False),
        pa.field("data", pa.large_binary(), nullable=False),
    ]
)

SUPPORTED_DTYPES = frozenset({"float16", "float32", "float64", "int8", "uint8", "int32", "int64"})


def layer_of(name: str) -> str:
    """Default layer group of a parameter: its top-level module (``fc1.weight`` -> ``fc1``)."""
    return name.split(".", 1)[0]


def to_table(
    arrays: Mapping[str, np.ndarray],
    *,
    layer: Callable[[str], str] = layer_of,
    metadata: Mapping[str, str] | None = None,
) -> pa.Table:
    """Build a layer table from ``{parameter name: array}`` (keeps the mapping's order)."""
    layers, names, dtypes, shapes, blobs = [], [], [], [], []
    for name, arr in arrays.items():
        a = np.asarray(arr)
        if a.dtype.name not in SUPPORTED_DTYPES:
            raise ValidationError(f"parameter {name!r}: unsupported dtype {a.dtype.name}")
        # np.require keeps 0-d arrays 0-d (np.ascontiguousarray would make them 1-d)
        a = np.require(a, dtype=a.dtype.newbyteorder("<"), requirements="C")
        layers.append(layer(name))
        names.append(name)
        dtypes.append(a.dtype.name)
        shapes.append(list(a.shape))
        blobs.append(a.reshape(-1).view(np.uint8))
    offsets = np.zeros(len(blobs) + 1, dtype=np.int64)
    np.cumsum([b.size for b in blobs], out=offsets[1:])
    values = np.concatenate(blobs) if blobs else np.empty(0, np.uint8)
    data = pa.LargeBinaryArray.from_buffers(
        pa.large_binary(), len(blobs), [None, pa.py_buffer(offsets), pa.py_buffer(values)]
    )
    table = pa.Table.from_arrays(
        [pa.array(layers, pa.string()), pa.array(names, pa.string()),
         pa.array(dtypes, pa.string()), pa.array(shapes, pa.list_(pa.int64())), data],
        schema=LAYER_SCHEMA,
    )
    if metadata:
        table = table.replace_schema_metadata({k: str(v) for k, v in metadata.items()})
    return table


def check_schema(table: pa.Table) -> None:
    """Raise ValidationError unless ``table`` has the layer-table columns and types."""
    for field in LAYER_SCHEMA:
        if field.name not in table.column_names:
            raise ValidationError(f"layer table lacks column {field.name!r}")
        got = table.schema.field(field.name).type
        if not got.equals(field.type) and not (field.name == "data" and pa.types.is_binary(got)):
            raise ValidationError(f"layer table column {field.name!r} has type {got}, expected {field.type}")


def normalize(table: pa.Table) -> pa.Table:
    """``table`` checked and cast to exactly :data:`LAYER_SCHEMA` (column order, types, nullability)."""
    check_schema(table)
    for field in LAYER_SCHEMA:
        if table.column(field.name).null_count:
            raise ValidationError(f"layer table column {field.name!r} contains nulls")
    return table.select(LAYER_SCHEMA.names).cast(LAYER_SCHEMA)


def to_arrays(table: pa.Table, *, copy: bool = False) -> dict[str, np.ndarray]:
    """``{parameter name: array}`` from a layer table; views onto Arrow memory unless ``copy``.

    Views are read-only. Raises ValidationError when a row's byte length disagrees with its
    dtype and shape, or a dtype is not supported.
    """
    check_schema(table)
    table = table.combine_chunks()
    out: dict[str, np.ndarray] = {}
    if table.num_rows == 0:
        return out
    names = table.column("name").to_pylist()
    dtypes = table.column("dtype").to_pylist()
    shapes = table.column("shape").to_pylist()
    data = table.column("data").chunk(0)
    offsets = np.frombuffer(data.buffers()[1], dtype=np.int64 if pa.types.is_large_binary(data.type) else np.int32)
    offsets = offsets[data.offset : data.offset + len(data) + 1]
    values = data.buffers()[2]
    raw = np.frombuffer(values, dtype=np.uint8) if values is not None else np.empty(0, np.uint8)
    for i, (name, dtype, shape) in enumerate(zip(names, dtypes, shapes, strict=True)):
        if dtype not in SUPPORTED_DTYPES:
            raise ValidationError(f"parameter {name!r}: unsupported dtype {dtype!r}")
        if name in out:
            raise ValidationError(f"parameter {name!r} appears twice")
        dt = np.dtype(dtype).newbyteorder("<")
        if any(d is None for d in shape):
            raise ValidationError(f"parameter {name!r}: missing dimension in shape {shape}")
        if any(d < 0 for d in shape):
            raise ValidationError(f"parameter {name!r}: negative dimension in shape {shape}")
        expected = math.prod(shape) * dt.itemsize  # Python ints: a huge shape cannot wrap around to match
        start, stop = int(offsets[i]), int(offsets[i + 1])
        if stop - start != expected:
            raise ValidationError(
                f"parameter {name!r}: {stop - start} bytes do not match dtype {dtype} and shape {shape}"
            )
        chunk = raw[start:stop]
        if copy or chunk.ctypes.data % dt.alignment:
            arr = chunk.copy().view(dt)
        else:
            arr = chunk.view(dt)
        out[name] = arr.reshape(shape)
    return out


def layers_in(table: pa.Table) -> list[str]:
    """Layer groups present in ``table``, in first-seen order."""
    return list(dict.fromkeys(table.column("layer").to_pylist()))


def select_layers(table: pa.Table, layers: Iterable[str]) -> pa.Table:
    """The rows of ``table`` that belong to ``layers``."""
    wanted = pa.array(sorted(set(layers)), pa.string())
    return table.filter(pc.is_in(table.column("layer"), value_set=wanted))


def nbytes(table: pa.Table) -> int:
    """Payload bytes of the tensors in a layer table."""
    return int(pc.sum(pc.binary_length(table.column("data"))).as_py() or 0)


def to_tensors(table: pa.Table, *, copy: bool = False) -> dict[str, torch.Tensor]:
    """``{parameter name: torch tensor}`` from a layer table, sharing Arrow memory unless ``copy``.

    Shared tensors come from :func:`torch.from_numpy` on the views of :func:`to_arrays`; they alias
    read-only Arrow buffers, so they must not be modified in place (pass ``copy=True`` for tensors to
    train). Rows whose bytes are not aligned for their dtype are copied (see :func:`to_arrays`).
    """
    import torch

    arrays = to_arrays(table, copy=copy)
    out: dict[str, torch.Tensor] = {}
    with warnings.catch_warnings():
        # torch warns that the arrays are not writable: sharing read-only memory is the point here.
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        for name, arr in arrays.items():
            out[name] = torch.from_numpy(arr)
    return out


def from_tensors(
    tensors: Mapping[str, torch.Tensor],
    *,
    layer: Callable[[str], str] = layer_of,
    metadata: Mapping[str, str] | None = None,
) -> pa.Table:
    """A layer table from ``{parameter name: tensor}`` (e.g. a ``state_dict``); inverse of :func:`to_tensors`.

    CPU tensors are read without an intermediate copy; others are moved to the CPU first. Dtypes
    without a numpy equivalent (bfloat16, ...) raise ValidationError.
    """
    import torch

    arrays: dict[str, np.ndarray] = {}
    for name, tensor in tensors.items():
        if not isinstance(tensor, torch.Tensor):
            raise ValidationError(f"parameter {name!r}: expected a torch.Tensor, got {type(tensor).__name__}")
        t = tensor.detach().cpu()
        try:
            arrays[name] = t.resolve_conj().resolve_neg().numpy()
        except TypeError as exc:
            raise ValidationError(f"parameter {name!r}: unsupported dtype {t.dtype}") from exc
    return to_table(arrays, layer=layer, metadata=metadata)
