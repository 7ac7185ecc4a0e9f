"""Combining a generalist with its specialists at inference (paper, section 5.3), as pure functions.

For each example, q is the full distribution minimising

    KL(p_g || q) + sum_{m active} KL(p_m || Q_m(q)),

with p_g the generalist's distribution, p_m specialist m's distribution over its subset S_m plus one
dustbin class, and Q_m(q) the same coarsening of q: q on S_m, and q's mass outside S_m as the dustbin.

Why EM solves it exactly. Dropping the entropies of p_g and p_m (constants in q), the objective is

    -sum_c a_c log q_c - sum_{m active} d_m log q(not S_m),
    a_c = p_g[c] + sum_{m active, c in S_m} p_m[c],   d_m = p_m's dustbin probability,

the negative log-likelihood of a multinomial q given a_c "observations" of each class c and d_m
observations known only to lie outside S_m (coarsened data). It is convex in q on the simplex, and
EM decreases it monotonically: the E-step spreads each d_m over the classes outside S_m in
proportion to q, the M-step renormalises the counts, so

    q_new[c] = (a_c + sum_{m active, c not in S_m} d_m q[c] / q(not S_m)) / (1 + #active).

The paper instead parametrises q = softmax(z) and runs gradient descent on z (`combine_by_gradient`,
kept as the reference); EM needs no step size and each iteration is two [B, C] x [C, M] matmuls.
With one active specialist (the paper's top_n = 1 over disjoint subsets) EM's fixed point has a
closed form (`combine_one_active`); `combine` uses it for those rows and EM for the rest.

Inputs are dense and batched so variable-size subsets vectorise. Shapes: B examples, C classes,
M specialists.
- generalist_probs p_g: [B, C], rows summing to 1.
- specialist_in: [B, M, C], p_m's probability of each class of S_m, 0 outside S_m.
- specialist_dustbin: [B, M], p_m's dustbin probability (specialist_in[b, m].sum() + dustbin = 1).
- membership: [M, C] bool, True iff class c is in S_m.
- active: [B, M] bool, which specialists take part for each example.
A specialist whose subset is every class must have dustbin probability 0 (else no q has finite
objective); the functions do not check values, only shapes and dtypes.

The dense inputs cost B x M x C numbers, mostly zeros: at the paper's shape (2,048 rows, 61
specialists, 15,000 classes) 15 GB in float64. `combine_active` solves the same problem from the
active specialists' outputs alone, packed by `pack_specialist_outputs` into `ActiveSpecialistOutputs`
(one entry per class of each active (row, specialist) pair's subset), in O(B C + N) memory and time
per EM iteration, N the sum of the active subsets' sizes. Its E-step needs no [M, C] mask: the sum
of d_m / q(not S_m) over the active m whose S_m lacks c is the row's sum over every active m less
the terms of the subsets holding c, a scatter over the packed entries.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


def membership_matrix(subsets: Sequence[Sequence[int] | torch.Tensor], num_classes: int,
                      device: torch.device | str | None = None) -> torch.Tensor:
    """[M, C] bool: True iff class c is in subset m."""
    membership = torch.zeros(len(subsets), num_classes, dtype=torch.bool, device=device)
    for m, classes in enumerate(subsets):
        index = classes if isinstance(classes, torch.Tensor) else torch.tensor(list(classes), dtype=torch.int64)
        membership[m, index.to(membership.device)] = True
    return membership


# ------------------------------------------------------------------------------------ checks
def _check_probs(name: str, tensor: torch.Tensor, shape: tuple[int, ...]) -> None:
    if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor of shape {list(shape)}")
    if tuple(tensor.shape) != shape:
        raise ValueError(f"{name} must have shape {list(shape)}, got {list(tensor.shape)}")


def _check_mask(name: str, tensor: torch.Tensor, shape: tuple[int, ...]) -> None:
    if not isinstance(tensor, torch.Tensor) or tensor.dtype != torch.bool:
        raise TypeError(f"{name} must be a bool tensor of shape {list(shape)}")
    if tuple(tensor.shape) != shape:
        raise ValueError(f"{name} must have shape {list(shape)}, got {list(tensor.shape)}")


def _check_generalist_probs(generalist_probs: torch.Tensor) -> tuple[int, int]:
    """(B, C) after checking p_g [B, C]."""
    if not isinstance(generalist_probs, torch.Tensor) or generalist_probs.dim() != 2:
        raise ValueError("generalist_probs must be a tensor of shape [B, C]")
    batch, num_classes = generalist_probs.shape
    if batch == 0 or num_classes == 0:
        raise ValueError(f"generalist_probs must have B, C > 0, got shape {list(generalist_probs.shape)}")
    _check_probs("generalist_probs", generalist_probs, (batch, num_classes))
    return batch, num_classes


def _check_generalist(generalist_probs: torch.Tensor, membership: torch.Tensor) -> tuple[int, int, int]:
    """(B, C, M) after checking p_g [B, C] and membership [M, C]."""
    _, num_classes = _check_generalist_probs(generalist_probs)
    if not isinstance(membership, torch.Tensor) or membership.dim() != 2:
        raise ValueError("membership must be a bool tensor of shape [M, C]")
    _check_mask("membership", membership, (membership.shape[0], num_classes))
    return *generalist_probs.shape, membership.shape[0]


def _check_index(name: str, tensor: torch.Tensor, length: int | None = None) -> None:
    if not isinstance(tensor, torch.Tensor) or tensor.dtype != torch.int64:
        raise TypeError(f"{name} must be a one-dimensional int64 tensor")
    if tensor.dim() != 1 or (length is not None and len(tensor) != length):
        expected = "one-dimensional" if length is None else f"of shape [{length}]"
        raise ValueError(f"{name} must be {expected}, got shape {list(tensor.shape)}")


def _check_inputs(generalist_probs, specialist_in, specialist_dustbin, membership, active) -> None:
    batch, num_classes, num_specialists = _check_generalist(generalist_probs, membership)
    _check_probs("specialist_in", specialist_in, (batch, num_specialists, num_classes))
    _check_probs("specialist_dustbin", specialist_dustbin, (batch, num_specialists))
    _check_mask("active", active, (batch, num_specialists))


def _check_count(name: str, value: int, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


# ---------------------------------------------------------------------------------- pieces
def _check_em_options(max_iterations: int, tolerance: float) -> None:
    _check_count("max_iterations", max_iterations, 1)
    if not isinstance(tolerance, (int, float)) or not tolerance >= 0:
        raise ValueError(f"tolerance must be a number >= 0, got {tolerance!r}")


def _working_dtype(tensor: torch.Tensor) -> torch.dtype:
    # float16 cannot hold the small masses q(not S_m) that the E-step divides by.
    return torch.promote_types(tensor.dtype, torch.float32)


def _sufficient_statistics(generalist_probs, specialist_in, specialist_dustbin, membership, active):
    """(a [B, C], d [B, M], complement [M, C] float): class counts, coarsened counts, not-S_m masks."""
    dtype = _working_dtype(generalist_probs)
    weight = active.to(dtype)
    # Masking by membership too, so a stray value outside S_m cannot leak into q.
    inside = specialist_in.to(dtype) * membership.to(dtype)
    a = generalist_probs.to(dtype) + torch.einsum("bm,bmc->bc", weight, inside)
    d = specialist_dustbin.to(dtype) * weight
    return a, d, (~membership).to(dtype)


def _outside_mass(q: torch.Tensor, complement: torch.Tensor) -> torch.Tensor:
    """q(not S_m) for every specialist: [B, C] x [M, C] -> [B, M]."""
    return q @ complement.T


def _safe_log(x: torch.Tensor) -> torch.Tensor:
    # log 0 = -inf would give 0 * -inf = NaN where its coefficient is 0; the floor keeps it at 0.
    return x.clamp(min=torch.finfo(x.dtype).tiny).log()


# -------------------------------------------------------------------------------- activation
def select_active_specialists(generalist_probs: torch.Tensor, membership: torch.Tensor, top_n: int = 1) -> torch.Tensor:
    """Which specialists take part for each example: [B, C], [M, C] -> active [B, M] bool.

    Specialist m is active iff S_m contains one of the generalist's top_n classes (paper: top_n = 1).
    """
    _, num_classes, _ = _check_generalist(generalist_probs, membership)
    if isinstance(top_n, bool) or not isinstance(top_n, int) or not 1 <= top_n <= num_classes:
        raise ValueError(f"top_n must be an integer in [1, {num_classes}] (the number of classes), got {top_n!r}")
    top = generalist_probs.topk(top_n, dim=-1).indices
    hits = torch.zeros_like(generalist_probs).scatter(-1, top, 1.0)
    return (hits @ membership.to(hits.dtype).T) > 0


# --------------------------------------------------------------------------------- objective
def combine_objective(q: torch.Tensor, generalist_probs: torch.Tensor, specialist_in: torch.Tensor,
                      specialist_dustbin: torch.Tensor, membership: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
    """KL(p_g || q) + sum_{m active} KL(p_m || Q_m(q)) for each example: q [B, C] -> [B].

    The exact sum of KLs (0 log 0 = 0), except that q's masses are floored at the smallest normal
    float, so a q with a zero where p > 0 scores about 700 per unit of p instead of +inf.
    """
    _check_inputs(generalist_probs, specialist_in, specialist_dustbin, membership, active)
    _check_probs("q", q, tuple(generalist_probs.shape))
    a, d, complement = _sufficient_statistics(generalist_probs, specialist_in, specialist_dustbin, membership, active)
    q = q.to(a.dtype)
    cross_entropy = -(a * _safe_log(q)).sum(-1) - (d * _safe_log(_outside_mass(q, complement))).sum(-1)
    p_g = generalist_probs.to(a.dtype)
    inside = specialist_in.to(a.dtype) * membership.to(a.dtype)
    negative_entropy = torch.xlogy(p_g, p_g).sum(-1) \
        + (active.to(a.dtype) * (torch.xlogy(inside, inside).sum(-1) + torch.xlogy(d, d))).sum(-1)
    return cross_entropy + negative_entropy


# ----------------------------------------------------------------------------------- solvers
def combine_by_em(generalist_probs: torch.Tensor, specialist_in: torch.Tensor, specialist_dustbin: torch.Tensor,
                  membership: torch.Tensor, active: torch.Tensor, max_iterations: int = 1000,
                  tolerance: float = 1e-6) -> torch.Tensor:
    """The optimal q [B, C] by EM on the coarsened-multinomial likelihood (see the module docstring).

    Stops after max_iterations, or once no entry of q moves by more than `tolerance` in an iteration
    (float32 inputs are solved in float32, where a tolerance much below 1e-6 may never be met, so
    pass float64 for tighter answers). Rows without an active specialist return generalist_probs
    exactly. EM converges linearly, slower when the active specialists put much mass in their dustbins.
    """
    _check_inputs(generalist_probs, specialist_in, specialist_dustbin, membership, active)
    _check_em_options(max_iterations, tolerance)
    statistics = _sufficient_statistics(generalist_probs, specialist_in, specialist_dustbin, membership, active)
    return _where_active(_em(*statistics, max_iterations, tolerance), generalist_probs, active)


def _em(a: torch.Tensor, d: torch.Tensor, complement: torch.Tensor, max_iterations: int,
        tolerance: float) -> torch.Tensor:
    """EM on the sufficient statistics (see combine_by_em): q [B, C] in their working dtype."""
    tiny = torch.finfo(a.dtype).tiny
    sizes = complement.sum(-1).clamp(min=1)

    def spread_factor(q: torch.Tensor) -> torch.Tensor:
        return (d / _outside_mass(q, complement).clamp(min=tiny)) @ complement

    return _iterate_em(a, (d / sizes) @ complement, spread_factor, max_iterations, tolerance)


def _iterate_em(a: torch.Tensor, uniform_spread: torch.Tensor, spread_factor, max_iterations: int,
                tolerance: float) -> torch.Tensor:
    """The EM iterations on class counts a [B, C]: `uniform_spread` [B, C] is each d_m shared evenly
    over the classes outside S_m, spread_factor(q) a new [B, C] tensor of sum_{m active, c not in S_m}
    d_m / q(not S_m)."""
    # Start from the E-step of a uniform q: positive wherever the optimum can put mass (EM never
    # revives a class it starts at 0), even where p_g has underflowed to exact zeros.
    q = _normalise_(a + uniform_spread)
    for _ in range(max_iterations):
        # E-step: d_m is shared over the classes outside S_m in proportion to q. In place: at the
        # paper's C a fresh [B, C] tensor costs more in page faults than its arithmetic.
        q_new = _normalise_(spread_factor(q).mul_(q).add_(a))
        converged = q.sub_(q_new).abs_().max() <= tolerance  # q is spent: its buffer takes the step
        q = q_new
        if converged:
            break
    return q


def _where_active(q: torch.Tensor, generalist_probs: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
    """q in the inputs' dtype on rows with an active specialist, generalist_probs exactly elsewhere."""
    return torch.where(active.any(-1, keepdim=True), q.to(generalist_probs.dtype), generalist_probs)


def _normalise_(counts: torch.Tensor) -> torch.Tensor:
    """Counts [B, C] -> distribution, in place. The exact total is 1 + #active, but dividing by the
    sum also absorbs the mass an E-step drops when q(not S_m) underflows."""
    return counts.div_(counts.sum(-1, keepdim=True))


def combine_by_gradient(generalist_probs: torch.Tensor, specialist_in: torch.Tensor, specialist_dustbin: torch.Tensor,
                        membership: torch.Tensor, active: torch.Tensor, steps: int = 200) -> torch.Tensor:
    """The paper's method: q = softmax(z), z from log p_g, minimised by L-BFGS for `steps` iterations.

    Returns q [B, C]. The reference for `combine_by_em`; slower and only as exact as `steps` allows.
    """
    _check_inputs(generalist_probs, specialist_in, specialist_dustbin, membership, active)
    _check_count("steps", steps, 1)
    inputs = [t.detach() for t in (generalist_probs, specialist_in, specialist_dustbin)]
    a, d, complement = _sufficient_statistics(*inputs, membership, active)
    z = _safe_log(inputs[0].to(a.dtype)).requires_grad_(True)
    # The examples are independent, so one L-BFGS on their summed objective solves each of them.
    optimizer = torch.optim.LBFGS([z], lr=1.0, max_iter=steps, tolerance_grad=1e-12, tolerance_change=1e-15,
                                  history_size=20, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        q = torch.softmax(z, dim=-1)
        # The cross-entropy part of combine_objective: the entropies do not depend on z.
        loss = -(a * torch.log_softmax(z, dim=-1)).sum() - (d * _safe_log(_outside_mass(q, complement))).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return _where_active(torch.softmax(z.detach(), dim=-1), generalist_probs, active)


def combine_one_active(generalist_probs: torch.Tensor, specialist_in: torch.Tensor, specialist_dustbin: torch.Tensor,
                       membership: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
    """The optimal q [B, C] in closed form, for rows with at most one active specialist.

    With one specialist m (subset S, dustbin d) there are 2 units of data: q = a / 2 on S, and the
    mass outside S, (A_out + d) / 2 with A_out = p_g(not S), spread in proportion to p_g there (the
    fixed point of the EM update). If p_g puts no mass outside S, every spread of it is optimal: it
    is spread evenly, as EM from its uniform start would. Rows without an active specialist return
    generalist_probs exactly; rows with more than one active specialist get a wrong answer (use
    `combine`, which sends them to EM).
    """
    _check_inputs(generalist_probs, specialist_in, specialist_dustbin, membership, active)
    statistics = _sufficient_statistics(generalist_probs, specialist_in, specialist_dustbin, membership, active)
    return _where_active(_one_active(*statistics, active), generalist_probs, active)


def _one_active(a: torch.Tensor, d: torch.Tensor, complement: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
    """The closed form on the sufficient statistics (see combine_one_active), in their working dtype."""
    chosen = active.to(torch.int8).argmax(-1)  # the active specialist (0 where none: masked by the caller)
    # d gathered is [B, 1], 0 where no specialist is active; complement[chosen] is 1 outside the chosen S.
    return _closed_form(a, d.gather(1, chosen[:, None]), complement[chosen].bool())


def _closed_form(a: torch.Tensor, dustbin: torch.Tensor, outside: torch.Tensor) -> torch.Tensor:
    """q [B, C] for rows with one active specialist: class counts a [B, C], its dustbin [B, 1] and
    outside [B, C] bool, True for the classes not in its subset."""
    a_outside = a.masked_fill(~outside, 0).sum(-1, keepdim=True)
    tiny = torch.finfo(a.dtype).tiny
    has_mass = a_outside > tiny
    # Outside S: a scaled to carry a_outside + dustbin, or the dustbin evenly where a has no mass there.
    scale = torch.where(has_mass, (a_outside + dustbin) / a_outside.clamp(min=tiny), 0)
    even = torch.where(has_mass, 0, dustbin / outside.sum(-1, keepdim=True).clamp(min=1))
    return torch.where(outside, torch.addcmul(even, a, scale), a).div_(2)


def combine(generalist_probs: torch.Tensor, specialist_in: torch.Tensor, specialist_dustbin: torch.Tensor,
            membership: torch.Tensor, active: torch.Tensor, max_iterations: int = 1000,
            tolerance: float = 1e-6) -> torch.Tensor:
    """The combined distribution q [B, C] (paper, section 5.3): in closed form for rows with at
    most one active specialist (`combine_one_active`: the paper's setting of top_n = 1 over disjoint
    subsets), by `combine_by_em` for the others. EM needs hundreds of iterations when a specialist
    puts much mass in its dustbin; the closed form is one pass. `combine_active` gives the same q
    from the active specialists' outputs alone, without the [B, M, C] inputs."""
    _check_inputs(generalist_probs, specialist_in, specialist_dustbin, membership, active)
    _check_em_options(max_iterations, tolerance)
    a, d, complement = _sufficient_statistics(generalist_probs, specialist_in, specialist_dustbin, membership, active)
    q = _one_active(a, d, complement, active)
    several = (active.sum(-1) > 1).nonzero().squeeze(1)
    if len(several):
        q = q.index_copy(0, several, _em(a[several], d[several], complement, max_iterations, tolerance))
    return _where_active(q, generalist_probs, active)


# ------------------------------------------------------------------------- active outputs only
@dataclass(frozen=True)
class ActiveSpecialistOutputs:
    """The outputs of the active specialists only, packed: P active (row, specialist) pairs, and N
    entries, one per class of each pair's subset (N = the sum of the pairs' subset sizes).

    - rows: [P] int64, each pair's example (its row of generalist_probs).
    - dustbin: [P] float, the specialist's dustbin probability on that row.
    - offsets: [P + 1] int64, rising from 0 to N: pair p's entries are offsets[p]:offsets[p + 1].
    - classes: [N] int64, the classes of each pair's subset, none twice in one pair.
    - probs: [N] float, the specialist's probability of each of them.
    """

    rows: torch.Tensor
    dustbin: torch.Tensor
    offsets: torch.Tensor
    classes: torch.Tensor
    probs: torch.Tensor

    def __post_init__(self) -> None:
        _check_index("rows", self.rows)
        _check_probs("dustbin", self.dustbin, (len(self.rows),))
        _check_index("offsets", self.offsets, len(self.rows) + 1)
        _check_index("classes", self.classes)
        _check_probs("probs", self.probs, (len(self.classes),))
        if self.offsets[0] != 0 or self.offsets[-1] != len(self.classes) or (self.offsets.diff() < 0).any():
            raise ValueError(f"offsets must rise from 0 to len(classes) = {len(self.classes)}")

    @property
    def sizes(self) -> torch.Tensor:
        """[P]: each pair's subset size."""
        return self.offsets.diff()

    def entry_pairs(self) -> torch.Tensor:
        """[N]: the pair of each entry."""
        return torch.arange(len(self.rows), device=self.rows.device).repeat_interleave(self.sizes)

    def flat_index(self, num_classes: int) -> torch.Tensor:
        """[N]: each entry's position row * C + class in a flattened [B, C] tensor."""
        return self.rows.repeat_interleave(self.sizes) * num_classes + self.classes


def pack_specialist_outputs(rows: Sequence[torch.Tensor], classes: Sequence[torch.Tensor],
                            subset_probs: Sequence[torch.Tensor],
                            dustbins: Sequence[torch.Tensor]) -> ActiveSpecialistOutputs:
    """Packs M specialists' outputs on the rows where each is active into `ActiveSpecialistOutputs`.

    For specialist m: rows[m] [R_m] int64, the rows where it is active (none twice); classes[m]
    [K_m] int64, its subset S_m (none twice); subset_probs[m] [R_m, K_m], its probability of each
    class of S_m on each of those rows; dustbins[m] [R_m], its dustbin probability there.
    """
    if not len(rows) == len(classes) == len(subset_probs) == len(dustbins):
        raise ValueError(f"rows, classes, subset_probs and dustbins must hold one entry per specialist, got "
                         f"{len(rows)}, {len(classes)}, {len(subset_probs)} and {len(dustbins)}")
    for m, (rows_m, classes_m, probs_m, dustbin_m) in enumerate(zip(rows, classes, subset_probs, dustbins)):
        _check_index(f"rows[{m}]", rows_m)
        _check_index(f"classes[{m}]", classes_m)
        _check_probs(f"subset_probs[{m}]", probs_m, (len(rows_m), len(classes_m)))
        _check_probs(f"dustbins[{m}]", dustbin_m, (len(rows_m),))
        for name, index, what in ((f"rows[{m}]", rows_m, "row"), (f"classes[{m}]", classes_m, "class")):
            if len(index.unique()) != len(index):
                raise ValueError(f"{name} names a {what} twice: specialist {m} is active once per row, "
                                 f"and its subset holds each class once")
    if not rows:
        empty = torch.zeros(0, dtype=torch.int64)
        return ActiveSpecialistOutputs(empty, empty.double(), torch.zeros(1, dtype=torch.int64), empty, empty.double())
    sizes = torch.cat([torch.full_like(rows_m, len(classes_m)) for rows_m, classes_m in zip(rows, classes)])
    return ActiveSpecialistOutputs(
        rows=torch.cat(list(rows)), dustbin=torch.cat(list(dustbins)),
        offsets=torch.cat([sizes.new_zeros(1), sizes.cumsum(0)]),
        classes=torch.cat([classes_m.repeat(len(rows_m)) for rows_m, classes_m in zip(rows, classes)]),
        probs=torch.cat([probs_m.reshape(-1) for probs_m in subset_probs]))


def _check_active_outputs(generalist_probs: torch.Tensor, outputs: ActiveSpecialistOutputs) -> None:
    batch, num_classes = _check_generalist_probs(generalist_probs)
    if not isinstance(outputs, ActiveSpecialistOutputs):
        raise TypeError(f"outputs must be an ActiveSpecialistOutputs (see pack_specialist_outputs), "
                        f"got {type(outputs).__name__}")
    if len(outputs.rows) == 0:
        return
    for name in ("rows", "dustbin", "offsets", "classes", "probs"):
        if getattr(outputs, name).device != generalist_probs.device:
            raise ValueError(f"outputs.{name} is on {getattr(outputs, name).device}, generalist_probs on "
                             f"{generalist_probs.device}: put them on one device")
    for name, bound in (("rows", batch), ("classes", num_classes)):
        index = getattr(outputs, name)
        if len(index) and (index.min() < 0 or index.max() >= bound):
            raise ValueError(f"outputs.{name} must lie in [0, {bound}) (generalist_probs' shape "
                             f"{list(generalist_probs.shape)}), got [{index.min().item()}, {index.max().item()}]")


def combine_active(generalist_probs: torch.Tensor, outputs: ActiveSpecialistOutputs, max_iterations: int = 1000,
                   tolerance: float = 1e-6) -> torch.Tensor:
    """`combine` from the active specialists' outputs alone: p_g [B, C] and the packed outputs -> q [B, C].

    The same q as `combine` on the dense inputs the outputs stand for: generalist_probs exactly on
    rows without an active specialist, the closed form on rows with one, EM (same max_iterations and
    tolerance, over the rows with several) elsewhere. Memory and time per EM iteration are
    O(B C + N), N the number of packed entries, instead of O(B M C).
    """
    _check_active_outputs(generalist_probs, outputs)
    _check_em_options(max_iterations, tolerance)
    q = generalist_probs.clone()
    counts = torch.bincount(outputs.rows, minlength=len(q))
    one, several = counts == 1, counts > 1
    if one.any():
        q[one] = _one_active_packed(*_select_rows(generalist_probs, outputs, one)).to(q.dtype)
    if several.any():
        a, packed = _select_rows(generalist_probs, outputs, several)
        q[several] = _em_active(a, packed, max_iterations, tolerance).to(q.dtype)
    return q


def _select_rows(generalist_probs: torch.Tensor, outputs: ActiveSpecialistOutputs,
                 keep: torch.Tensor) -> tuple[torch.Tensor, ActiveSpecialistOutputs]:
    """The class counts a [R, C] (working dtype) of the R rows where keep [B] is True, and their
    pairs' outputs with the rows renumbered 0..R-1."""
    kept_pairs = keep[outputs.rows]
    sizes = outputs.sizes[kept_pairs]
    kept_entries = kept_pairs.repeat_interleave(outputs.sizes)
    packed = ActiveSpecialistOutputs((keep.cumsum(0) - 1)[outputs.rows[kept_pairs]], outputs.dustbin[kept_pairs],
                                     torch.cat([sizes.new_zeros(1), sizes.cumsum(0)]),
                                     outputs.classes[kept_entries], outputs.probs[kept_entries])
    a = generalist_probs[keep].to(_working_dtype(generalist_probs))
    a.view(-1).index_add_(0, packed.flat_index(a.shape[1]), packed.probs.to(a.dtype))
    return a, packed


def _one_active_packed(a: torch.Tensor, packed: ActiveSpecialistOutputs) -> torch.Tensor:
    """`_one_active` on class counts a [R, C] and the packed outputs of their rows, one pair a row."""
    outside = torch.ones_like(a, dtype=torch.bool)
    outside.view(-1)[packed.flat_index(a.shape[1])] = False
    dustbin = torch.zeros_like(a[:, :1]).index_copy(0, packed.rows, packed.dustbin.to(a.dtype)[:, None])
    return _closed_form(a, dustbin, outside)


def _em_active(a: torch.Tensor, packed: ActiveSpecialistOutputs, max_iterations: int, tolerance: float) -> torch.Tensor:
    """`_em` on class counts a [R, C] and the packed outputs of their rows: q [R, C] in a's dtype."""
    num_rows, num_classes = a.shape
    flat, pairs, rows = packed.flat_index(num_classes), packed.entry_pairs(), packed.rows
    d = packed.dustbin.to(torch.float64)
    # The E-step puts all of d_m outside S_m, of 1 + #active units of counts, so after every M-step
    # q(not S_m) >= d_m / (1 + #active) and d_m / q(not S_m) <= 1 + #active. Capping the ratio there
    # keeps rounding in q(not S_m), a difference of two sums, from inflating it.
    bound = (1 + torch.bincount(rows, minlength=num_rows)).to(torch.float64)[rows]

    def outside_sum(values: torch.Tensor) -> torch.Tensor:
        """[P] -> [R, C]: per row, the sum of values over its pairs whose subset lacks the class."""
        values = values.to(a.dtype)
        total = torch.zeros(num_rows, dtype=a.dtype, device=a.device).index_add_(0, rows, values)
        spread = total[:, None].repeat(1, num_classes)
        spread.view(-1).index_add_(0, flat, -values[pairs])
        return spread.clamp_(min=0)

    def spread_factor(q: torch.Tensor) -> torch.Tensor:
        # q(not S_m) as the row's total less the mass on S_m, both summed in float64 so that the
        # difference keeps the small masses a float32 sum would round away.
        inside = torch.zeros(len(rows), dtype=torch.float64, device=a.device).index_add_(
            0, pairs, q.view(-1)[flat].to(torch.float64))
        outside = q.sum(-1, dtype=torch.float64)[rows] - inside
        return outside_sum(torch.minimum(d / outside.clamp(min=torch.finfo(torch.float64).tiny), bound))

    uniform_spread = outside_sum(d / (num_classes - packed.sizes).clamp(min=1))
    return _iterate_em(a, uniform_spread, spread_factor, max_iterations, tolerance)
