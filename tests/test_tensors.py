"""kdray.data.tensors: Arrow columns to torch tensors without a per-row copy."""

import numpy as np
import pyarrow as pa
import torch

from kdray.data.tensors import TensorColumns, column_tensor


def _fixed(values: np.ndarray, *sizes: int) -> pa.Array:
    array = pa.array(values.reshape(-1))
    for size in reversed(sizes):
        array = pa.FixedSizeListArray.from_arrays(array, size)
    return array


def test_fixed_size_lists_become_one_tensor_of_the_rows_shape():
    values = np.arange(24, dtype=np.float32).reshape(4, 2, 3)
    tensor = column_tensor(pa.chunked_array([_fixed(values, 2, 3)]))
    assert tensor.dtype == torch.float32 and torch.equal(tensor, torch.from_numpy(values))


def test_sliced_and_chunked_columns_keep_only_their_rows():
    values = np.arange(12, dtype=np.float32).reshape(6, 2)
    column = pa.chunked_array([_fixed(values[:3], 2), _fixed(values[3:], 2).slice(1, 2)])
    torch.testing.assert_close(column_tensor(column), torch.from_numpy(values[[0, 1, 2, 4, 5]]))


def test_primitive_columns_and_casts():
    labels = pa.chunked_array([pa.array([3, 1, 2], type=pa.int32())])
    assert torch.equal(column_tensor(labels, torch.int64), torch.tensor([3, 1, 2]))
    assert column_tensor(labels, torch.int64).dtype == torch.int64


def test_ragged_lists_go_through_rays_conversion():
    ragged = pa.chunked_array([pa.array([[1.0, 2.0], [3.0, 4.0]], type=pa.list_(pa.float32()))])
    torch.testing.assert_close(column_tensor(ragged), torch.tensor([[1.0, 2.0], [3.0, 4.0]]))


def test_collate_fn_converts_every_column():
    table = pa.table({"x": _fixed(np.ones((2, 3), dtype=np.float32), 3), "y": pa.array([0, 1])})
    batch = TensorColumns({"x": torch.float64})(table)
    assert batch["x"].shape == (2, 3) and batch["x"].dtype == torch.float64
    assert torch.equal(batch["y"], torch.tensor([0, 1]))
