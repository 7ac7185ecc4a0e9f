"""kdray.evaluation.metrics against hand-computed values (no Ray)."""

import math

import numpy as np
import pytest

from kdray.evaluation.metrics import (
    ClassificationStats,
    calibration_bins,
    expected_calibration_error,
    gain_kept,
    gap_recovered,
    log_softmax,
)

# Rows given as probabilities so every figure is computable by hand; logits = log(probabilities).
PROBS = np.array([
    [0.70, 0.20, 0.10],  # label 0: correct, confidence 0.70 -> bin 10 = (10/15, 11/15]
    [0.10, 0.55, 0.35],  # label 2: predicts 1, confidence 0.55 -> bin 8
    [0.30, 0.25, 0.45],  # label 2: correct, confidence 0.45 -> bin 6
    [0.72, 0.18, 0.10],  # label 1: predicts 0, confidence 0.72 -> bin 10 (with row 0)
    [0.20, 0.20, 0.60],  # unlabeled: ignored everywhere
])
LABELS = np.array([0, 2, 2, 1, -1])


def tiny_stats() -> ClassificationStats:
    return ClassificationStats.from_logits(np.log(PROBS), LABELS)


def test_accuracy_nll_and_ece_match_hand_computation():
    stats = tiny_stats()
    assert (stats.rows, stats.errors) == (4, 2)
    assert stats.accuracy == 0.5
    assert stats.nll == pytest.approx(-(math.log(0.70) + math.log(0.35) + math.log(0.45) + math.log(0.18)) / 4)
    # Bin 10: 2 rows, confidence 1.42, 1 correct; bins 8 and 6: gaps 0.55 and 0.55.
    assert stats.ece == pytest.approx((0.42 + 0.55 + 0.55) / 4)
    assert stats.bin_counts.tolist() == [0] * 6 + [1, 0, 1, 0, 2] + [0] * 4
    assert stats.bin_correct[10] == 1 and stats.bin_confidence[10] == pytest.approx(1.42)


def test_confusion_rows_are_true_classes_and_columns_predictions():
    expected = np.array([[1, 0, 0],
                         [1, 0, 0],
                         [0, 1, 1]])
    np.testing.assert_array_equal(tiny_stats().confusion, expected)
    assert tiny_stats().confusion.dtype == np.int64


def test_merging_two_halves_equals_the_whole():
    rng = np.random.default_rng(0)
    logits = rng.normal(scale=3.0, size=(101, 7))
    labels = rng.integers(-1, 7, size=101)
    whole = ClassificationStats.from_logits(logits, labels)
    merged = ClassificationStats.from_logits(logits[:40], labels[:40]).merge(
        ClassificationStats.from_logits(logits[40:], labels[40:]))
    assert (merged.rows, merged.errors) == (whole.rows, whole.errors)
    assert whole.rows == (labels >= 0).sum()
    np.testing.assert_array_equal(merged.confusion, whole.confusion)
    np.testing.assert_array_equal(merged.bin_counts, whole.bin_counts)
    np.testing.assert_array_equal(merged.bin_correct, whole.bin_correct)
    np.testing.assert_allclose(merged.bin_confidence, whole.bin_confidence, rtol=1e-12)
    assert merged.nll == pytest.approx(whole.nll, rel=1e-12)
    assert merged.ece == pytest.approx(whole.ece, rel=1e-12)
    assert merged.confusion.sum() == whole.rows


def test_empty_stats_are_the_merge_identity_and_report_none():
    stats = tiny_stats()
    merged = ClassificationStats.empty(3).merge(stats)
    assert merged.to_dict(state=True) == stats.to_dict(state=True)
    figures = ClassificationStats.empty(3).to_dict()
    assert figures["rows"] == 0 and figures["error_rate"] is None and figures["ece"] is None


def test_merge_rejects_a_different_number_of_classes():
    with pytest.raises(ValueError, match="3 classes"):
        tiny_stats().merge(ClassificationStats.empty(4))


def test_to_dict_round_trips_with_state_and_omits_the_confusion_without():
    stats = tiny_stats()
    assert "confusion" not in stats.to_dict()
    value = stats.to_dict(state=True)
    assert value["confusion"] == [[1, 0, 0], [1, 0, 0], [0, 1, 1]]
    assert ClassificationStats.from_dict(value).to_dict(state=True) == value
    with pytest.raises(ValueError, match="state=True"):
        ClassificationStats.from_dict(stats.to_dict())


def test_nll_is_stable_for_huge_logits():
    logits = np.array([[1000.0, -1000.0, 0.0], [-1000.0, 1000.0, 0.0]])
    stats = ClassificationStats.from_logits(logits, np.array([0, 0]))
    assert stats.nll == pytest.approx(1000.0)  # row 0 costs 0, row 1 costs 2000
    assert np.isfinite(log_softmax(logits)).all()


def test_labels_out_of_range_are_rejected():
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        ClassificationStats.from_logits(np.zeros((2, 3)), np.array([0, 3]))
    with pytest.raises(ValueError, match="labels must have shape"):
        ClassificationStats.from_logits(np.zeros((2, 3)), np.array([0, 1, 2]))


def test_expected_calibration_error_from_bins():
    counts, confidence_sums, correct_sums = calibration_bins(np.array([0.95, 0.95, 0.5]), np.array([True, False, True]), 10)
    assert counts.tolist() == [0, 0, 0, 0, 1, 0, 0, 0, 0, 2]  # 0.5 lies in (0.4, 0.5]
    assert expected_calibration_error(counts, confidence_sums, correct_sums) == pytest.approx((0.9 + 0.5) / 3)
    assert math.isnan(expected_calibration_error(np.zeros(3), np.zeros(3), np.zeros(3)))


def test_gap_recovered_on_the_papers_mnist_numbers():
    # Paper, section 3: baseline 146 test errors, teacher 67, distilled student 74.
    assert gap_recovered(teacher_error=67, baseline_error=146, student_error=74) == pytest.approx(72 / 79)
    assert gap_recovered(67, 146, 67) == 1.0 and gap_recovered(67, 146, 146) == 0.0
    assert math.isnan(gap_recovered(100, 100, 90))
    assert math.isnan(gap_recovered(teacher_error=120, baseline_error=71, student_error=116))  # reversed gap


def test_gain_kept():
    assert gain_kept(base_acc=0.90, improved_acc=0.94, distilled_acc=0.93) == pytest.approx(0.75)
    assert math.isnan(gain_kept(0.9, 0.9, 0.95))
    assert math.isnan(gain_kept(0.9, 0.85, 0.95))  # an ensemble worse than its members
