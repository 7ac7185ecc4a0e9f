"""Arrow batches to torch tensors for `iter_torch_batches`, without a per-row copy.

Ray Data's default conversion turns a fixed-size-list column (kdray's features and cached teacher
logits) into a NumPy array of row arrays and stacks them: one small copy per row. Here such a
column becomes one [N, D] view of its values buffer (a zero-copy reshape), which matters when a
small model trains at hundreds of thousands of rows per second.
"""

from __future__ import annotations

import warnings

import pyarrow as pa
import torch
from ray.data.collate_fn import ArrowBatchCollateFn


class TensorColumns(ArrowBatchCollateFn):
    """`collate_fn` for `iter_torch_batches`: a dict of CPU tensors, one per column, cast to
    `dtypes[name]` where given (Ray moves them to the iterator's device afterwards)."""

    def __init__(self, dtypes: dict[str, torch.dtype] | None = None):
        super().__init__()
        self.dtypes = dtypes or {}

    def __call__(self, batch: pa.Table) -> dict[str, torch.Tensor]:
        return {name: column_tensor(batch.column(name), self.dtypes.get(name)) for name in batch.column_names}


def column_tensor(column: pa.ChunkedArray, dtype: torch.dtype | None = None) -> torch.Tensor:
    """One column as a tensor: [N] for a primitive column, [N, D1, D2, ...] for (nested)
    fixed-size lists; other types (Ray's tensor extension, ragged lists) go through Ray's own
    conversion."""
    array = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    shape = [len(array)]
    while pa.types.is_fixed_size_list(array.type) and array.null_count == 0:
        shape.append(array.type.list_size)
        array = array.flatten()  # the values of the rows in view (honours slicing offsets)
    if not (pa.types.is_integer(array.type) or pa.types.is_floating(array.type)) or array.null_count:
        return _ray_conversion(column, dtype)
    with warnings.catch_warnings():
        # Arrow buffers are read-only; tensors made from them are only read (as Ray does too).
        warnings.simplefilter("ignore", UserWarning)
        tensor = torch.from_numpy(array.to_numpy(zero_copy_only=False).reshape(shape))
    return tensor if dtype is None else tensor.to(dtype)


def _ray_conversion(column: pa.ChunkedArray, dtype: torch.dtype | None) -> torch.Tensor:
    from ray.data.util.torch_utils import arrow_batch_to_tensors

    return arrow_batch_to_tensors(pa.table({"c": column}), dtypes=dtype, combine_chunks=True)["c"]
