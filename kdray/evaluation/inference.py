"""Batch inference with Ray Data: an actor pool holding one model or a whole ensemble.

`LogitsPredictor` is the callable class handed to `Dataset.map_batches`; each actor loads the
bundles once, then maps pyarrow batches to the same batches plus a logits column. An ensemble's
logits are the log of its members' mean probability (the paper averages in probability space), so
every consumer treats a single model and an ensemble alike.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch

from kdray.data.tensors import column_tensor
from kdray.distill.losses import ensemble_logits
from kdray.runtime.artifacts import ModelRef, load_bundle
from kdray.runtime.storage import Storage


def features(batch: pa.Table, column: str = "x") -> np.ndarray:
    """The fixed-size-list column as a [B, D] array (zero-copy where Arrow allows)."""
    return column_tensor(batch.column(column)).numpy()


def fixed_size_list(values: np.ndarray) -> pa.FixedSizeListArray:
    """[B, K] array -> an Arrow column of K-vectors (the dataset format's vector type)."""
    values = np.ascontiguousarray(values)
    return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), values.shape[1])


class LogitsPredictor:
    """Ray Data actor: appends `output_column` (logits, [B, C] as fixed-size lists) to each batch."""

    def __init__(self, model: ModelRef, output_column: str = "logits", batch_rows: int = 4096):
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        storage = Storage(model.location)
        self.models = [load_bundle(storage, bundle, self.device, model.trusted)[0] for bundle in model.bundles]
        self.output_column = output_column
        self.batch_rows = batch_rows

    @torch.no_grad()
    def logits(self, x: np.ndarray) -> np.ndarray:
        inputs = torch.from_numpy(x).to(self.device)
        outputs = torch.stack([model(inputs) for model in self.models])
        logits = outputs[0] if len(self.models) == 1 else ensemble_logits(outputs)
        return logits.float().cpu().numpy()

    def __call__(self, batch: pa.Table) -> pa.Table:
        return batch.append_column(self.output_column, fixed_size_list(self.logits(features(batch))))


def map_logits(dataset, model: ModelRef, output_column: str = "logits", batch_size: int = 2048,
               concurrency: int = 1, num_gpus: float = 0):
    """`dataset` plus a logits column, computed by an actor pool (lazy; streams when consumed)."""
    import ray.data

    return dataset.map_batches(
        LogitsPredictor, fn_constructor_kwargs={"model": model, "output_column": output_column},
        batch_size=batch_size, batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=concurrency),
        num_gpus=num_gpus,
    )
