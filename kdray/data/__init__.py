"""Datasets: the sharded Parquet format, its sources (synthetic, IDX) and the pipeline's data stage."""

from __future__ import annotations

from kdray.config import DataConfig
from kdray.data.sampling import splitmix_uniform
from kdray.data.shards import DatasetError, DatasetManifest, read_manifest, read_split
from kdray.runtime.storage import Storage

__all__ = ["DatasetError", "DatasetManifest", "dataset_input_shape", "prepare_dataset", "read_manifest", "read_split", "sample_rows"]

IDX_INPUT_SHAPE = (1, 28, 28)


def dataset_input_shape(config: DataConfig) -> tuple[int, ...]:
    """The feature shape a config's dataset will have, known before any data is written."""
    if config.source == "synth":
        return (config.synth.dim,)
    if config.source in ("fashion-mnist", "mnist"):
        return IDX_INPUT_SHAPE
    return read_manifest(Storage(config.path)).feature_shape


def prepare_dataset(config: DataConfig, output: Storage, progress: bool = False) -> str:
    """Materialise the configured dataset and return its location (validated shard by shard).

    Synthetic and IDX data are written under `output`; a `parquet` source stays where it is.
    """
    from kdray.data.validate import inspect_dataset

    if config.source == "synth":
        from kdray.data.synth import write_synthetic_dataset

        write_synthetic_dataset(output, config.synth, progress=progress)
        location = output.location
    elif config.source in ("fashion-mnist", "mnist"):
        from kdray.data.idx import fetch

        fetch(config.source, output, source=config.path, validation_fraction=config.validation_fraction,
              rows_per_shard=config.rows_per_shard, seed=config.seed)
        location = output.location
    else:
        location = Storage(config.path).location
    inspect_dataset(Storage(location), progress=progress)
    return location


def sample_rows(dataset, fraction: float, seed: int, drop_classes: tuple[int, ...] = ()):
    """The rows whose id hashes below `fraction`, less those labelled with `drop_classes`.

    Deterministic for (id, seed) and streaming: no shuffle, nothing collected.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    dropped = pa.array(sorted(drop_classes), type=pa.int64())

    def keep(batch: pa.Table) -> pa.Table:
        uniform = splitmix_uniform(batch.column("id").to_numpy(), seed)
        mask = uniform < fraction
        mask &= ~pc.is_in(batch.column("y"), value_set=dropped).to_numpy(zero_copy_only=False)
        return batch.filter(pa.array(mask))

    if fraction >= 1.0 and not drop_classes:
        return dataset
    return dataset.map_batches(keep, batch_format="pyarrow")
