"""The distillation losses (paper, section 2) as pure functions of logits.

Conventions, pinned by tests/test_losses.py (libraries differ on each; docs/concepts.md):
- The soft term is T^2 * KL(softmax(v / T) || softmax(z / T)), with v the teacher's logits and z the
  student's; the KL is summed over classes and averaged over examples ("batchmean"), never averaged
  over classes too. The T^2 keeps its gradients O(1) as T grows, so `hard_weight` means the same at
  every temperature.
- The hard term is the T = 1 cross-entropy against the true labels, averaged over labelled rows only;
  a label of -1 marks an unlabeled row (a transfer set may be partly or wholly unlabeled).
- A teacher is given as logits. Log-probabilities are logits too, so an ensemble's teacher is the log
  of its members' mean probability (`ensemble_logits`): the paper averages in probability space.

Shapes: B examples, C classes, M ensemble members, k kept logits.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

# Stored log-mass of an empty set of classes (top-k with k == C). Finite so that the cached column
# never holds an infinity; exp(-1e4) is exactly 0 in float32 and float64, so nothing is lost.
MIN_LOG_MASS = -1e4


class DistillationLoss(NamedTuple):
    """The loss to minimise and its two terms (scalars), kept apart for logging."""

    total: torch.Tensor
    soft: torch.Tensor
    hard: torch.Tensor


# ------------------------------------------------------------------------------------ checks
def _check_temperature(temperature: float) -> None:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature must be a number, got {type(temperature).__name__}")
    if not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")


def _check_logits(name: str, logits: torch.Tensor) -> None:
    if not isinstance(logits, torch.Tensor) or not logits.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor")
    if logits.dim() != 2 or logits.shape[0] == 0 or logits.shape[1] == 0:
        raise ValueError(f"{name} must have shape [B, C] with B, C > 0, got {tuple(logits.shape)}")


def _check_labels(labels: torch.Tensor, batch_size: int) -> None:
    if not isinstance(labels, torch.Tensor) or labels.is_floating_point() or labels.dtype == torch.bool:
        raise TypeError("labels must be an integer tensor (class index, or -1 for an unlabeled row)")
    if tuple(labels.shape) != (batch_size,):
        raise ValueError(f"labels must have shape [B] = [{batch_size}], got {tuple(labels.shape)}")


def _working_dtype(logits: torch.Tensor) -> torch.Tensor:
    """`logits` in at least float32: half-precision log-softmax loses the small probabilities."""
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


# ------------------------------------------------------------------------------ temperatures
def tempered_softmax(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """softmax(logits / T) over the last dimension: [..., C] -> [..., C]."""
    _check_temperature(temperature)
    return torch.softmax(logits / temperature, dim=-1)


def tempered_log_softmax(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """log softmax(logits / T) over the last dimension: [..., C] -> [..., C]."""
    _check_temperature(temperature)
    return torch.log_softmax(logits / temperature, dim=-1)


# ------------------------------------------------------------------------------------ losses
def soft_target_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(softmax(v / T) || softmax(z / T)), summed over classes, averaged over examples.

    student_logits z: [B, C]; teacher_logits v: [B, C] (logits or log-probabilities; a class the
    teacher gives probability 0, a -inf logit, contributes 0). Returns a scalar.
    """
    _check_logits("student_logits", student_logits)
    _check_logits("teacher_logits", teacher_logits)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student_logits {tuple(student_logits.shape)} and teacher_logits "
                         f"{tuple(teacher_logits.shape)} must have the same shape [B, C]")
    log_q = tempered_log_softmax(_working_dtype(student_logits), temperature)
    log_p = tempered_log_softmax(teacher_logits.to(log_q.dtype), temperature)
    p = log_p.exp()
    # 0 * log 0 = 0; without the where, a -inf teacher logit would turn the sum into NaN.
    kl = (p * (torch.where(p > 0, log_p, 0.0) - log_q)).sum(dim=-1)
    return temperature**2 * kl.mean()


def hard_target_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy at T = 1, averaged over the rows whose label is >= 0.

    logits: [B, C]; labels: [B] integer, -1 for an unlabeled row (labels must be < C). Returns a
    scalar, 0 when no row is labelled, still attached to `logits` so backward() works on any batch.
    """
    _check_logits("logits", logits)
    _check_labels(labels, logits.shape[0])
    labelled = labels >= 0
    # Clamp so unlabeled rows index a valid class, then drop them: no host sync, unlike a boolean index.
    per_row = F.cross_entropy(_working_dtype(logits), labels.clamp(min=0).long(), reduction="none")
    per_row = torch.where(labelled, per_row, 0.0)
    return per_row.sum() / labelled.sum().clamp(min=1)


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor | None, labels: torch.Tensor,
                      temperature: float, hard_weight: float) -> DistillationLoss:
    """(1 - hard_weight) * soft_target_loss + hard_weight * hard_target_loss.

    student_logits: [B, C]; teacher_logits: [B, C] or None (then the loss is the hard term alone and
    `soft` is 0); labels: [B], -1 for unlabeled rows. hard_weight in [0, 1].
    """
    if isinstance(hard_weight, bool) or not isinstance(hard_weight, (int, float)) or not 0 <= hard_weight <= 1:
        raise ValueError(f"hard_weight must be a number in [0, 1], got {hard_weight!r}")
    _check_temperature(temperature)
    hard = hard_target_loss(student_logits, labels)
    if teacher_logits is None:
        return DistillationLoss(total=hard, soft=torch.zeros_like(hard), hard=hard)
    soft = soft_target_loss(student_logits, teacher_logits, temperature)
    return DistillationLoss(total=(1 - hard_weight) * soft + hard_weight * hard, soft=soft, hard=hard)


# ----------------------------------------------------------------------------------- teachers
def ensemble_logits(member_logits: torch.Tensor) -> torch.Tensor:
    """An ensemble's teacher logits: log of the members' mean T = 1 probability, [M, B, C] -> [B, C].

    Computed as logsumexp_m(log_softmax) - log M, so no probability underflows. The result is a
    normalised log-probability vector per example.
    """
    if not isinstance(member_logits, torch.Tensor) or not member_logits.is_floating_point():
        raise TypeError("member_logits must be a floating-point tensor [M, B, C]")
    if member_logits.dim() != 3 or member_logits.shape[0] == 0:
        raise ValueError(f"member_logits must have shape [M, B, C] with M > 0, got {tuple(member_logits.shape)}")
    log_probs = torch.log_softmax(member_logits, dim=-1)
    return torch.logsumexp(log_probs, dim=0) - math.log(member_logits.shape[0])


# ---------------------------------------------------------------------- top-k compressed teachers
def topk_logits(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Compress teacher logits [B, C] to their k largest entries plus the rest's probability mass.

    Returns (values [B, k], indices [B, k] int64, rest_log_mass [B]). `values` are the T = 1
    log-probabilities (log_softmax, not the raw logits) of the k most probable classes, in
    decreasing order; rest_log_mass is the log of the T = 1 probability of the other C - k classes,
    floored at MIN_LOG_MASS (so it is MIN_LOG_MASS when k == C). `expand_topk_logits` inverts this.
    """
    _check_logits("logits", logits)
    num_classes = logits.shape[1]
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= num_classes:
        raise ValueError(f"k must be an integer in [1, {num_classes}] (the number of classes), got {k!r}")
    log_probs = torch.log_softmax(_working_dtype(logits), dim=-1)
    values, indices = log_probs.topk(k, dim=-1)
    # The rest's mass from its own entries, not 1 - sum(top k): exact even when the rest is tiny.
    rest = log_probs.scatter(-1, indices, float("-inf"))
    rest_log_mass = torch.logsumexp(rest, dim=-1).clamp(min=MIN_LOG_MASS)
    return values, indices.long(), rest_log_mass


def expand_topk_logits(values: torch.Tensor, indices: torch.Tensor, rest_log_mass: torch.Tensor,
                       num_classes: int) -> torch.Tensor:
    """Full teacher logits [B, C] from `topk_logits`' output, as normalised log-probabilities.

    The k kept classes get their log-probabilities exactly; the rest's mass is spread uniformly over
    the other C - k classes. So the T = 1 distribution keeps its top-k entries and its total rest mass
    exactly. At T > 1 it is an approximation: tempering depends on how the rest mass is split among
    those classes, and the uniform split gives the rest slightly more tempered mass than the original.
    """
    if not isinstance(values, torch.Tensor) or values.dim() != 2 or not values.is_floating_point():
        raise ValueError("values must be a floating-point tensor [B, k]")
    if not isinstance(indices, torch.Tensor) or tuple(indices.shape) != tuple(values.shape) \
            or indices.is_floating_point():
        raise ValueError(f"indices must be an integer tensor of the same shape as values {tuple(values.shape)}")
    if not isinstance(rest_log_mass, torch.Tensor) or tuple(rest_log_mass.shape) != (values.shape[0],):
        raise ValueError(f"rest_log_mass must have shape [B] = [{values.shape[0]}]")
    kept = values.shape[1]
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < kept:
        raise ValueError(f"num_classes must be an integer >= k = {kept}, got {num_classes!r}")
    dtype = torch.promote_types(values.dtype, torch.float32)
    # With k == C every entry is overwritten below, so the fill value (and the max(., 1)) is moot.
    fill = rest_log_mass.to(dtype) - math.log(max(num_classes - kept, 1))
    full = fill.unsqueeze(-1).repeat(1, num_classes)
    return full.scatter(-1, indices.long(), values.to(dtype))
