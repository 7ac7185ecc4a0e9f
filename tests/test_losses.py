"""Tests for kdray.distill.losses: hand-computed values, the paper's limits, and the conventions it pins."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kdray.distill.losses import (
    MIN_LOG_MASS,
    DistillationLoss,
    distillation_loss,
    ensemble_logits,
    expand_topk_logits,
    hard_target_loss,
    soft_target_loss,
    tempered_log_softmax,
    tempered_softmax,
    topk_logits,
)

F64 = torch.float64


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def _zero_mean(shape: tuple[int, ...]) -> torch.Tensor:
    logits = torch.randn(shape, dtype=F64)
    return logits - logits.mean(dim=-1, keepdim=True)


def _kl(p: list[float], q: list[float]) -> float:
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q) if pi > 0)


# ------------------------------------------------------------------------------ temperatures
def test_tempered_softmax_matches_hand_values() -> None:
    logits = torch.tensor([[0.0, math.log(2.0)]], dtype=F64)
    assert torch.allclose(tempered_softmax(logits, 1.0), torch.tensor([[1 / 3, 2 / 3]], dtype=F64))
    # At T = 2 the odds are 2^(1/2) : 1.
    root2 = math.sqrt(2.0)
    expected = torch.tensor([[1 / (1 + root2), root2 / (1 + root2)]], dtype=F64)
    assert torch.allclose(tempered_softmax(logits, 2.0), expected)
    assert torch.allclose(tempered_log_softmax(logits, 2.0), expected.log())


@pytest.mark.parametrize("temperature", [0.0, -1.0, math.inf, math.nan])
def test_invalid_temperature_raises(temperature: float) -> None:
    logits = torch.zeros(1, 2)
    with pytest.raises(ValueError, match="temperature"):
        tempered_softmax(logits, temperature)
    with pytest.raises(ValueError, match="temperature"):
        soft_target_loss(logits, logits, temperature)
    with pytest.raises(ValueError, match="temperature"):
        distillation_loss(logits, logits, torch.tensor([0]), temperature, 0.5)


# --------------------------------------------------------------------------------- soft loss
def test_soft_loss_one_example_by_hand() -> None:
    student = torch.tensor([[0.0, 0.0]], dtype=F64)  # q = (1/2, 1/2) at any T
    teacher = torch.tensor([[0.0, 2 * math.log(3.0)]], dtype=F64)  # at T = 2: odds 3 : 1, p = (1/4, 3/4)
    expected = 4 * _kl([0.25, 0.75], [0.5, 0.5])
    assert soft_target_loss(student, teacher, 2.0).item() == pytest.approx(expected, rel=1e-12)


def test_soft_loss_is_zero_when_student_equals_teacher() -> None:
    logits = torch.randn(4, 7, dtype=F64)
    assert soft_target_loss(logits, logits, 3.0).item() == pytest.approx(0.0, abs=1e-12)
    # A constant shift of the logits is the same distribution (teacher given as log-probabilities).
    assert soft_target_loss(logits, logits.log_softmax(-1), 3.0).item() == pytest.approx(0.0, abs=1e-12)


def test_soft_loss_is_batchmean_not_elementwise_mean() -> None:
    student = torch.tensor([[0.0, 0.0]], dtype=F64)
    teacher = torch.tensor([[0.0, math.log(3.0)]], dtype=F64)
    one_row = soft_target_loss(student, teacher, 1.0)
    two_rows = soft_target_loss(student.repeat(2, 1), teacher.repeat(2, 1), 1.0)
    kl = _kl([0.25, 0.75], [0.5, 0.5])
    assert one_row.item() == pytest.approx(kl, rel=1e-12)
    assert two_rows.item() == pytest.approx(kl, rel=1e-12)
    # The per-element-mean convention divides by B * C instead of B: half the value with C = 2.
    p, q = teacher.repeat(2, 1).softmax(-1), student.repeat(2, 1).softmax(-1)
    elementwise = (p * (p / q).log()).mean()
    assert elementwise.item() == pytest.approx(kl / 2, rel=1e-12)
    assert two_rows.item() != pytest.approx(elementwise.item(), rel=1e-3)


def test_soft_loss_handles_zero_teacher_probability() -> None:
    student = torch.tensor([[0.0, 0.0, 0.0]], dtype=F64)
    teacher = torch.tensor([[0.0, 0.0, -math.inf]], dtype=F64)
    expected = _kl([0.5, 0.5, 0.0], [1 / 3, 1 / 3, 1 / 3])
    assert soft_target_loss(student, teacher, 1.0).item() == pytest.approx(expected, rel=1e-12)


def _soft_grad(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    student = student.clone().requires_grad_(True)
    soft_target_loss(student, teacher, temperature).backward()
    return student.grad


def test_t_squared_keeps_gradient_scale_as_t_grows() -> None:
    student, teacher = _zero_mean((8, 10)), _zero_mean((8, 10))
    norm5 = _soft_grad(student, teacher, 5.0).norm().item()
    norm50 = _soft_grad(student, teacher, 50.0).norm().item()
    # Without the T^2 factor the ratio would be about (50 / 5)^2 = 100.
    assert 0.8 < norm5 / norm50 < 1.25


@pytest.mark.parametrize("temperature", [100.0, 300.0, 1000.0])
def test_high_temperature_limit_is_logit_matching(temperature: float) -> None:
    """Paper, section 2.1: dKL/dz_i -> (z_i - v_i) / (N T^2) for zero-mean logits."""
    num_classes = 10
    student, teacher = _zero_mean((1, num_classes)), _zero_mean((1, num_classes))
    # soft_target_loss includes T^2 and B = 1, so the raw KL's gradient is its gradient / T^2.
    grad = _soft_grad(student, teacher, temperature) / temperature**2
    limit = (student - teacher) / (num_classes * temperature**2)
    relative_error = ((grad - limit).norm() / limit.norm()).item()
    assert relative_error < 1e-2
    # The deviation is the next order in 1/T, so it must also shrink as T grows.
    assert relative_error < 3.0 / temperature


# --------------------------------------------------------------------------------- hard loss
def test_hard_loss_ignores_unlabeled_rows() -> None:
    logits = torch.randn(4, 5, dtype=F64)
    labels = torch.tensor([2, -1, 0, -1])
    expected = F.cross_entropy(logits[[0, 2]], labels[[0, 2]])
    assert hard_target_loss(logits, labels).item() == pytest.approx(expected.item(), rel=1e-12)
    # The unlabeled rows' logits get no gradient.
    logits.requires_grad_(True)
    hard_target_loss(logits, labels).backward()
    assert torch.equal(logits.grad[[1, 3]], torch.zeros(2, 5, dtype=F64))


def test_hard_loss_with_no_label_is_zero_and_differentiable() -> None:
    logits = torch.randn(3, 4, requires_grad=True)
    loss = hard_target_loss(logits, torch.full((3,), -1))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros(3, 4))


def test_hard_loss_rejects_bad_labels() -> None:
    with pytest.raises(ValueError, match="labels"):
        hard_target_loss(torch.zeros(3, 4), torch.zeros(2, dtype=torch.long))
    with pytest.raises(TypeError, match="labels"):
        hard_target_loss(torch.zeros(3, 4), torch.zeros(3))


# ------------------------------------------------------------------------- distillation loss
@pytest.mark.parametrize("hard_weight", [0.0, 0.3, 1.0])
def test_distillation_loss_weights_the_two_terms(hard_weight: float) -> None:
    student, teacher = torch.randn(6, 5, dtype=F64), torch.randn(6, 5, dtype=F64)
    labels = torch.tensor([0, 1, -1, 4, 2, -1])
    soft = soft_target_loss(student, teacher, 4.0).item()
    hard = hard_target_loss(student, labels).item()
    terms = distillation_loss(student, teacher, labels, 4.0, hard_weight)
    assert isinstance(terms, DistillationLoss)
    assert terms.soft.item() == pytest.approx(soft, rel=1e-12)
    assert terms.hard.item() == pytest.approx(hard, rel=1e-12)
    assert terms.total.item() == pytest.approx((1 - hard_weight) * soft + hard_weight * hard, rel=1e-12)
    assert soft != pytest.approx(hard, rel=1e-2)  # else the weights would be untested


def test_distillation_loss_without_teacher_is_the_hard_loss() -> None:
    student, labels = torch.randn(4, 3, dtype=F64), torch.tensor([0, 2, 1, -1])
    terms = distillation_loss(student, None, labels, 4.0, 0.3)
    assert terms.total.item() == pytest.approx(hard_target_loss(student, labels).item(), rel=1e-12)
    assert terms.soft.item() == 0.0


@pytest.mark.parametrize("hard_weight", [-0.1, 1.5, math.nan])
def test_distillation_loss_rejects_bad_hard_weight(hard_weight: float) -> None:
    logits = torch.zeros(1, 2)
    with pytest.raises(ValueError, match="hard_weight"):
        distillation_loss(logits, logits, torch.tensor([0]), 2.0, hard_weight)


def test_soft_loss_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="same shape"):
        soft_target_loss(torch.zeros(2, 3), torch.zeros(2, 4), 2.0)


# -------------------------------------------------------------------------------- ensembles
def test_ensemble_of_identical_members_is_their_log_softmax() -> None:
    member = torch.randn(3, 6, dtype=F64)
    combined = ensemble_logits(member.expand(4, 3, 6))
    assert torch.allclose(combined, member.log_softmax(-1), atol=1e-12)


def test_ensemble_averages_in_probability_space() -> None:
    members = torch.tensor([[[0.0, 0.0]], [[0.0, math.log(3.0)]]], dtype=F64)  # (1/2, 1/2) and (1/4, 3/4)
    expected = torch.tensor([[math.log(3 / 8), math.log(5 / 8)]], dtype=F64)
    assert torch.allclose(ensemble_logits(members), expected, atol=1e-12)


def test_ensemble_is_stable_for_huge_logits() -> None:
    members = torch.tensor([[[0.0, 1000.0]], [[1000.0, 0.0]]])
    assert torch.allclose(ensemble_logits(members), torch.full((1, 2), math.log(0.5)))


# ------------------------------------------------------------------------------------ top-k
def test_topk_round_trip_keeps_topk_and_rest_mass() -> None:
    logits, k = torch.randn(5, 12, dtype=F64) * 3, 4
    values, indices, rest = topk_logits(logits, k)
    assert values.shape == indices.shape == (5, k) and rest.shape == (5,) and indices.dtype == torch.int64
    expanded = expand_topk_logits(values, indices, rest, 12)
    original = logits.softmax(-1)
    approx = expanded.exp()
    assert torch.allclose(approx.sum(-1), torch.ones(5, dtype=F64), atol=1e-12)
    assert torch.allclose(approx.gather(-1, indices), original.gather(-1, indices), atol=1e-12)
    top_mass = original.topk(k, dim=-1).values.sum(-1)
    assert torch.allclose(rest.exp(), 1 - top_mass, atol=1e-12)
    kept = torch.zeros_like(original, dtype=torch.bool).scatter(-1, indices, True)
    assert torch.allclose((approx * ~kept).sum(-1), 1 - top_mass, atol=1e-12)
    # The rest mass is spread evenly over the C - k other classes.
    assert torch.allclose(approx[~kept].view(5, 8), ((1 - top_mass) / 8).unsqueeze(-1).expand(5, 8))


def test_topk_with_all_classes_reproduces_log_softmax() -> None:
    logits = torch.randn(3, 6, dtype=F64)
    values, indices, rest = topk_logits(logits, 6)
    assert torch.equal(rest, torch.full((3,), MIN_LOG_MASS, dtype=F64))
    assert torch.allclose(expand_topk_logits(values, indices, rest, 6), logits.log_softmax(-1), atol=1e-12)


def test_topk_is_exact_at_t1_and_approximate_above() -> None:
    logits = torch.tensor([[4.0, 0.0, -2.0, -6.0]], dtype=F64)
    expanded = expand_topk_logits(*topk_logits(logits, 2), 4)
    assert soft_target_loss(expanded, logits, 1.0).item() > 0  # rest split differs, so KL > 0 ...
    # ... but the tempered top-k probabilities only match at T = 1: the uniform split of the rest
    # gives it more mass once tempered (x^(1/T) is concave).
    at_t1 = (tempered_softmax(expanded, 1.0), tempered_softmax(logits, 1.0))
    at_t4 = (tempered_softmax(expanded, 4.0), tempered_softmax(logits, 4.0))
    assert torch.allclose(at_t1[0][:, :2], at_t1[1][:, :2], atol=1e-12)
    assert (at_t4[0][:, 2:].sum() > at_t4[1][:, 2:].sum()).item()


def test_topk_rejects_bad_k() -> None:
    with pytest.raises(ValueError, match="k must be"):
        topk_logits(torch.zeros(2, 3), 4)
    with pytest.raises(ValueError, match="k must be"):
        topk_logits(torch.zeros(2, 3), 0)
    with pytest.raises(ValueError, match="num_classes"):
        expand_topk_logits(torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.long), torch.zeros(2), 2)
