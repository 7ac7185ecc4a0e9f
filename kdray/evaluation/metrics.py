"""Classification metrics as mergeable sufficient statistics, plus the paper's derived figures.

A split is evaluated batch by batch on many workers, so every metric here is a sum that merges
exactly: `ClassificationStats` holds the row and error counts, the summed negative log-likelihood,
the confusion matrix and the calibration bins, and the driver adds the batches' statistics up.
Pure numpy: no Ray, no I/O. Shapes: B rows, C classes, K calibration bins.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

N_BINS = 15  # calibration bins of equal width on the top-class probability (Guo et al. 2017)
UNLABELED = -1


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """[B, C] -> [B, C] log-probabilities in float64; the row max is subtracted first, so large
    logits neither overflow exp nor lose the small classes' log-probabilities."""
    logits = np.asarray(logits, dtype=np.float64)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def negative_log_likelihood(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """[B, C] logits and [B] labels in [0, C) -> [B] float64 values of -log softmax(logits)[label]."""
    log_probs = log_softmax(logits)
    return -log_probs[np.arange(len(labels)), labels]


def calibration_bins(confidence: np.ndarray, correct: np.ndarray, n_bins: int = N_BINS
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Bin [B] top-class probabilities into `n_bins` equal-width bins (k/n, (k+1)/n].

    Returns (counts [K] int64, confidence_sums [K] float64, correct_sums [K] int64).
    """
    index = np.clip(np.ceil(confidence * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
    counts = np.bincount(index, minlength=n_bins).astype(np.int64)
    confidence_sums = np.bincount(index, weights=confidence, minlength=n_bins).astype(np.float64)
    correct_sums = np.bincount(index, weights=correct.astype(np.float64), minlength=n_bins)
    return counts, confidence_sums, np.rint(correct_sums).astype(np.int64)


def expected_calibration_error(counts: np.ndarray, confidence_sums: np.ndarray, correct_sums: np.ndarray) -> float:
    """ECE = sum_k (n_k / N) |accuracy_k - confidence_k| = sum_k |correct_k - confidence_k| / N.

    Inputs are per-bin [K] counts, sums of top-class probability and sums of correct predictions
    (`calibration_bins`). nan when there are no rows.
    """
    total = int(np.sum(counts))
    if total == 0:
        return math.nan
    gaps = np.abs(np.asarray(correct_sums, dtype=np.float64) - np.asarray(confidence_sums, dtype=np.float64))
    return float(gaps.sum() / total)


@dataclass
class ClassificationStats:
    """Sufficient statistics of a classifier on some labelled rows; `merge` adds two disjoint sets.

    confusion: [C, C] int64, rows the true class, columns the predicted one.
    bin_counts, bin_confidence, bin_correct: [K] per calibration bin (see `calibration_bins`).
    """

    rows: int
    errors: int
    nll_sum: float
    confusion: np.ndarray
    bin_counts: np.ndarray
    bin_confidence: np.ndarray
    bin_correct: np.ndarray

    @classmethod
    def empty(cls, num_classes: int, n_bins: int = N_BINS) -> ClassificationStats:
        return cls(0, 0, 0.0, np.zeros((num_classes, num_classes), np.int64), np.zeros(n_bins, np.int64),
                   np.zeros(n_bins, np.float64), np.zeros(n_bins, np.int64))

    @classmethod
    def from_logits(cls, logits: np.ndarray, labels: np.ndarray, n_bins: int = N_BINS) -> ClassificationStats:
        """Statistics of logits [B, C] against labels [B]; rows labelled -1 (unlabeled) are ignored."""
        logits = np.asarray(logits)
        labels = np.asarray(labels)
        if logits.ndim != 2 or logits.shape[1] == 0:
            raise ValueError(f"logits must have shape [B, C] with C > 0, got {list(logits.shape)}")
        if labels.shape != (logits.shape[0],):
            raise ValueError(f"labels must have shape [{logits.shape[0]}] to match logits, got {list(labels.shape)}")
        num_classes = logits.shape[1]
        labels = labels.astype(np.int64)
        if labels.size and (labels.min() < UNLABELED or labels.max() >= num_classes):
            raise ValueError(f"labels must lie in [0, {num_classes}) or be {UNLABELED} (unlabeled), "
                             f"got values in [{labels.min()}, {labels.max()}]")
        keep = labels != UNLABELED
        logits, labels = logits[keep], labels[keep]
        log_probs = log_softmax(logits)
        predicted = log_probs.argmax(axis=1)
        correct = predicted == labels
        confidence = np.exp(log_probs[np.arange(len(labels)), predicted])
        confusion = np.bincount(labels * num_classes + predicted, minlength=num_classes * num_classes)
        counts, confidence_sums, correct_sums = calibration_bins(confidence, correct, n_bins)
        return cls(
            rows=int(len(labels)),
            errors=int((~correct).sum()),
            nll_sum=float(-log_probs[np.arange(len(labels)), labels].sum()),
            confusion=confusion.reshape(num_classes, num_classes).astype(np.int64),
            bin_counts=counts, bin_confidence=confidence_sums, bin_correct=correct_sums,
        )

    @property
    def num_classes(self) -> int:
        return self.confusion.shape[0]

    def merge(self, other: ClassificationStats) -> ClassificationStats:
        """The statistics of both row sets together (they must not share rows)."""
        if other.confusion.shape != self.confusion.shape or other.bin_counts.shape != self.bin_counts.shape:
            raise ValueError(f"cannot merge statistics of {other.num_classes} classes / {len(other.bin_counts)} bins "
                             f"into {self.num_classes} classes / {len(self.bin_counts)} bins")
        return ClassificationStats(
            self.rows + other.rows, self.errors + other.errors, self.nll_sum + other.nll_sum,
            self.confusion + other.confusion, self.bin_counts + other.bin_counts,
            self.bin_confidence + other.bin_confidence, self.bin_correct + other.bin_correct,
        )

    # ------------------------------------------------------------------ figures
    @property
    def error_rate(self) -> float:
        return self.errors / self.rows if self.rows else math.nan

    @property
    def accuracy(self) -> float:
        return 1.0 - self.error_rate

    @property
    def nll(self) -> float:
        return self.nll_sum / self.rows if self.rows else math.nan

    @property
    def ece(self) -> float:
        return expected_calibration_error(self.bin_counts, self.bin_confidence, self.bin_correct)

    def to_dict(self, state: bool = False) -> dict[str, Any]:
        """JSON-ready figures (None where undefined: no labelled rows). With `state`, also the
        sufficient statistics -- confusion matrix (nested lists), calibration bins, nll_sum -- so
        plots can be drawn later and `from_dict` can rebuild the object."""
        value: dict[str, Any] = {
            "rows": self.rows, "errors": self.errors, "accuracy": _finite(self.accuracy),
            "error_rate": _finite(self.error_rate), "nll": _finite(self.nll), "ece": _finite(self.ece),
        }
        if state:
            value["nll_sum"] = self.nll_sum
            value["confusion"] = self.confusion.tolist()
            value["calibration"] = {"counts": self.bin_counts.tolist(), "confidence_sums": self.bin_confidence.tolist(),
                                    "correct_sums": self.bin_correct.tolist()}
        return value

    @classmethod
    def from_dict(cls, value: dict[str, Any]) -> ClassificationStats:
        """Inverse of `to_dict(state=True)`."""
        if "confusion" not in value or "calibration" not in value:
            raise ValueError("from_dict needs the output of to_dict(state=True) (confusion and calibration missing)")
        calibration = value["calibration"]
        return cls(int(value["rows"]), int(value["errors"]), float(value["nll_sum"]),
                   np.asarray(value["confusion"], dtype=np.int64), np.asarray(calibration["counts"], dtype=np.int64),
                   np.asarray(calibration["confidence_sums"], dtype=np.float64),
                   np.asarray(calibration["correct_sums"], dtype=np.int64))


def _finite(value: float) -> float | None:
    return None if math.isnan(value) else float(value)


# ------------------------------------------------------------------------------------ derived figures
def gap_recovered(teacher_error: float, baseline_error: float, student_error: float) -> float:
    """Share of the baseline-to-teacher error gap the distilled student closes:
    (baseline - student) / (baseline - teacher). Errors are counts or rates on one test set.
    The paper's MNIST figures, 146 -> 74 errors with a 67-error teacher, give 72 / 79 = 0.91.
    nan unless the teacher beats the baseline: with no gap (or a reversed one) the ratio means nothing."""
    gap = baseline_error - teacher_error
    return math.nan if gap <= 0 else (baseline_error - student_error) / gap


def defined_or_none(value: float) -> float | None:
    """A figure for results files: None where a ratio above is undefined (nan)."""
    return None if math.isnan(value) else value


def gain_kept(base_acc: float, improved_acc: float, distilled_acc: float) -> float:
    """Share of an improvement's accuracy gain over a base model that a single distilled model keeps:
    (distilled - base) / (improved - base). For an ensemble, base is its average member; for
    generalist + specialists, the generalist. nan unless the improvement gains: with no gain (or a
    loss) the ratio means nothing."""
    gain = improved_acc - base_acc
    return math.nan if gain <= 0 else (distilled_acc - base_acc) / gain
