"""Batch prediction with one of a run's models: `kdray predict RUN_DIR DATA OUT [--model NAME]`.

DATA is either a kdray dataset (every split is predicted; ids are unique across a dataset, so join
the predictions to it on `id` to get a row's split or label) or a plain directory of Parquet files
with an integer `id` column and an `x` column of float32 fixed-size lists (the model's flattened
input; other columns are ignored). OUT receives

- ``shards/*.parquet``: ``id`` int64, ``prediction`` int64 (the most probable class) and
  ``probabilities`` fixed_size_list<float32>[C] (the model's T = 1 softmax); or, with `top_k`
  (by default above kdray.config.DENSE_CLASSES classes), ``top_classes`` int64 and
  ``top_probabilities`` float32, each row's k most probable classes and their probabilities;
- ``predictions.json``: the model, run, data, row count and shard files, written last, so a
  directory without it is unfinished.

OUT must be new, empty, or an earlier prediction (which is replaced only once the new one is
complete); it may not lie inside DATA or RUN_DIR, nor contain them.

A model from a stage registered in `kdray.evaluation.evaluate.COMBINERS` (the specialists stage) is predicted
through that stage's combiner instead of its bundles' logits.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs

from kdray.config import kept_classes
from kdray.data.shards import MANIFEST as DATASET_MANIFEST
from kdray.data.shards import DatasetError, read_manifest, read_parquet
from kdray.evaluation.evaluate import RunError, check_compatible, combiner, model_ref, run_manifests, run_models
from kdray.evaluation.inference import features, fixed_size_list, map_logits
from kdray.evaluation.metrics import log_softmax
from kdray.runtime.storage import Storage, check_replaceable, staged_output

PREDICTIONS = "predictions.json"
SHARDS_DIR = "shards"


def predict(run_location: str, data_location: str, output_location: str, model: str = "student",
            batch_size: int = 2048, trusted: Sequence[str] = (), top_k: int | Literal["auto"] | None = "auto") -> int:
    """Write `model`'s predictions for every row of `data_location` under `output_location`;
    returns the number of rows written. `top_k`: each row's k most probable classes and their
    probabilities instead of every class's (None: every class; "auto": as kdray.config.kept_classes). Needs a connected Ray (see `kdray.runtime.session.ray_session`);
    the model's bundles may import the factories in `trusted` (see `kdray.evaluation.evaluate.check_run_models`)."""
    run, data, output = Storage(run_location), Storage(data_location), Storage(output_location)
    check_output(run, data, output)
    manifests = run_manifests(run)
    stage, entry = find_model(run, manifests, model)
    rows, feature_dim = prediction_rows(data)
    combine = combiner(stage)
    if combine is None:
        ref = model_ref(model, entry, run, trusted)
        check_compatible({model: ref}, feature_dim)
        logits = map_logits(rows, ref, batch_size=batch_size)
    else:
        logits = combine(rows, run, manifests[stage], model, batch_size, tuple(trusted))
    keep = kept_classes(top_k, read_manifest(Storage(manifests["data"]["outputs"]["dataset"])).num_classes)
    predictions = logits.map_batches(_predictions, fn_kwargs={"top_k": keep}, batch_format="pyarrow")
    with staged_output(output, PREDICTIONS) as staging:
        predictions.write_parquet(staging.path(SHARDS_DIR), filesystem=staging.filesystem)
        files = [f"{SHARDS_DIR}/{name}" for name in staging.list(SHARDS_DIR) if name.endswith(".parquet")]
        written = _count_rows(staging, files)
        staging.write_json({"model": model, "stage": stage, "run": run.location, "data": data.location,
                            "rows": written, "files": files, "columns": ["id", "prediction", *_probability_columns(keep)],
                            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, PREDICTIONS)
    return written


def check_output(run: Storage, data: Storage, output: Storage) -> None:
    """Refuse an OUT that overlaps the data or the run, or holds anything but an earlier prediction."""
    check_replaceable(output, "predictions", PREDICTIONS, _is_predictions, overwrite=True, inputs={"data": data, "run": run})


def _is_predictions(manifest: Any) -> bool:
    return isinstance(manifest, dict) and {"model", "files", "rows"} <= manifest.keys()


def find_model(run: Storage, manifests: dict, model: str) -> tuple[str, dict]:
    """(stage, manifest entry) of the run's model `model`; RunError listing the models otherwise."""
    published = run_models(manifests)
    if model not in published:
        raise RunError(f"run {run.location} has no model {model!r}; its models are: {', '.join(published) or 'none'}")
    return published[model]


def prediction_rows(data: Storage):
    """(lazy Dataset of `id`, `x`; the feature width D) for a kdray dataset or a Parquet directory."""
    if data.exists(DATASET_MANIFEST):
        manifest = read_manifest(data)
        paths = [data.path(shard.file) for shard in manifest.shards]
        rows = read_parquet(paths, data.filesystem, schema=manifest.schema)
        return rows.select_columns(["id", "x"]), manifest.feature_dim
    files = _parquet_files(data)
    if not files:
        raise DatasetError(f"{data.location} is neither a kdray dataset ({DATASET_MANIFEST}) nor a directory of "
                           f"Parquet files")
    schema = pads.dataset(files, filesystem=data.filesystem, format="parquet").schema
    x_type = schema.field("x").type if "x" in schema.names else None
    if "id" not in schema.names or not pa.types.is_integer(schema.field("id").type):
        raise DatasetError(f"{data.location}: Parquet files need an integer 'id' column (schema: {schema})")
    if x_type is None or not (pa.types.is_fixed_size_list(x_type) and x_type.value_type == pa.float32()):
        raise DatasetError(f"{data.location}: Parquet files need an 'x' column of fixed_size_list<float32> "
                           f"(the flattened features), got {x_type}")
    rows = read_parquet(files, data.filesystem)
    return rows.select_columns(["id", "x"]), x_type.list_size


def _parquet_files(data: Storage) -> list[str]:
    if not data.is_dir():
        return []
    selector = pafs.FileSelector(data.path(), recursive=True)
    return sorted(info.path for info in data.filesystem.get_file_info(selector)
                  if info.type == pafs.FileType.File and info.base_name.endswith(".parquet"))


def _probability_columns(top_k: int | None) -> list[str]:
    return ["probabilities"] if top_k is None else ["top_classes", "top_probabilities"]


def _predictions(batch: pa.Table, top_k: int | None) -> pa.Table:
    logits = features(batch, "logits")
    probabilities = np.exp(log_softmax(logits)).astype(np.float32)
    columns = {"id": batch.column("id").cast(pa.int64()), "prediction": pa.array(logits.argmax(axis=1).astype(np.int64))}
    if top_k is None:
        columns["probabilities"] = fixed_size_list(probabilities)
    else:
        top = np.argsort(-probabilities, axis=1, kind="stable")[:, :top_k]
        columns["top_classes"] = fixed_size_list(top.astype(np.int64))
        columns["top_probabilities"] = fixed_size_list(np.take_along_axis(probabilities, top, axis=1))
    return pa.table(columns)


def _count_rows(storage: Storage, files: list[str]) -> int:
    """Rows in Parquet files, from their footers only."""
    if not files:
        return 0
    paths = [storage.path(file) for file in files]
    return pads.dataset(paths, filesystem=storage.filesystem, format="parquet").count_rows()
