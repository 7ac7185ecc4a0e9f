"""Seeded, per-row random draws that do not depend on how rows are split into shards or workers."""

from __future__ import annotations

# Seeds of the models trained side by side (ensemble members, specialists) lie this far apart, so
# their initial weights and data orders share nothing for any number of epochs below it.
MODEL_SEED_STRIDE = 1009


def model_seed(base: int, index: int) -> int:
    """The training seed of the `index`-th of several models trained from one config seed `base`."""
    return base + MODEL_SEED_STRIDE * index


def seed_entropy(seed: int) -> int:
    """A config seed as NumPy seeding takes it: SeedSequence refuses negative integers, and this
    is one-to-one for |seed| < 2**63 and keeps seeds in [0, 2**64) as they are (their data unchanged)."""
    return seed % (1 << 64)


def splitmix_uniform(ids, seed: int):
    """ids [N] int64 -> [N] floats in [0, 1): the splitmix64 finaliser of (id, seed), so each
    (id, seed) pair gets a fixed, well-mixed draw (different seeds give independent subsets)."""
    import numpy as np

    with np.errstate(over="ignore"):
        h = ids.astype(np.uint64) + np.uint64(seed) * np.uint64(0x9E3779B97F4A7C15)
        h = (h ^ (h >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        h = (h ^ (h >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        h ^= h >> np.uint64(31)
    return (h >> np.uint64(11)).astype(np.float64) / float(1 << 53)
