"""The covariance of a model's predicted class probabilities, accumulated in one streaming pass.

The specialists' class subsets come from clustering the C x C covariance matrix of the generalist's
predicted probabilities over held-out data (paper, section 5.1): classes the generalist often
predicts together co-vary. The predictions arrive batch by batch and are never held together: a
`CovarianceAccumulator` keeps only the row count n, the mean [C] and the co-moment
M = sum_i (p_i - mean)(p_i - mean)^T [C, C], merging each batch's own (n_b, mean_b, M_b) with

    delta = mean_b - mean,    M += M_b + delta delta^T * n n_b / (n + n_b),    mean += delta n_b / (n + n_b)

(Chan, Golub & LeVeque's pairwise update). It equals accumulating sum p, sum p p^T and n, but every
term is centred first, so no large raw sums cancel (all in float64). Accumulators of disjoint row
sets merge with the same rule, so workers may each reduce a share of the data.

Shapes: B rows in a batch, C classes. Pure numpy: no Ray, no I/O.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np


class CovarianceAccumulator:
    """Running count, mean [C] and co-moment [C, C] of probability vectors, batch by batch."""

    def __init__(self, num_classes: int):
        if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
            raise ValueError(f"num_classes must be an integer >= 1, got {num_classes!r}")
        self.num_classes = int(num_classes)
        self.rows = 0
        self.mean = np.zeros(self.num_classes)
        self.comoment = np.zeros((self.num_classes, self.num_classes))

    def update(self, probabilities: np.ndarray) -> CovarianceAccumulator:
        """Add a batch of rows [B, C] (any float dtype; B may be 0). Returns self."""
        batch = np.asarray(probabilities, dtype=np.float64)
        if batch.ndim != 2 or batch.shape[1] != self.num_classes:
            raise ValueError(f"probabilities must have shape [B, {self.num_classes}], got {list(batch.shape)}")
        if len(batch) == 0:
            return self
        mean = batch.mean(axis=0)
        centred = batch - mean
        return self._merge(len(batch), mean, centred.T @ centred)

    def merge(self, other: CovarianceAccumulator) -> CovarianceAccumulator:
        """Fold in an accumulator of other rows (same C). Returns self."""
        if other.num_classes != self.num_classes:
            raise ValueError(f"cannot merge accumulators over {other.num_classes} and {self.num_classes} classes")
        if other.rows:
            self._merge(other.rows, other.mean, other.comoment)
        return self

    def _merge(self, rows: int, mean: np.ndarray, comoment: np.ndarray) -> CovarianceAccumulator:
        total = self.rows + rows
        delta = mean - self.mean
        self.comoment += comoment + np.outer(delta, delta) * (self.rows * rows / total)
        self.mean += delta * (rows / total)
        self.rows = total
        return self

    def covariance(self, ddof: int = 1) -> np.ndarray:
        """The [C, C] covariance, M / (n - ddof) (ddof=1: np.cov's default, unbiased)."""
        if self.rows - ddof <= 0:
            raise ValueError(f"covariance of {self.rows} rows with ddof={ddof} is undefined")
        return self.comoment / (self.rows - ddof)


def class_covariance(probability_batches: Iterable[np.ndarray], num_classes: int, ddof: int = 1) -> np.ndarray:
    """The [C, C] covariance of the rows of every batch [B_i, C], streamed: equals
    np.cov(np.concatenate(batches), rowvar=False, ddof=ddof) without holding the rows together."""
    accumulator = CovarianceAccumulator(num_classes)
    for batch in probability_batches:
        accumulator.update(batch)
    return accumulator.covariance(ddof)
