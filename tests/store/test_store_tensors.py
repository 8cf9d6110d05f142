"""Layer tables to torch tensors without copying, and back."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from hyprstream.errors import ValidationError
from hyprstream.store import from_tensors, to_table, to_tensors

pytestmark = pytest.mark.unit


def test_round_trip_of_a_model_state_dict() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    state = model.state_dict()
    table = from_tensors(state)
    assert table.column("layer").to_pylist() == ["0", "0", "2", "2"]
    back = to_tensors(table)
    assert list(back) == list(state)
    for name, tensor in state.items():
        assert back[name].dtype == tensor.dtype and torch.equal(back[name], tensor)


def test_tensors_share_arrow_memory() -> None:
    table = to_table({"w": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.ones(4, np.int64)})
    data = table.column("data").chunk(0)
    start, stop = data.buffers()[2].address, data.buffers()[2].address + data.buffers()[2].size
    tensors = to_tensors(table)
    for t in tensors.values():
        assert start <= t.data_ptr() < stop
    assert tensors["w"].tolist() == np.arange(12, dtype=np.float32).reshape(3, 4).tolist()


def test_copy_gives_independent_writable_tensors() -> None:
    table = to_table({"w": np.zeros(3, np.float64)})
    t = to_tensors(table, copy=True)["w"]
    t += 1
    assert to_tensors(table)["w"].tolist() == [0.0, 0.0, 0.0]
    assert t.tolist() == [1.0, 1.0, 1.0]


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64, torch.int8, torch.uint8,
                                   torch.int32, torch.int64])
def test_supported_dtypes_round_trip(dtype: torch.dtype) -> None:
    t = (torch.arange(6) % 5).to(dtype).reshape(2, 3)
    assert torch.equal(to_tensors(from_tensors({"p": t}))["p"], t)


def test_non_contiguous_tensors() -> None:
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    back = to_tensors(from_tensors({"t": base.T}))
    assert back["t"].shape == (4, 3) and torch.equal(back["t"], base.T)


def test_unsupported_dtype_is_refused() -> None:
    with pytest.raises(ValidationError, match="bfloat16"):
        from_tensors({"p": torch.zeros(2, dtype=torch.bfloat16)})
    with pytest.raises(ValidationError, match="torch.Tensor"):
        from_tensors({"p": np.zeros(2)})  # type: ignore[dict-item]


def test_empty_table_gives_no_tensors() -> None:
    assert to_tensors(to_table({})) == {}
    assert isinstance(from_tensors({}), pa.Table)


def test_scalar_and_big_endian_arrays_round_trip() -> None:
    from hyprstream.store import to_arrays

    arrays = {"bn.num_batches_tracked": np.array(7, dtype=np.int64), "bn.scale": np.array(0.5, np.float32),
              "fc.weight": np.arange(6, dtype=">f4").reshape(2, 3)}
    back = to_arrays(to_table(arrays))
    assert back["bn.num_batches_tracked"].shape == () and int(back["bn.num_batches_tracked"]) == 7
    assert back["bn.scale"].shape == () and float(back["bn.scale"]) == 0.5
    np.testing.assert_array_equal(back["fc.weight"], arrays["fc.weight"])
    assert back["fc.weight"].dtype == np.dtype("<f4")
    tensors = to_tensors(to_table({"s": np.array(2.0, np.float32)}))
    assert tensors["s"].shape == torch.Size([]) and float(tensors["s"]) == 2.0
