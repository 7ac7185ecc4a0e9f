"""The clustering stage: which classes each specialist covers (paper, section 5.1).

1. The generalist (the teacher stage's model) predicts the validation split through a Ray Data
   actor pool; its probabilities stream into a `CovarianceAccumulator` batch by batch, giving the
   C x C covariance of the predicted class probabilities (kdray.specialists.covariance).
2. A Ray task runs an online k-means over the covariance's columns (`assign_specialist_subsets`):
   classes that co-vary (are predicted together) share a cluster. Each column keeps only its
   positive co-variation with the other classes (`column_features`) and is scaled to unit length,
   so a cluster is a set of classes with the same *pattern* of co-variation, whatever each class's
   own variance. Clusters then respect `min_size`/`max_size`, and with
   `memberships > 1` a class also joins up to `memberships - 1` further clusters whose centroid is
   within a factor (1 + overlap_margin) of its own centroid's distance and whose classes take at
   least `overlap_min_share` of its positive co-variation (`covariation_shares`): the paper's
   overlapping subsets.
3. Alongside, per-shard Ray tasks re-shard the training split by class (`write_class_index`), so a
   specialist later reads its own classes' files and a prefix-sampled share of the rest's.

Artifacts in RUN/clustering/: subsets.json (subsets, primary assignment, distances, sizes and, on
data with planted groups, the adjusted Rand index against the manifest's `class_groups`),
covariance.npy, covariance.png (the matrix ordered by subset) and class_index/.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray

from kdray.config import ClusteringConfig
from kdray.data import (
    read_manifest,
    read_split,
    splitmix_uniform,  # sample_rows' hash: one definition
)
from kdray.data.shards import DatasetManifest
from kdray.evaluation.inference import ModelRef, features, map_logits
from kdray.evaluation.metrics import log_softmax
from kdray.preflight import check_clustering
from kdray.runtime.session import gather
from kdray.runtime.stage import REPORT_FIGURES, StageContext, StageResult
from kdray.runtime.storage import Storage
from kdray.specialists.combine import membership_matrix
from kdray.specialists.covariance import CovarianceAccumulator

SUBSETS, COVARIANCE, COVARIANCE_PLOT, CLASS_INDEX = "subsets.json", "covariance.npy", "covariance.png", "class_index"
COVARIANCE_CAPTION = "Covariance of the generalist's predicted class probabilities, ordered by specialist subset"
INDEX_MANIFEST = "index.json"
INDEX_SEED = 0x5EC1A1  # seeds the per-row hash u that orders every class file
ROW_GROUPS_PER_CLASS = 32  # a class file's row groups: the granularity of prefix sampling
MIN_ROW_GROUP_ROWS = 256


# ------------------------------------------------------------------------------------ the maths
@dataclass(frozen=True)
class ClassSubsets:
    """K specialist subsets of C classes. `assignment` [C] is each class's primary subset (a
    partition); `subsets` may overlap; `distances` [C, K] from each class's feature to each centroid."""

    subsets: tuple[tuple[int, ...], ...]
    assignment: np.ndarray
    distances: np.ndarray

    def membership(self) -> np.ndarray:
        """[K, C] bool: True iff class c is in subset k."""
        return membership_matrix(self.subsets, len(self.assignment)).numpy()

    def to_json(self) -> dict:
        return {"subsets": [list(s) for s in self.subsets], "assignment": self.assignment.tolist(),
                "distances": np.round(self.distances, 6).tolist()}


def positive_covariation(covariance: np.ndarray) -> np.ndarray:
    """[C, C]: each class's positive covariance with the other classes (negatives and the diagonal 0)."""
    positive = np.clip(covariance, 0.0, None)
    np.fill_diagonal(positive, 0.0)
    return positive


def column_features(covariance: np.ndarray) -> np.ndarray:
    """[C, C] covariance -> [C, C] points, one per class: its column's positive co-variation with
    the other classes, scaled to unit L2 norm.

    Two entries of a column say nothing about which classes are predicted together, and with many
    classes they swamp the rest: the class's own variance (on the diagonal, a direction no other
    class shares, so every point is nearly orthogonal to every other) and the negative covariances
    with classes never predicted alongside it (about -mean_c mean_j, the same small pattern in
    every column). So negatives become 0 and the diagonal takes the column's largest off-diagonal
    entry (it keeps its variance when it co-varies positively with no class)."""
    features = positive_covariation(covariance)
    strongest = features.max(axis=0)
    np.fill_diagonal(features, np.where(strongest > 0, strongest, np.clip(np.diag(covariance), 0.0, None)))
    norms = np.linalg.norm(features, axis=0)
    return (features / np.where(norms > 0, norms, 1.0)).T


def _squared_distances(points: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """[N, D], [K, D] -> [N, K], clipped at 0 against rounding."""
    return np.maximum((points**2).sum(1)[:, None] - 2 * points @ centroids.T + (centroids**2).sum(1)[None], 0.0)


def kmeans_plus_plus(points: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """k initial centroids [k, D], greedy k-means++ (Arthur & Vassilvitskii; scikit-learn's default):
    each next centroid is the best, by the resulting sum of squared distances, of 2 + ln k
    candidates drawn with probability proportional to the squared distance to the nearest centroid
    so far. One candidate per step often lands a second seed in an already seeded cluster, which
    the updates below rarely undo."""
    trials = 2 + int(np.log(k))
    centroids = [points[rng.integers(len(points))]]
    nearest = _squared_distances(points, np.asarray(centroids)).min(1)
    for _ in range(1, k):
        total = nearest.sum()
        candidates = rng.choice(len(points), size=trials, p=nearest / total) if total > 0 \
            else rng.integers(len(points), size=trials)
        potentials = np.minimum(nearest[None], _squared_distances(points, points[candidates]).T)  # [trials, N]
        best = int(potentials.sum(1).argmin())
        centroids.append(points[candidates[best]])
        nearest = potentials[best]
    return np.array(centroids)


def online_kmeans(points: np.ndarray, k: int, batch_size: int = 8, epochs: int = 20, restarts: int = 8,
                  seed: int = 0, run_restarts: RestartRunner | None = None) -> np.ndarray:
    """Centroids [k, D] of points [N, D] by online (mini-batch) k-means, best of `restarts`.

    Each restart (`kmeans_restart`): k-means++ seeds, then `epochs` shuffled passes in mini-batches
    of `batch_size`; a point moves its nearest centroid towards it with rate 1 / (points that
    centroid has seen in this pass), so each pass makes each centroid the running mean of its
    points in that pass (Sculley 2010, with the counts restarted every pass: counted over all
    passes, the rates fall to ~1 / (epochs x cluster size) and the centroids freeze where the first
    pass left them). A final step sets each centroid to the mean of the points nearest it. The
    restart with the least within-cluster sum of squares wins (the first of equals). Restarts are
    independent, so `run_restarts` may run them anywhere (`restarts_in_tasks`: as Ray tasks);
    by default they run here, one after the other. Deterministic for `seed` either way.
    """
    run_restarts = run_restarts or restarts_here
    best, best_inertia = None, np.inf
    for centroids, inertia in run_restarts(points, k, batch_size, epochs, seed, restarts):
        if inertia < best_inertia - 1e-12:
            best, best_inertia = centroids, inertia
    return best


def kmeans_restart(points: np.ndarray, k: int, batch_size: int, epochs: int, seed: int,
                   restart: int) -> tuple[np.ndarray, float]:
    """One restart of `online_kmeans`: its centroids [k, D] and within-cluster sum of squares."""
    rng = np.random.default_rng([seed, restart])
    centroids = kmeans_plus_plus(points, k, rng)
    for _ in range(epochs):
        seen = np.ones(k)
        order = rng.permutation(len(points))
        for start in range(0, len(points), batch_size):
            batch = points[order[start:start + batch_size]]
            for point, j in zip(batch, _squared_distances(batch, centroids).argmin(1)):
                seen[j] += 1
                centroids[j] += (point - centroids[j]) / seen[j]
    nearest = _squared_distances(points, centroids).argmin(1)
    for j in np.unique(nearest):
        centroids[j] = points[nearest == j].mean(0)
    return centroids, float(_squared_distances(points, centroids).min(1).sum())


# (points, k, batch_size, epochs, seed, restarts) -> each restart's (centroids, inertia), in order
RestartRunner = Callable[[np.ndarray, int, int, int, int, int], list[tuple[np.ndarray, float]]]


def restarts_here(points: np.ndarray, k: int, batch_size: int, epochs: int, seed: int,
                  restarts: int) -> list[tuple[np.ndarray, float]]:
    return [kmeans_restart(points, k, batch_size, epochs, seed, restart) for restart in range(restarts)]


def restarts_in_tasks(points: np.ndarray, k: int, batch_size: int, epochs: int, seed: int,
                      restarts: int) -> list[tuple[np.ndarray, float]]:
    """The restarts as Ray tasks, one CPU each, as many at once as the cluster has CPUs for; the
    points go to the object store once and every task reads them there."""
    shared = ray.put(points)
    return gather([_restart_task.remote(shared, k, batch_size, epochs, seed, restart) for restart in range(restarts)])


@ray.remote(num_cpus=1)
def _restart_task(points: np.ndarray, k: int, batch_size: int, epochs: int, seed: int,
                  restart: int) -> tuple[np.ndarray, float]:
    return kmeans_restart(points, k, batch_size, epochs, seed, restart)


def constrained_assignment(distances: np.ndarray, min_size: int, max_size: int | None) -> np.ndarray:
    """Each class's cluster [C] from distances [C, K], every cluster of min_size..max_size classes.

    Greedy: (class, cluster) pairs in order of distance, a class taking the first cluster with room
    (so without binding bounds every class takes its nearest). Then, while a cluster is short, it
    takes the class whose move costs least in distance from a cluster that can spare one.
    Requires K * min_size <= C <= K * max_size.
    """
    num_classes, k = distances.shape
    capacity = num_classes if max_size is None else max_size
    assignment = np.full(num_classes, -1)
    sizes = np.zeros(k, dtype=int)
    for flat in np.argsort(distances, axis=None, kind="stable"):
        i, j = divmod(int(flat), k)
        if assignment[i] < 0 and sizes[j] < capacity:
            assignment[i], sizes[j] = j, sizes[j] + 1
    while (short := np.flatnonzero(sizes < min_size)).size:
        j = short[np.argmin(sizes[short])]
        donors = np.flatnonzero(sizes[assignment] > min_size)
        cost = distances[donors, j] - distances[donors, assignment[donors]]
        i = donors[np.argmin(cost)]
        sizes[assignment[i]] -= 1
        assignment[i], sizes[j] = j, sizes[j] + 1
    return assignment


def covariation_shares(covariance: np.ndarray, assignment: np.ndarray, k: int) -> np.ndarray:
    """[C, K]: the share of class c's positive covariance with the other classes that is with the
    classes of primary cluster j (rows sum to 1, or 0 for a class that co-varies with none).

    A class the generalist confuses with two groups puts a large share in each; a class confused
    only within its group puts nearly all of it there, however close its unit-length column (which
    for a rarely confused class is small, noisy co-variation blown up) lies to other centroids."""
    by_cluster = positive_covariation(covariance) @ np.eye(k)[assignment]  # [C, K]: sums over each cluster's classes
    total = by_cluster.sum(1, keepdims=True)
    return by_cluster / np.where(total > 0, total, 1.0)


def overlapping_subsets(distances: np.ndarray, assignment: np.ndarray, memberships: int, margin: float,
                        max_size: int | None, shares: np.ndarray | None = None,
                        min_share: float = 0.0) -> tuple[tuple[int, ...], ...]:
    """Subsets from the primary assignment, each class also joining up to memberships - 1 more
    clusters whose distance is at most (1 + margin) times its primary cluster's and (with shares
    [C, K] from `covariation_shares`) that hold at least min_share of its co-variation, nearest (by
    the distance ratio) first, while the cluster has fewer than max_size classes."""
    num_classes, k = distances.shape
    subsets = [set(np.flatnonzero(assignment == j).tolist()) for j in range(k)]
    if memberships > 1:
        capacity = num_classes if max_size is None else max_size
        own = distances[np.arange(num_classes), assignment]
        ratio = distances / np.maximum(own, 1e-12)[:, None]
        ratio[np.arange(num_classes), assignment] = np.inf
        if shares is not None:
            ratio[shares < min_share] = np.inf
        joined = np.ones(num_classes, dtype=int)
        for flat in np.argsort(ratio, axis=None, kind="stable"):
            i, j = divmod(int(flat), k)
            if ratio[i, j] > 1 + margin:
                break
            if joined[i] < memberships and len(subsets[j]) < capacity:
                subsets[j].add(i)
                joined[i] += 1
    return tuple(tuple(sorted(s)) for s in subsets)


def assign_specialist_subsets(covariance: np.ndarray, config: ClusteringConfig,
                              run_restarts: RestartRunner | None = None) -> ClassSubsets:
    """Cluster the columns of covariance [C, C] into config.num_specialists subsets (see above);
    `run_restarts` as in `online_kmeans`."""
    covariance = np.asarray(covariance, dtype=np.float64)
    if covariance.ndim != 2 or covariance.shape[0] != covariance.shape[1]:
        raise ValueError(f"covariance must be a square [C, C] matrix, got shape {list(covariance.shape)}")
    check_clustering(config, len(covariance))
    points = column_features(covariance)
    centroids = online_kmeans(points, config.num_specialists, config.batch_size, config.epochs,
                              config.restarts, config.seed, run_restarts)
    distances = np.sqrt(_squared_distances(points, centroids))
    assignment = constrained_assignment(distances, config.min_size, config.max_size)
    shares = covariation_shares(covariance, assignment, config.num_specialists)
    subsets = overlapping_subsets(distances, assignment, config.memberships, config.overlap_margin, config.max_size,
                                  shares, config.overlap_min_share)
    return ClassSubsets(subsets, assignment, distances)


@ray.remote(num_cpus=1)
def _assign_task(covariance: np.ndarray, config: ClusteringConfig) -> ClassSubsets:
    # Waiting on its restart tasks, this task lends them its CPU (Ray releases it while blocked).
    return assign_specialist_subsets(covariance, config, restarts_in_tasks)


# ------------------------------------------------------------------------------------ covariance pass
def prediction_covariance(model: ModelRef, storage: Storage, manifest: DatasetManifest, split: str = "validation",
                          batch_size: int = 2048) -> tuple[np.ndarray, int]:
    """([C, C] covariance of `model`'s T = 1 probabilities over `split`, rows), one streaming pass:
    the driver sees one batch of logits at a time and keeps only the accumulator."""
    rows = read_split(storage, split, manifest).select_columns(["x"])
    logits = map_logits(rows, model, batch_size=batch_size).select_columns(["logits"])
    accumulator = CovarianceAccumulator(manifest.num_classes)
    for batch in logits.iter_batches(batch_format="pyarrow", batch_size=batch_size):
        accumulator.update(np.exp(log_softmax(features(batch, "logits"))))
    return accumulator.covariance(), accumulator.rows


# ------------------------------------------------------------------------------------ class index
def class_file(label: int) -> str:
    return f"class-{label:05d}.parquet"


def _piece(label: int, shard: int) -> str:
    return f"_pieces/class-{label:05d}/shard-{shard:05d}.parquet"


def _write_table(storage: Storage, table: pa.Table, file: str, row_group_rows: int | None = None) -> None:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="snappy", row_group_size=row_group_rows)
    storage.write_bytes(sink.getvalue().to_pybytes(), file)


@ray.remote(num_cpus=1)
def _split_shard(dataset: Storage, file: str, shard: int, output: Storage, num_classes: int) -> list[int]:
    """One training shard -> one piece per class present in it; returns its rows per class."""
    table = pq.read_table(dataset.path(file), filesystem=dataset.filesystem)
    labels = table.column("y").to_numpy()
    counts = np.bincount(labels[labels >= 0], minlength=num_classes)
    for label in np.flatnonzero(counts):
        _write_table(output, table.filter(pc.equal(table.column("y"), int(label))), _piece(int(label), shard))
    return counts.tolist()


@ray.remote(num_cpus=1)
def _merge_class(output: Storage, label: int, shards: list[int]) -> int:
    """A class's pieces -> one file, rows in the order of the hash u(id), in ~ROW_GROUPS_PER_CLASS
    row groups: rows with u in [a, b) are then a uniform sample of the class that Parquet's
    row-group statistics let a reader fetch without decoding the rest."""
    table = pa.concat_tables([pq.read_table(output.path(_piece(label, s)), filesystem=output.filesystem)
                              for s in shards])
    u = splitmix_uniform(table.column("id").to_numpy(), INDEX_SEED)
    order = np.argsort(u, kind="stable")
    table = table.take(pa.array(order)).append_column("u", pa.array(u[order]))
    rows_per_group = max(MIN_ROW_GROUP_ROWS, -(-table.num_rows // ROW_GROUPS_PER_CLASS))
    _write_table(output, table, class_file(label), rows_per_group)
    output.delete(f"_pieces/class-{label:05d}")
    return table.num_rows


def write_class_index(dataset_location: str, output: Storage, progress: bool = False) -> list[int]:
    """Re-shard the training split by class into `output` (one Parquet file per class, plus
    index.json written last); returns the training rows per class. Per-shard tasks, then per-class
    tasks: no task holds more than one shard or one class."""
    storage = Storage(dataset_location)
    manifest = read_manifest(storage)
    shards = manifest.split_shards("train")
    if not shards:
        raise ValueError(f"{storage.uri()} has no train split to index by class")
    per_shard = gather([_split_shard.remote(storage, s.file, i, output, manifest.num_classes)
                        for i, s in enumerate(shards)], desc="class index: shards", progress=progress, unit="shard")
    counts = np.array(per_shard)  # [shards, C]
    present = np.flatnonzero(counts.sum(0))
    gather([_merge_class.remote(output, int(c), np.flatnonzero(counts[:, c]).tolist()) for c in present],
           desc="class index: classes", progress=progress, unit="class")
    output.delete("_pieces")
    totals = counts.sum(0).tolist()
    output.write_json({"num_classes": manifest.num_classes, "rows": totals, "seed": INDEX_SEED,
                       "files": {str(c): class_file(int(c)) for c in present}}, INDEX_MANIFEST)
    return totals


# ------------------------------------------------------------------------------------ the plot
def plot_covariance(covariance: np.ndarray, subsets: ClassSubsets, class_groups: tuple[int, ...] | None) -> bytes:
    """PNG bytes: the covariance with classes ordered by primary subset, subsets outlined."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    order = np.lexsort((np.arange(len(subsets.assignment)), subsets.assignment))
    ordered = covariance[np.ix_(order, order)]
    # The diagonal (each class's own variance) dwarfs the co-variances; scale the colours to the latter.
    off_diagonal = np.abs(ordered[~np.eye(len(ordered), dtype=bool)])
    limit = float(np.percentile(off_diagonal, 99.5)) if off_diagonal.size else 1.0
    figure, axes = plt.subplots(figsize=(7, 6))
    image = axes.imshow(ordered, cmap="RdBu_r", vmin=-limit, vmax=limit or 1.0, interpolation="nearest")
    start = 0
    for size in np.bincount(subsets.assignment, minlength=len(subsets.subsets)):
        axes.add_patch(Rectangle((start - 0.5, start - 0.5), size, size, fill=False, edgecolor="black", linewidth=0.8))
        start += size
    title = f"covariance of the generalist's probabilities, {len(order)} classes ordered by subset"
    axes.set_title(title + ("" if class_groups is None else "\n(planted groups: see subsets.json ari)"), fontsize=9)
    axes.set_xlabel("class (ordered by subset)")
    figure.colorbar(image, ax=axes, shrink=0.8)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(figure)
    return buffer.getvalue()


# ------------------------------------------------------------------------------------ the stage
def run_clustering(context: StageContext) -> StageResult:
    from sklearn.metrics import adjusted_rand_score

    config, output = context.config.clustering, context.output
    dataset = context.input_output("data", "dataset")
    storage = Storage(dataset)
    manifest = read_manifest(storage)
    generalist = context.model_ref("teacher", "teacher")
    covariance, rows = prediction_covariance(generalist, storage, manifest)
    pending = _assign_task.remote(ray.put(covariance), config)
    counts = write_class_index(dataset, output.child(CLASS_INDEX), context.progress)
    subsets = gather([pending])[0]
    ari = None
    if manifest.class_groups is not None:
        ari = float(adjusted_rand_score(np.asarray(manifest.class_groups), subsets.assignment))
    sizes = [len(s) for s in subsets.subsets]
    covering = subsets.membership().sum(0)
    buffer = io.BytesIO()
    np.save(buffer, covariance)
    output.write_bytes(buffer.getvalue(), COVARIANCE)
    output.write_bytes(plot_covariance(covariance, subsets, manifest.class_groups), COVARIANCE_PLOT)
    output.write_json({**subsets.to_json(), "num_classes": manifest.num_classes, "class_names": list(manifest.class_names),
                       "class_groups": None if manifest.class_groups is None else list(manifest.class_groups),
                       "ari": ari, "covariance_rows": rows, "train_rows": counts}, SUBSETS)
    summary = {"specialists": len(sizes), "sizes": sizes, "ari": None if ari is None else round(ari, 4),
               "classes_covered": {str(n): int((covering == n).sum()) for n in np.unique(covering)},
               "covariance_rows": rows}
    return StageResult(outputs={"clustering": output.uri(), "subsets": output.uri(SUBSETS),
                                "class_index": output.uri(CLASS_INDEX),
                                "covariance": output.uri(COVARIANCE),
                                REPORT_FIGURES: {COVARIANCE_CAPTION: output.uri(COVARIANCE_PLOT)}}, summary=summary)
