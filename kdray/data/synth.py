"""Synthetic many-class data with planted confusable groups, generated and written by Ray tasks.

The generative story, every random choice drawn from `SynthConfig.seed` alone:

1. **Groups.** Class ``c`` belongs to group ``c % groups`` (interleaved, so class ids reveal nothing
   about the groups; sort by the manifest's ``class_groups`` to see the confusion matrix as blocks).
2. **Latent means** in ``latent_dim`` dimensions: group centres ``group_spread * N(0, I)`` (the best
   of `CENTRE_DRAWS` draws by smallest pairwise distance, so no two groups nearly coincide); class
   means ``centre + class_spread * N(0, I)``; a row is ``z = mean[y] + noise * N(0, I)`` with
   ``y`` uniform. Classes of one group overlap; groups lie far apart. The last ``bridges``
   classes are *bridges*, confusable with two groups: each has a second mean in the group whose
   centre is nearest its own (``partner centre + class_spread * N(0, I)``, drawn from a stream of
   its own so the other classes do not change), and half its rows, by a fair coin, come from it.
3. **Warp.** `WARP_LAYERS` additive coupling layers (a random rotation, then half the coordinates
   move by ``amplitude * sin(W @ other half + phase)``), bending space at the scale of the groups.
   Coupling layers are invertible and volume-preserving, so the warp loses no information: the
   Bayes error is still that of the latent Gaussians, but the class regions are curved, which a
   linear classifier cannot follow and an MLP can.
4. **Embedding** into ``dim`` features by a random matrix with orthonormal rows, then fixed
   standardising constants. The embedding is linear on purpose: random *non-linear* features in
   more dimensions would make the classes linearly separable again (Cover's theorem). With
   ``dim >= latent_dim`` the features therefore span a ``latent_dim``-dimensional subspace.

Shards are independent: shard ``(split, index)`` draws from a generator seeded by
``(seed, split, index)`` only, so its bytes do not depend on how many Ray workers run or in which
order. Memory per task is bounded by one shard, about ``3 * rows_per_shard * dim * 4`` bytes
(the float32 array, its Parquet encoding and a copy of those bytes); `MAX_SHARD_VALUES` caps a
shard at 512 MiB of features, so more rows need more ``shards``. The driver only sees `ShardInfo`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import partial

import numpy as np
import pyarrow as pa
import ray

from kdray.config import SynthConfig
from kdray.data.sampling import seed_entropy
from kdray.data.shards import (
    MANIFEST,
    SPLITS,
    DatasetManifest,
    ShardInfo,
    shard_name,
    shard_table,
    write_manifest,
    write_shard,
)
from kdray.runtime.session import run_bounded
from kdray.runtime.storage import Storage

CENTRE_DRAWS = 64
WARP_LAYERS = 4
WARP_FREQUENCY = 1.5  # radians per group_spread of latent distance: bends at the scale of groups
WARP_AMPLITUDE = 0.6  # displacement in units of group_spread
CALIBRATION_ROWS = 8192  # rows drawn from the structure seed to fix the standardising constants
CHUNK_ROWS = 100_000  # rows generated at once inside a shard (bounds temporaries in float64)
MAX_SHARD_VALUES = 1 << 27  # float32 features in one shard (512 MiB)
_SPLIT_ROWS = {"train": "rows", "validation": "validation_rows", "test": "test_rows"}


# ------------------------------------------------------------------------------------ structure
@dataclass(frozen=True)
class SynthStructure:
    """Everything fixed by the seed; L = latent_dim, D = dim, K = WARP_LAYERS, H = L // 2."""

    class_groups: np.ndarray  # [C] int64
    class_partners: np.ndarray  # [C] int64: a bridge class's second group, -1 for the others
    class_means: np.ndarray  # [C, L] latent class means
    second_means: np.ndarray  # [C, L] a bridge class's mean in its partner group (= class_means otherwise)
    rotations: np.ndarray  # [K, L, L] orthogonal
    frequencies: np.ndarray  # [K, L - H, H]
    phases: np.ndarray  # [K, H]
    amplitude: float
    embedding: np.ndarray  # [L, D]
    feature_mean: np.ndarray  # [D]
    feature_scale: np.ndarray  # [D]

    def warp(self, latent: np.ndarray) -> np.ndarray:
        """[N, L] -> [N, L], invertible: each layer shifts the first H coordinates by a function
        of the rest, which it leaves unchanged."""
        half = self.phases.shape[1]
        for rotation, frequency, phase in zip(self.rotations, self.frequencies, self.phases):
            latent = latent @ rotation
            moved, fixed = latent[:, :half], latent[:, half:]
            latent = np.concatenate([moved + self.amplitude * np.sin(fixed @ frequency + phase), fixed], axis=1)
        return latent

    def raw_features(self, latent: np.ndarray) -> np.ndarray:
        """[N, L] -> [N, D] before standardising."""
        return self.warp(latent) @ self.embedding

    def features(self, latent: np.ndarray) -> np.ndarray:
        """[N, L] latent points -> [N, D] float32 standardised features."""
        return ((self.raw_features(latent) - self.feature_mean) / self.feature_scale).astype(np.float32)

    def sample(self, rng: np.random.Generator, rows: int, noise: float) -> tuple[np.ndarray, np.ndarray]:
        """-> labels [rows] uniform over classes, latent points [rows, L]."""
        labels = rng.integers(0, len(self.class_means), rows)
        means = self.class_means[labels]
        latent = means + noise * rng.standard_normal(means.shape)
        if (self.class_partners >= 0).any():  # no extra draws without bridges: their rows stay as they were
            second = (self.class_partners[labels] >= 0) & (rng.random(rows) < 0.5)
            latent[second] += self.second_means[labels[second]] - means[second]
        return labels, latent


def _rng(cfg: SynthConfig, *key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(seed_entropy(cfg.seed), spawn_key=key))


def class_groups(cfg: SynthConfig) -> np.ndarray:
    """[C] the planted group of each class: class c is in group c % groups."""
    return np.arange(cfg.classes, dtype=np.int64) % cfg.groups


def _group_centres(rng: np.random.Generator, cfg: SynthConfig) -> np.ndarray:
    """[G, L]: the draw whose closest two centres are farthest apart, among CENTRE_DRAWS draws."""
    best, best_gap = None, -1.0
    for _ in range(CENTRE_DRAWS):
        centres = cfg.group_spread * rng.standard_normal((cfg.groups, cfg.latent_dim))
        gaps = np.linalg.norm(centres[:, None] - centres[None], axis=-1)
        gap = np.min(gaps[~np.eye(cfg.groups, dtype=bool)], initial=np.inf)
        if gap > best_gap:
            best, best_gap = centres, gap
    return best


def bridge_partners(centres: np.ndarray, groups: np.ndarray, bridges: int) -> np.ndarray:
    """[C]: for each of the last `bridges` classes the other group whose centre (of `centres`
    [G, L]) is nearest its own group's; -1 for every other class."""
    gaps = np.linalg.norm(centres[:, None] - centres[None], axis=-1)
    np.fill_diagonal(gaps, np.inf)
    partners = np.full(len(groups), -1, dtype=np.int64)
    if bridges:
        partners[-bridges:] = gaps.argmin(axis=1)[groups[-bridges:]]
    return partners


def _orthonormal(rng: np.random.Generator, rows: int, cols: int) -> np.ndarray:
    """[rows, cols] with orthonormal rows (rows <= cols) or orthonormal columns (rows > cols)."""
    basis, _ = np.linalg.qr(rng.standard_normal((max(rows, cols), min(rows, cols))))
    return basis if rows >= cols else basis.T


def synth_structure(cfg: SynthConfig) -> SynthStructure:
    """Draw the class means, warp and embedding for `cfg` (cheap: every task rebuilds it)."""
    rng = _rng(cfg, 0)
    groups = class_groups(cfg)
    centres = _group_centres(rng, cfg)
    means = centres[groups] + cfg.class_spread * rng.standard_normal((cfg.classes, cfg.latent_dim))
    partners = bridge_partners(centres, groups, cfg.bridges)
    second_means = means.copy()
    bridged = partners >= 0
    second_means[bridged] = centres[partners[bridged]] + cfg.class_spread * _rng(cfg, 0, 1).standard_normal(
        (int(bridged.sum()), cfg.latent_dim))
    latent, half = cfg.latent_dim, cfg.latent_dim // 2
    structure = SynthStructure(
        class_groups=groups,
        class_partners=partners,
        class_means=means,
        second_means=second_means,
        rotations=np.stack([_orthonormal(rng, latent, latent) for _ in range(WARP_LAYERS)]),
        frequencies=rng.standard_normal((WARP_LAYERS, latent - half, half)) * (WARP_FREQUENCY / cfg.group_spread),
        phases=rng.uniform(0.0, 2 * np.pi, (WARP_LAYERS, half)),
        amplitude=WARP_AMPLITUDE * cfg.group_spread,
        embedding=_orthonormal(rng, latent, cfg.dim),
        feature_mean=np.zeros(cfg.dim),
        feature_scale=np.ones(cfg.dim),
    )
    # Constants from the structure seed, not from any shard, so every shard is scaled alike.
    _, calibration = structure.sample(rng, CALIBRATION_ROWS, cfg.noise)
    raw = structure.raw_features(calibration)
    scale = raw.std(axis=0)
    return dataclasses.replace(structure, feature_mean=raw.mean(axis=0), feature_scale=np.where(scale > 0, scale, 1.0))


# ------------------------------------------------------------------------------------ layout
def split_shard_count(cfg: SynthConfig, split: str) -> int:
    """Shards of a split: `shards` for train; the others get shards in proportion to their rows."""
    _check_split(split)
    if split == "train":
        return cfg.shards
    return max(1, round(cfg.shards * getattr(cfg, _SPLIT_ROWS[split]) / cfg.rows))


def shard_span(cfg: SynthConfig, split: str, index: int) -> tuple[int, int]:
    """-> (first id, rows) of shard `index`: a split's rows spread as evenly as possible over its
    shards; ids run contiguously through train, then validation, then test."""
    count = split_shard_count(cfg, split)
    if not 0 <= index < count:
        raise ValueError(f"shard index {index} out of range: split {split!r} has {count} shards")
    total = getattr(cfg, _SPLIT_ROWS[split])
    base, extra = divmod(total, count)
    offset = sum(getattr(cfg, _SPLIT_ROWS[s]) for s in SPLITS[:SPLITS.index(split)])
    return offset + index * base + min(index, extra), base + (index < extra)


def _largest_shard(cfg: SynthConfig) -> tuple[str, int]:
    """-> (split, rows) of the split with the largest shard (shard 0 is a split's largest)."""
    return max(((split, shard_span(cfg, split, 0)[1]) for split in SPLITS), key=lambda item: item[1])


def check_layout(cfg: SynthConfig) -> None:
    """Reject configs whose shards would be empty or too large for one task's memory."""
    if cfg.shards > cfg.rows:
        raise ValueError(f"synth.shards ({cfg.shards}) exceeds synth.rows ({cfg.rows}): some shards would be empty")
    split, rows = _largest_shard(cfg)
    if rows * cfg.dim > MAX_SHARD_VALUES:
        fits = lambda shards: _largest_shard(cfg.model_copy(update={"shards": shards}))[1] * cfg.dim <= MAX_SHARD_VALUES
        needed = next(s for s in range(cfg.shards + 1, cfg.rows + 1) if fits(s))
        raise ValueError(f"synth.shards={cfg.shards} puts {rows:,} rows x {cfg.dim} features in a {split} shard "
                         f"(limit {MAX_SHARD_VALUES:,} values per shard); set synth.shards >= {needed}")


def _check_split(split: str) -> None:
    if split not in _SPLIT_ROWS:
        raise ValueError(f"unknown split {split!r}; expected one of {list(_SPLIT_ROWS)}")


# ------------------------------------------------------------------------------------ shards
def generate_shard(cfg: SynthConfig, split: str, index: int, structure: SynthStructure | None = None) -> pa.Table:
    """Shard `index` of `split` as a table in the shard schema (id [N], x [N, dim], y [N]).

    Drawn from a generator seeded by (cfg.seed, split, index) alone, in chunks of CHUNK_ROWS rows
    so float64 temporaries stay small; `structure` may be passed to skip rebuilding it.
    """
    first, rows = shard_span(cfg, split, index)
    structure = structure or synth_structure(cfg)
    rng = _rng(cfg, 1 + SPLITS.index(split), index)
    features = np.empty((rows, cfg.dim), dtype=np.float32)
    labels = np.empty(rows, dtype=np.int64)
    for start in range(0, rows, CHUNK_ROWS):
        stop = min(start + CHUNK_ROWS, rows)
        labels[start:stop], latent = structure.sample(rng, stop - start, cfg.noise)
        features[start:stop] = structure.features(latent)
    return shard_table(np.arange(first, first + rows, dtype=np.int64), features, labels)


@ray.remote(num_cpus=1)
def _write_synthetic_shard(storage: Storage, cfg: SynthConfig, split: str, index: int) -> ShardInfo:
    # Generates and writes in the worker, so only the ShardInfo travels back to the driver. A
    # retried task rewrites identical bytes (deterministic shard, atomic write), so retries are safe.
    return write_shard(storage, shard_name(split, index), split, generate_shard(cfg, split, index))


def _shard_keys(cfg: SynthConfig) -> list[tuple[str, int]]:
    return [(split, index) for split in SPLITS for index in range(split_shard_count(cfg, split))]


def _default_in_flight() -> int:
    return max(2, 2 * int(ray.cluster_resources().get("CPU", 1)))


def write_synthetic_dataset(storage: Storage, cfg: SynthConfig, progress: bool = False,
                            max_in_flight: int | None = None) -> DatasetManifest:
    """Generate the dataset `cfg` describes into `storage` with one Ray task per shard; returns the
    manifest, written last. The driver holds no features; at most `max_in_flight` tasks (default
    twice the cluster's CPUs) are submitted at once. If a task fails no manifest is left behind."""
    check_layout(cfg)
    if max_in_flight is not None and max_in_flight < 1:
        raise ValueError(f"max_in_flight must be at least 1, got {max_in_flight}")
    storage.delete(MANIFEST)  # until the new manifest lands the directory reads as unfinished
    keys = _shard_keys(cfg)
    infos = run_bounded([partial(_write_synthetic_shard.remote, storage, cfg, *key) for key in keys],
                        max_in_flight or _default_in_flight(), desc="synth shards", progress=progress, unit="shard")
    manifest = DatasetManifest(
        num_classes=cfg.classes,
        feature_shape=(cfg.dim,),
        shards=tuple(infos),
        class_names=tuple(f"class_{c:0{max(2, len(str(cfg.classes - 1)))}d}" for c in range(cfg.classes)),
        class_groups=tuple(int(g) for g in class_groups(cfg)),
        source={"kind": "synth", "config": cfg.model_dump()},
    )
    write_manifest(storage, manifest)
    return manifest
