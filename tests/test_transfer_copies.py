"""Augmented copies in the transfer set (distill.transfer.copies): the teacher labels each row and
copies - 1 shifted versions of it (jitter) or blends with other rows (mixup) once; the hard-label
baseline keeps the plain training rows."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from kdray.config import ConfigError, TransferConfig, config_from_dict
from kdray.data.shards import DatasetManifest, shard_name, shard_table, write_manifest, write_shard
from kdray.distill.student import BASELINE, _training_rows, baseline_spec, student_loss, student_spec
from kdray.distill.transfer import jittered_copies, mixed_copies, mixup_partners, transfer_rows
from kdray.evaluation.inference import features
from kdray.preflight import check_config
from kdray.runtime.storage import Storage

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
                                          r"the data's feature shape is \(32,\) \(augment: mixup works on any"):
        check_config(config)
    check_config(config_from_dict({"distill": {"transfer": {"copies": 4, "augment": "mixup"}}}))
    with pytest.raises(ConfigError, match=r"distill\.transfer\.jitter"):
        config_from_dict({"distill": {"transfer": {"copies": 4, "jitter": 0}}})


# ------------------------------------------------------------------------------------ mixup
def _blend_weight(row: np.ndarray, partner: np.ndarray, blend: np.ndarray) -> float | None:
    """lam if blend == lam * row + (1 - lam) * partner for some lam in [0, 1], else None."""
    lam = float(np.dot(blend - partner, row - partner) / np.dot(row - partner, row - partner))
    close = np.allclose(lam * row + (1 - lam) * partner, blend, atol=1e-5)
    return lam if close and -1e-6 <= lam <= 1 + 1e-6 else None


def test_mixed_copies_blend_each_row_with_a_pool_row_and_carry_no_label():
    table = image_table(50)
    pool = features(image_table(7, seed=5))
    out = _by_id(mixed_copies(3, 1.0, pool, seed=4)(table))
    assert len(out) == 3 * 50
    weights, partners = [], set()
    for row_id, (image, label) in _by_id(table).items():
        assert np.array_equal(out[3 * row_id][0], image) and out[3 * row_id][1] == label  # the row itself
        for copy in (1, 2):
            blend, blend_label = out[3 * row_id + copy]
            assert blend_label == -1  # a blend has no true class: only the teacher's answer
            found = [(k, w) for k, partner in enumerate(pool)
                     if (w := _blend_weight(image.ravel(), partner, blend.ravel())) is not None]
            assert found, f"copy {copy} of row {row_id} is no blend of the row and a pool row"
            partners.add(found[0][0])
            weights.append(found[0][1])
    assert partners == set(range(7))  # 100 draws reach every partner
    # Beta(1, 1) is uniform on [0, 1]: mean 1/2, a quarter of the draws in each quarter.
    assert abs(np.mean(weights) - 0.5) < 0.08
    assert 15 <= sum(w < 0.25 for w in weights) <= 35


def test_each_row_is_followed_by_its_copies():
    # The trainer shuffles within windows of consecutive rows: each window must mix labelled rows
    # and their unlabeled blends in proportion, not hold only one kind.
    table = image_table(20, first_id=5)
    pool = features(image_table(4, seed=5))
    for expand in (mixed_copies(4, 1.0, pool, seed=0), jittered_copies(4, 1, SHAPE, seed=0)):
        out = expand(table)
        assert out.column("id").to_pylist() == list(range(4 * 5, 4 * 25))
        assert np.array_equal(features(out)[::4], features(table))
    labels = mixed_copies(4, 1.0, pool, seed=0)(table).column("y").to_numpy().reshape(20, 4)
    assert np.array_equal(labels[:, 0], table.column("y").to_numpy()) and (labels[:, 1:] == -1).all()


def test_mixup_alpha_shapes_the_blend_weights():
    table, pool = image_table(200), features(image_table(5, seed=5))
    out = _by_id(mixed_copies(2, 0.2, pool, seed=0)(table))
    weights = []
    for row_id, (image, _) in _by_id(table).items():
        blend = out[2 * row_id + 1][0].ravel()
        weights += [w for partner in pool if (w := _blend_weight(image.ravel(), partner, blend)) is not None][:1]
    # Beta(0.2, 0.2) piles its mass near 0 and 1: P(0.1 < lam < 0.9) = 0.29.
    inner = np.mean([(0.1 < w < 0.9) for w in weights])
    assert len(weights) == 200 and 0.18 < inner < 0.40


def test_mixed_copies_do_not_depend_on_batching_and_do_on_the_seed():
    table, pool = image_table(30), features(image_table(6, seed=5))
    expand = mixed_copies(4, 1.0, pool, seed=1)
    whole = _by_id(expand(table))
    halves = _by_id(pa.concat_tables([expand(table.slice(0, 13)), expand(table.slice(13))]))
    assert whole.keys() == halves.keys()
    assert all(np.array_equal(whole[i][0], halves[i][0]) for i in whole)
    other = _by_id(mixed_copies(4, 1.0, pool, seed=2)(table))
    assert any(not np.array_equal(other[i][0], whole[i][0]) for i in whole if i % 4)


def test_mixup_partners_are_a_fixed_sample_of_the_transfer_rows(ray_local, tmp_path):
    data = str(tmp_path / "images")
    write_images(data)
    train = {int(i): image.ravel() for i, (image, _) in _by_id(pa.concat_tables(
        [image_table(12, 0), image_table(9, 1, first_id=12)])).items()}
    rows = transfer_rows(TransferConfig(omit_classes=[2]), data)
    kept = {int(i) for batch in rows.iter_batches(batch_format="pyarrow") for i in batch.column("id").to_pylist()}
    pool = mixup_partners(rows, 5, seed=3)
    assert pool.shape == (5, 36) and pool.dtype == np.float32
    matches = [[i for i, image in train.items() if np.array_equal(image, partner)] for partner in pool]
    assert all(len(m) == 1 and m[0] in kept for m in matches)  # transfer rows only: class 2 omitted
    assert np.array_equal(pool, mixup_partners(rows.repartition(3), 5, seed=3))  # whatever the blocks
    assert not np.array_equal(pool, mixup_partners(rows, 5, seed=4))
    assert len(mixup_partners(rows, 1000, seed=3)) == len(kept)  # asked for more than there are: all


def test_the_transfer_set_has_mixup_copies_and_the_baseline_the_plain_rows(ray_local, tmp_path):
    data = str(tmp_path / "images")
    write_images(data)
    rows = transfer_rows(TransferConfig(copies=3, augment="mixup", mixup_partners=4), data)
    labels = {int(i): y for batch in rows.iter_batches(batch_format="pyarrow")
              for i, y in zip(batch.column("id").to_pylist(), batch.column("y").to_pylist())}
    assert sorted(labels) == list(range(63))
    assert all((labels[i] >= 0) == (i % 3 == 0) for i in labels)  # copies 1 and 2 are unlabeled blends
    config = config_from_dict({"data": {"source": "parquet", "path": data},
                               "distill": {"transfer": {"copies": 3, "augment": "mixup"}}})
    assert _training_rows(config, BASELINE, data, "").count() == 21


def test_mixup_fields_enter_the_fingerprint_only_when_mixup_copies_are_made():
    plain, jittered = TransferConfig(), TransferConfig(copies=4)
    assert "augment" not in plain.fingerprint_view() and "mixup_alpha" not in jittered.fingerprint_view()
    assert plain.fingerprint_view() == TransferConfig(mixup_alpha=0.3).fingerprint_view()
    mixup = TransferConfig(copies=4, augment="mixup")
    assert mixup.fingerprint_view()["augment"] == "mixup"
    assert mixup.fingerprint_view() != TransferConfig(copies=4, augment="mixup", mixup_alpha=0.3).fingerprint_view()


def test_too_many_mixup_partners_are_refused_before_the_run():
    config = config_from_dict({"distill": {"transfer": {"copies": 2, "augment": "mixup", "mixup_partners": 10**7}}})
    with pytest.raises(ConfigError, match=r"distill\.transfer\.mixup_partners: 10000000 rows of 32 features"):
        check_config(config)


def test_the_baseline_gets_as_many_updates_as_the_student_on_copies():
    for copies, epochs in ((1, 5), (4, 20)):
        config = config_from_dict({"distill": {"train": {"epochs": 5}, "transfer": {"copies": copies, "augment": "mixup"}}})
        baseline, student = baseline_spec(config, (32,), 40), student_spec(config, (32,), 40, student_loss(config, 40))
        assert baseline.train.epochs == epochs and student.train.epochs == 5
        assert baseline.loss.kind == "hard" and baseline.model == student.model
