"""The transfer stage: the teacher labels the transfer set once, and its logits are cached.

Ray Data streams the transfer rows through an actor pool holding the teacher (one model or every
ensemble member) and writes Parquet shards carrying each row's id, features, label and the teacher's
logits, so student training and every sweep trial read cached targets instead of re-running the
teacher at each step (paper, section 2). The transfer set is the training split, a fraction of it,
the training split minus some classes, or a separate (possibly unlabeled) dataset; for images,
optionally with jittered copies of each row, labelled once like the rest.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads

from kdray.config import TransferConfig
from kdray.data import read_manifest, read_split, sample_rows, splitmix_uniform
from kdray.data.shards import ordered, read_parquet
from kdray.inference import ModelRef, features, fixed_size_list, map_logits
from kdray.losses import topk_logits
from kdray.pipeline import StageContext, StageResult
from kdray.storage import Storage
from kdray.train import TEACHER_LOGITS, TOPK_COLUMNS

SHARDS_DIR = "shards"


def transfer_rows(config: TransferConfig, dataset_location: str):
    """The (lazy) Ray Dataset of transfer rows, before the teacher sees them."""
    source = Storage(config.dataset or dataset_location)
    rows = read_split(source, "train")
    if not config.dataset:
        rows = sample_rows(rows, config.fraction, seed=config.seed, drop_classes=tuple(config.omit_classes))
        if not config.use_labels:
            rows = rows.map_batches(_forget_labels, batch_format="pyarrow")
    if config.copies > 1:
        shape = tuple(read_manifest(source).feature_shape)
        rows = rows.map_batches(jittered_copies(config.copies, config.jitter, shape, config.seed), batch_format="pyarrow")
    return rows


def jittered_copies(copies: int, jitter: int, image_shape: tuple[int, int, int], seed: int):
    """A batch function: each row, then `copies - 1` versions of it shifted by up to `jitter`
    pixels per axis. Copy k of row `id` gets id `id * copies + k` (unique whenever the ids are) and
    a shift hashed from that id and `seed`, so the rows do not depend on how Ray Data cuts batches."""
    import torch

    from kdray.models import shift_images

    side = 2 * jitter + 1

    def expand(batch: pa.Table) -> pa.Table:
        ids = batch.column("id").to_numpy().astype(np.int64)
        images = torch.from_numpy(features(batch))
        x_type, versions = batch.schema.field("x").type, []
        for copy in range(copies):
            copy_ids = ids * copies + copy
            shifted = images
            if copy:
                offset = torch.from_numpy((splitmix_uniform(copy_ids, seed) * side * side).astype(np.int64))
                shifted = shift_images(images, image_shape, jitter, offset // side, offset % side)
            version = batch.set_column(batch.schema.get_field_index("id"), "id", pa.array(copy_ids))
            x = fixed_size_list(shifted.numpy()).cast(x_type)
            versions.append(version.set_column(version.schema.get_field_index("x"), "x", x))
        return pa.concat_tables(versions)

    return expand


def _forget_labels(batch: pa.Table) -> pa.Table:
    unlabeled = pa.array(np.full(batch.num_rows, -1, dtype=np.int64))
    return batch.set_column(batch.schema.get_field_index("y"), "y", unlabeled)


def compress_topk(k: int):
    """A batch function replacing the logits column by top-k values, indices and the rest's log-mass."""
    import torch

    def compress(batch: pa.Table) -> pa.Table:
        logits = torch.from_numpy(features(batch, TEACHER_LOGITS))
        values, indices, rest = topk_logits(logits, k)
        values_column, indices_column, rest_column = TOPK_COLUMNS
        batch = batch.drop_columns([TEACHER_LOGITS])
        batch = batch.append_column(values_column, fixed_size_list(values.numpy()))
        batch = batch.append_column(indices_column, fixed_size_list(indices.numpy()))
        return batch.append_column(rest_column, pa.array(rest.numpy().astype(np.float32)))

    return compress


def count_rows(storage: Storage, directory: str) -> int:
    """Rows in a directory of Parquet files, from their footers only."""
    return pads.dataset(storage.path(directory), filesystem=storage.filesystem, format="parquet").count_rows()


def run_transfer(context: StageContext) -> StageResult:
    config = context.config.distill.transfer
    teacher = ModelRef(**context.input_output("teacher", "teacher"))
    rows = transfer_rows(config, context.input_output("data", "dataset"))
    labelled = map_logits(rows, teacher, output_column=TEACHER_LOGITS,
                          concurrency=max(1, context.config.resources.num_workers))
    if config.top_k:
        labelled = labelled.map_batches(compress_topk(config.top_k), batch_format="pyarrow")
    output = context.output
    labelled.write_parquet(output.path(SHARDS_DIR), filesystem=output.filesystem)
    rows_written = count_rows(output, SHARDS_DIR)
    num_classes = read_manifest(Storage(context.input_output("data", "dataset"))).num_classes
    summary = {"rows": rows_written, "top_k": config.top_k, "fraction": config.fraction, "copies": config.copies,
               "omitted_classes": list(config.omit_classes), "num_classes": num_classes}
    return StageResult(outputs={"transfer": output.uri(SHARDS_DIR)}, summary=summary)


def read_transfer(location: str):
    """The cached transfer shards as a streamed Ray Dataset."""
    storage = Storage(location)
    return ordered(read_parquet(storage.path(), storage.filesystem))
