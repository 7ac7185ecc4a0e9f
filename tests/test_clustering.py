"""kdray/specialists/clustering.py: online k-means over covariance columns, subset bounds and overlaps, and the
per-class re-sharding of the training split (real local Ray)."""

import numpy as np
import pyarrow.parquet as pq
import pytest
from sklearn.metrics import adjusted_rand_score
from tiny_data import write_blobs

from kdray.config import ClusteringConfig, ConfigError
from kdray.data import read_manifest
from kdray.runtime.storage import Storage
from kdray.specialists.clustering import (
    INDEX_MANIFEST,
    assign_specialist_subsets,
    class_file,
    constrained_assignment,
    covariation_shares,
    online_kmeans,
    overlapping_subsets,
    plot_covariance,
    restarts_here,
    restarts_in_tasks,
    write_class_index,
)


def block_covariance(groups, within=0.5, noise=0.0, seed=0):
    """Classes co-vary only within their group: 1 on the diagonal, `within` inside a group."""
    groups = np.asarray(groups)
    covariance = np.where(groups[:, None] == groups[None], within, 0.0)
    np.fill_diagonal(covariance, 1.0)
    if noise:
        e = np.random.default_rng(seed).normal(scale=noise, size=covariance.shape)
        covariance = covariance + (e + e.T) / 2
    return covariance


def test_kmeans_recovers_planted_groups_exactly():
    groups = np.arange(24) % 6  # interleaved: class ids say nothing about the groups
    subsets = assign_specialist_subsets(block_covariance(groups, noise=0.02), ClusteringConfig(num_specialists=6))
    assert adjusted_rand_score(groups, subsets.assignment) == 1.0
    assert sorted(map(sorted, subsets.subsets)) == sorted(sorted(np.flatnonzero(groups == g).tolist()) for g in range(6))
    assert subsets.membership().sum(0).tolist() == [1] * 24  # memberships=1: a partition


def test_online_kmeans_is_deterministic_for_a_seed():
    points = np.random.default_rng(3).normal(size=(40, 5))
    np.testing.assert_array_equal(online_kmeans(points, 4, seed=7), online_kmeans(points, 4, seed=7))


def test_restarts_as_ray_tasks_give_the_same_centroids_as_here(ray_local):
    points = np.random.default_rng(5).normal(size=(60, 6))
    here = restarts_here(points, 4, 8, 5, 7, 6)
    in_tasks = restarts_in_tasks(points, 4, 8, 5, 7, 6)
    assert [inertia for _, inertia in in_tasks] == [inertia for _, inertia in here]
    for (mine, _), (theirs, _) in zip(in_tasks, here):
        np.testing.assert_array_equal(mine, theirs)
    best = min(range(6), key=lambda restart: here[restart][1])  # the least within-cluster sum of squares
    np.testing.assert_array_equal(online_kmeans(points, 4, 8, 5, 6, 7, restarts_in_tasks), here[best][0])


def test_size_bounds_hold_when_the_groups_do_not_fit_them():
    groups = np.array([0] * 6 + [1] * 3 + [2] * 3)
    config = ClusteringConfig(num_specialists=3, min_size=4, max_size=4)
    subsets = assign_specialist_subsets(block_covariance(groups), config)
    assert sorted(len(s) for s in subsets.subsets) == [4, 4, 4]
    # The bounds move as few classes as they must: each subset keeps a majority of one group.
    assert adjusted_rand_score(groups, subsets.assignment) > 0.3


def test_constrained_assignment_takes_nearest_without_binding_bounds():
    distances = np.random.default_rng(0).uniform(size=(30, 5))
    np.testing.assert_array_equal(constrained_assignment(distances, 1, None), distances.argmin(1))
    bounded = constrained_assignment(distances, 5, 7)
    assert np.bincount(bounded, minlength=5).min() >= 5 and np.bincount(bounded).max() <= 7


@pytest.mark.parametrize("min_share", [0.0, 0.45])
def test_a_class_between_two_groups_joins_both_with_memberships(min_share):
    groups = np.array([0, 0, 0, 1, 1, 1, -1])
    covariance = block_covariance(groups)
    covariance[6, :6] = covariance[:6, 6] = 0.35  # class 6 co-varies with both groups alike
    covariance[6, 6] = 1.0
    single = assign_specialist_subsets(covariance, ClusteringConfig(num_specialists=2, min_size=3))
    assert single.membership().sum(0).tolist() == [1] * 7
    overlapping = assign_specialist_subsets(covariance, ClusteringConfig(num_specialists=2, min_size=3, memberships=2,
                                                                         overlap_margin=0.5,
                                                                         overlap_min_share=min_share))
    assert overlapping.membership().sum(0).tolist() == [1] * 6 + [2]
    assert {(0, 1, 2, 6), (3, 4, 5, 6)} == set(overlapping.subsets)


def test_covariation_shares_split_each_class_positive_covariance_by_cluster():
    covariance = np.array([[1.0, 0.3, 0.1, -0.2],
                           [0.3, 1.0, 0.0, 0.0],
                           [0.1, 0.0, 1.0, 0.2],
                           [-0.2, 0.0, 0.2, 1.0]])
    shares = covariation_shares(covariance, np.array([0, 0, 1, 1]), 2)
    # Class 0: 0.3 with class 1 (its cluster), 0.1 with class 2, the negative -0.2 ignored.
    np.testing.assert_allclose(shares, [[0.75, 0.25], [1.0, 0.0], [1 / 3, 2 / 3], [0.0, 1.0]])
    np.testing.assert_array_equal(covariation_shares(np.eye(3), np.array([0, 1, 1]), 2), np.zeros((3, 2)))


def test_min_share_keeps_a_class_out_of_a_near_cluster_it_is_rarely_confused_with():
    distances = np.array([[1.0, 1.5], [1.0, 1.4], [2.0, 1.0], [2.0, 1.0]])
    assignment = np.array([0, 0, 1, 1])
    shares = np.array([[0.6, 0.4], [0.9, 0.1], [0.0, 1.0], [0.0, 1.0]])
    by_distance = overlapping_subsets(distances, assignment, 2, 0.5, None)
    assert by_distance == ((0, 1), (0, 1, 2, 3))  # both within 1.5x of their own centroid's distance
    # Class 1 has only 10% of its co-variation with cluster 1: it stays out; class 0 (40%) joins.
    assert overlapping_subsets(distances, assignment, 2, 0.5, None, shares, 0.3) == ((0, 1), (0, 2, 3))


@pytest.mark.parametrize("options, key", [({"num_specialists": 9}, "num_specialists"),
                                          ({"num_specialists": 3, "min_size": 3}, "min_size"),
                                          ({"num_specialists": 2, "max_size": 3}, "max_size"),
                                          ({"num_specialists": 2, "memberships": 3}, "memberships")])
def test_unmeetable_bounds_name_the_key(options, key):
    with pytest.raises(ConfigError, match=f"clustering.{key}"):
        assign_specialist_subsets(np.eye(8), ClusteringConfig(**options))


def test_covariance_plot_is_a_png():
    groups = np.arange(8) % 2
    covariance = block_covariance(groups)
    png = plot_covariance(covariance, assign_specialist_subsets(covariance, ClusteringConfig(num_specialists=2)), None)
    assert png.startswith(b"\x89PNG")


def test_class_index_reshards_the_training_split_by_class(ray_local, tmp_path):
    write_blobs(str(tmp_path / "data"), classes=4, rows=(600, 100, 100))
    manifest = read_manifest(Storage(str(tmp_path / "data")))
    output = Storage(str(tmp_path / "index"))
    counts = write_class_index(str(tmp_path / "data"), output)
    assert sum(counts) == manifest.rows("train") == 600
    assert output.read_json(INDEX_MANIFEST)["rows"] == counts
    assert not output.exists("_pieces")
    ids = []
    for label in range(4):
        table = pq.read_table(output.path(class_file(label)))
        assert set(table.column("y").to_pylist()) == {label} and table.num_rows == counts[label]
        u = table.column("u").to_numpy()
        assert np.all(np.diff(u) >= 0)  # sorted by the row hash: a window of u is a run of row groups
        ids += table.column("id").to_pylist()
    assert sorted(ids) == list(range(600))  # train ids are the first 600; every one exactly once


def test_kmeans_recovers_many_weakly_covarying_groups():
    # 200 classes as a good generalist leaves them: each class's own variance dominates its
    # column, classes of a group co-vary weakly, and every pair across groups shows the same slight
    # negative covariance. Unit columns of the raw covariance put 62 classes in one subset here.
    groups = np.arange(200) % 25
    covariance = block_covariance(groups, within=0.15, noise=0.02) - 0.01 * (groups[:, None] != groups[None])
    subsets = assign_specialist_subsets(covariance, ClusteringConfig(num_specialists=25))
    assert adjusted_rand_score(groups, subsets.assignment) == 1.0
