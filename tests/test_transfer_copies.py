"""Jittered copies in the transfer set (distill.transfer.copies): the teacher labels each row and
copies - 1 shifted versions of it once; the hard-label baseline keeps the plain training rows."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from kdray.config import ConfigError, TransferConfig, config_from_dict
from kdray.data.shards import DatasetManifest, shard_name, shard_table, write_manifest, write_shard
from kdray.inference import features
from kdray.preflight import check_config
from kdray.storage import Storage
from kdray.student import BASELINE, _training_rows
from kdray.transfer import jittered_copies, transfer_rows

SHAPE = (1, 6, 6)


def image_table(rows: int, seed: int = 0, first_id: int = 0) -> pa.Table:
    """Random 6x6 images with a bright 2x2 centre, so that every shift changes the image."""
    rng = np.random.default_rng(seed)
    images = rng.uniform(0, 0.5, size=(rows, *SHAPE)).astype(np.float32)
    images[:, :, 2:4, 2:4] = 1.0
    return shard_table(np.arange(first_id, first_id + rows), images.reshape(rows, -1), rng.integers(0, 3, size=rows))


def write_images(location: str) -> None:
    storage = Storage(location)
    tables = {"train": [image_table(12, 0), image_table(9, 1, first_id=12)], "validation": [image_table(5, 2, first_id=21)]}
    shards = [write_shard(storage, shard_name(split, i), split, table)
              for split, split_tables in tables.items() for i, table in enumerate(split_tables)]
    write_manifest(storage, DatasetManifest(num_classes=3, feature_shape=SHAPE, shards=tuple(shards)))


def _by_id(table: pa.Table) -> dict[int, tuple[np.ndarray, int]]:
    x = features(table).reshape(table.num_rows, *SHAPE)
    return {int(i): (image, int(y)) for i, image, y in zip(table.column("id").to_numpy(), x, table.column("y").to_numpy())}


def _shifts(image: np.ndarray, jitter: int) -> list[np.ndarray]:
    """Every shift of `image` by [-jitter, jitter] pixels per axis, zeros shifted in."""
    padded = np.pad(image, ((0, 0), (jitter, jitter), (jitter, jitter)))
    height, width = SHAPE[1:]
    return [padded[:, top:top + height, left:left + width]
            for top in range(2 * jitter + 1) for left in range(2 * jitter + 1)]


def test_each_row_comes_with_shifted_copies_under_unique_ids():
    table = image_table(40)
    out = _by_id(jittered_copies(3, 1, SHAPE, seed=7)(table))
    assert len(out) == 3 * 40  # ids id * 3 + k are unique
    moved = 0
    for row_id, (image, label) in _by_id(table).items():
        assert np.array_equal(out[3 * row_id][0], image)  # copy 0 is the row itself
        for copy in (1, 2):
            shifted, shifted_label = out[3 * row_id + copy]
            assert shifted_label == label
            assert any(np.array_equal(shifted, candidate) for candidate in _shifts(image, 1))
            moved += not np.array_equal(shifted, image)
    assert moved > 60  # of 80 copies; a (0, 0) shift has chance 1/9


def test_copies_do_not_depend_on_how_rows_are_batched():
    table = image_table(30)
    expand = jittered_copies(4, 2, SHAPE, seed=1)
    halves = pa.concat_tables([expand(table.slice(0, 11)), expand(table.slice(11))])
    assert _by_id(halves).keys() == _by_id(expand(table)).keys()
    for row_id, (image, _) in _by_id(expand(table)).items():
        assert np.array_equal(_by_id(halves)[row_id][0], image)
    other_seed = _by_id(jittered_copies(4, 2, SHAPE, seed=2)(table))
    assert any(not np.array_equal(other_seed[i][0], image) for i, (image, _) in _by_id(expand(table)).items())


def test_the_transfer_set_has_the_copies_and_the_baseline_the_plain_rows(ray_local, tmp_path):
    data = str(tmp_path / "images")
    write_images(data)
    rows = transfer_rows(TransferConfig(copies=2, jitter=1), data)
    assert rows.count() == 2 * 21
    ids = [i for batch in rows.iter_batches(batch_format="pyarrow") for i in batch.column("id").to_pylist()]
    assert sorted(ids) == list(range(42))
    config = config_from_dict({"data": {"source": "parquet", "path": data},
                               "distill": {"transfer": {"copies": 2, "jitter": 1}}})
    assert _training_rows(config, BASELINE, data, "").count() == 21


def test_copies_of_data_that_are_not_images_are_refused_before_the_run(tmp_path):
    config = config_from_dict({"distill": {"transfer": {"copies": 4}}})  # the synthetic default: flat vectors
    with pytest.raises(ConfigError, match=r"distill\.transfer\.copies: jittered copies need images \(C, H, W\); "
                                          r"the data's feature shape is \(32,\)"):
        check_config(config)
    with pytest.raises(ConfigError, match=r"distill\.transfer\.jitter"):
        config_from_dict({"distill": {"transfer": {"copies": 4, "jitter": 0}}})
