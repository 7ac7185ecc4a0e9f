"""The transfer stage: the teacher labels the transfer set once, and its logits are cached.

Ray Data streams the transfer rows through an actor pool holding the teacher (one model or every
ensemble member) and writes Parquet shards carrying each row's id, features, label and the teacher's
logits, so student training and every sweep trial read cached targets instead of re-running the
teacher at each step (paper, section 2). The transfer set is the training split, a fraction of it,
the training split minus some classes, or a separate (possibly unlabeled) dataset; optionally with
augmented copies of each row (shifted images, or mixup blends with other rows), labelled once like
the rest.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads

from kdray.config import TransferConfig, kept_classes
from kdray.data import read_manifest, read_split, sample_rows
from kdray.data.sampling import splitmix_uniform
from kdray.data.shards import UNLABELED, ordered, read_parquet
from kdray.distill.losses import topk_logits
from kdray.evaluation.inference import features, fixed_size_list, map_logits
from kdray.runtime.stage import StageContext, StageResult
from kdray.runtime.storage import Storage
from kdray.runtime.train import TEACHER_LOGITS, TOPK_COLUMNS

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
        rows = rows.map_batches(_copies_function(config, source, rows), batch_format="pyarrow")
    return rows


def _copies_function(config: TransferConfig, source: Storage, rows):
    if config.augment == "mixup":
        import ray

        partners = ray.put(mixup_partners(rows, config.mixup_partners, config.seed))
        return mixed_copies(config.copies, config.mixup_alpha, partners, config.seed)
    return jittered_copies(config.copies, config.jitter, tuple(read_manifest(source).feature_shape), config.seed)


def with_copies(batch: pa.Table, copies: int, make_copy) -> pa.Table:
    """Each row of `batch` followed by `copies - 1` versions of it: copy k of row `id` gets id
    `id * copies + k` (unique whenever the ids are; copy 0 is the row itself), and its features and
    labels from `make_copy(x [B, D] float32, copy_ids [B] int64) -> (x', labels or None to keep
    the row's)`. Copies that depend only on ids, never on their batch, make the transfer set
    independent of how Ray Data cuts batches.

    Rows and their copies are interleaved, not written copy after copy: the trainer shuffles within
    windows of consecutive rows (kdray.runtime.train.shuffle_window), and a window of one kind (all labelled
    rows, or all unlabeled blends) would train in long stretches with and without the hard-label
    term (and every epoch ending on the same kind); benchmarks/distillation.md has what each cost."""
    ids = batch.column("id").to_numpy().astype(np.int64)
    x, x_type = features(batch), batch.schema.field("x").type
    versions = []
    for copy in range(copies):
        copy_ids = ids * copies + copy
        version = _replace(batch, "id", pa.array(copy_ids))
        if copy:
            copy_x, labels = make_copy(x, copy_ids)
            version = _replace(version, "x", fixed_size_list(copy_x).cast(x_type))
            if labels is not None:
                version = _replace(version, "y", pa.array(labels, type=pa.int64()))
        versions.append(version)
    interleaved = np.arange(copies * batch.num_rows).reshape(copies, batch.num_rows).T.ravel()
    return pa.concat_tables(versions).take(interleaved)


def _replace(batch: pa.Table, name: str, column: pa.Array) -> pa.Table:
    return batch.set_column(batch.schema.get_field_index(name), name, column)


def jittered_copies(copies: int, jitter: int, image_shape: tuple[int, int, int], seed: int):
    """A batch function: each row, then `copies - 1` versions of it shifted by up to `jitter`
    pixels per axis, the shift hashed from the copy's id and `seed`; labels kept."""
    import torch

    from kdray.models import shift_images

    side = 2 * jitter + 1

    def shifted(x: np.ndarray, copy_ids: np.ndarray) -> tuple[np.ndarray, None]:
        offset = torch.from_numpy((splitmix_uniform(copy_ids, seed) * side * side).astype(np.int64))
        return shift_images(torch.from_numpy(x), image_shape, jitter, offset // side, offset % side).numpy(), None

    return lambda batch: with_copies(batch, copies, shifted)


def mixed_copies(copies: int, alpha: float, partners, seed: int):
    """A batch function: each row, then `copies - 1` unlabeled blends lam * row + (1 - lam) *
    partner (mixup), lam ~ Beta(alpha, alpha) and the partner (a row of `partners`, [P, D] float32
    or its Ray object ref) both hashed from the copy's id and `seed`.

    A blend has no true class, only the teacher's answer on it: labels are -1, so the student's
    hard term skips them. The partners are a fixed pool rather than the batch's other rows, so a
    copy never depends on which rows Ray Data batched together."""
    from scipy.special import betaincinv

    def blended(x: np.ndarray, copy_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        pool = _resolve(partners)
        lam = betaincinv(alpha, alpha, splitmix_uniform(copy_ids, seed)).astype(np.float32)[:, None]
        partner = (splitmix_uniform(copy_ids, seed + PARTNER_SEED_OFFSET) * len(pool)).astype(np.int64)
        return lam * x + (1 - lam) * pool[partner], np.full(len(x), UNLABELED, dtype=np.int64)

    return lambda batch: with_copies(batch, copies, blended)


# Added to the seed so that a copy's partner, its lam and which rows make the pool are
# independent draws (each hashes ids with its own seed).
PARTNER_SEED_OFFSET, POOL_SEED_OFFSET = 0x5EED, 0x9001


def _resolve(value):
    import ray

    return ray.get(value) if isinstance(value, ray.ObjectRef) else value


def mixup_partners(rows, count: int, seed: int) -> np.ndarray:
    """The features [P, D] of the (up to) `count` rows whose ids hash lowest under `seed`: a
    uniform sample, the same whatever the order, batching or sharding of `rows`.

    Two streaming passes, so the driver never holds more than keys and the sample: the first
    keeps each block's lowest `count` keys (ids hashed) and finds the `count`-th lowest overall,
    the second keeps the rows at or below it."""

    def keys(batch: pa.Table) -> np.ndarray:
        return splitmix_uniform(batch.column("id").to_numpy(), seed + POOL_SEED_OFFSET)

    def lowest_keys(batch: pa.Table) -> pa.Table:
        return pa.table({"key": np.sort(keys(batch))[:count]})

    lowest = [batch.column("key").to_numpy() for batch in rows.map_batches(
        lowest_keys, batch_format="pyarrow", batch_size=None).iter_batches(batch_format="pyarrow")]
    if not lowest or not sum(map(len, lowest)):
        raise ValueError("distill.transfer: no transfer rows to draw mixup partners from")
    threshold = np.sort(np.concatenate(lowest))[:count][-1]

    def sampled(batch: pa.Table) -> pa.Table:
        batch_keys = keys(batch)
        keep = np.flatnonzero(batch_keys <= threshold)
        return batch.select(["x"]).take(pa.array(keep)).append_column("key", pa.array(batch_keys[keep]))

    pool = pa.concat_tables(list(rows.map_batches(sampled, batch_format="pyarrow", batch_size=None)
                                 .iter_batches(batch_format="pyarrow", batch_size=None)))
    order = np.argsort(pool.column("key").to_numpy(), kind="stable")[:count]
    return np.ascontiguousarray(features(pool.take(pa.array(order))), dtype=np.float32)


def _forget_labels(batch: pa.Table) -> pa.Table:
    return _replace(batch, "y", pa.array(np.full(batch.num_rows, UNLABELED, dtype=np.int64)))


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
    teacher = context.model_ref("teacher", "teacher")
    rows = transfer_rows(config, context.input_output("data", "dataset"))
    labelled = map_logits(rows, teacher, output_column=TEACHER_LOGITS,
                          concurrency=max(1, context.config.resources.num_workers))
    num_classes = read_manifest(Storage(context.input_output("data", "dataset"))).num_classes
    top_k = kept_classes(config.top_k, num_classes)
    if top_k:
        labelled = labelled.map_batches(compress_topk(top_k), batch_format="pyarrow")
    output = context.output
    labelled.write_parquet(output.path(SHARDS_DIR), filesystem=output.filesystem)
    rows_written = count_rows(output, SHARDS_DIR)
    summary = {"rows": rows_written, "top_k": top_k, "fraction": config.fraction, "copies": config.copies,
               "augment": config.augment if config.copies > 1 else None,
               "omitted_classes": list(config.omit_classes), "num_classes": num_classes}
    return StageResult(outputs={"transfer": output.uri(SHARDS_DIR)}, summary=summary)


def read_transfer(location: str):
    """The cached transfer shards as a streamed Ray Dataset."""
    storage = Storage(location)
    return ordered(read_parquet(storage.path(), storage.filesystem))
