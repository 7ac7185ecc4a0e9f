"""Tests for kdray.specialists.combine: closed forms, a brute-force optimum, EM against the paper's gradient descent."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kdray.specialists.combine import (
    ActiveSpecialistOutputs,
    combine,
    combine_active,
    combine_by_em,
    combine_by_gradient,
    combine_objective,
    combine_one_active,
    membership_matrix,
    pack_specialist_outputs,
    select_active_specialists,
)
from kdray.specialists.tables import format_tables, specialist_tables, table_counts

F64 = torch.float64
SOLVERS = {
    "em": lambda *inputs: combine_by_em(*inputs, max_iterations=5000, tolerance=1e-12),
    "gradient": lambda *inputs: combine_by_gradient(*inputs, steps=150),
    "closed form": combine_one_active,  # the tests below with at most one active specialist per row
    "active only": lambda generalist, *dense: combine_active(generalist, _packed(*dense), max_iterations=5000,
                                                             tolerance=1e-12),
}


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def _specialists(membership: torch.Tensor, batch: int, dustbin_scale: float = 1.0):
    """Random specialist outputs (specialist_in [B, M, C], specialist_dustbin [B, M]) over `membership`."""
    num_specialists, num_classes = membership.shape
    logits = torch.randn(batch, num_specialists, num_classes + 1, dtype=F64)
    logits[..., -1] += torch.log(torch.tensor(dustbin_scale, dtype=F64))
    # Classes outside S_m get no probability: only S_m and the dustbin are in a specialist's softmax.
    logits[..., :-1] = logits[..., :-1].masked_fill(~membership, float("-inf"))
    probs = logits.softmax(-1)
    return probs[..., :-1], probs[..., -1]


def _packed(specialist_in: torch.Tensor, dustbin: torch.Tensor, membership: torch.Tensor,
            active: torch.Tensor) -> ActiveSpecialistOutputs:
    """The active specialists' outputs taken from the dense inputs, as SpecialistCombiner packs them."""
    rows = [active[:, m].nonzero().flatten() for m in range(membership.shape[0])]
    classes = [membership[m].nonzero().flatten() for m in range(membership.shape[0])]
    subset_probs = [specialist_in[rows_m, m][:, classes_m] for m, (rows_m, classes_m) in enumerate(zip(rows, classes))]
    return pack_specialist_outputs(rows, classes, subset_probs, [dustbin[rows_m, m] for m, rows_m in enumerate(rows)])


def _random_case(batch: int = 6, num_classes: int = 9, num_specialists: int = 4, dustbin_scale: float = 1.0):
    """Overlapping random subsets, every example with at least two active specialists."""
    membership = torch.rand(num_specialists, num_classes) < 0.45
    membership[torch.arange(num_specialists), torch.arange(num_specialists)] = True  # no empty subset
    membership[:, -1] = False  # no subset is every class, so each has a non-empty dustbin
    membership[0, 1] = membership[1, 0] = True  # at least one overlap
    generalist = torch.randn(batch, num_classes, dtype=F64).mul(2).softmax(-1)
    specialist_in, dustbin = _specialists(membership, batch, dustbin_scale)
    active = torch.rand(batch, num_specialists) < 0.6
    active[:, :2] = True
    return generalist, specialist_in, dustbin, membership, active


# ------------------------------------------------------------------------------ closed forms
@pytest.mark.parametrize("solver", sorted(SOLVERS))
def test_no_active_specialist_returns_generalist_exactly(solver: str) -> None:
    generalist, specialist_in, dustbin, membership, _ = _random_case()
    active = torch.zeros(6, 4, dtype=torch.bool)
    q = SOLVERS[solver](generalist, specialist_in, dustbin, membership, active)
    assert torch.equal(q, generalist)


@pytest.mark.parametrize("solver", sorted(SOLVERS))
def test_specialist_over_every_class_averages(solver: str) -> None:
    generalist = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]], dtype=F64)
    specialist = torch.tensor([[[0.1, 0.3, 0.6]], [[0.5, 0.25, 0.25]]], dtype=F64)
    membership = torch.ones(1, 3, dtype=torch.bool)
    q = SOLVERS[solver](generalist, specialist, torch.zeros(2, 1, dtype=F64), membership,
                        torch.ones(2, 1, dtype=torch.bool))
    assert torch.allclose(q, (generalist + specialist[:, 0]) / 2, atol=1e-6)


@pytest.mark.parametrize("solver", sorted(SOLVERS))
def test_coarsened_dustbin_by_hand(solver: str) -> None:
    """C = 3, one specialist over {0} whose dustbin covers {1, 2}: q0 = a0 / 2, and the rest
    (a1 + a2 + d) / 2 splits between classes 1 and 2 in the ratio a1 : a2 (their only other data)."""
    generalist = torch.tensor([[0.5, 0.3, 0.2]], dtype=F64)
    specialist_in = torch.tensor([[[0.6, 0.0, 0.0]]], dtype=F64)
    dustbin = torch.tensor([[0.4]], dtype=F64)
    membership = torch.tensor([[True, False, False]])
    q = SOLVERS[solver](generalist, specialist_in, dustbin, membership, torch.ones(1, 1, dtype=torch.bool))
    rest = (0.3 + 0.2 + 0.4) / 2
    expected = torch.tensor([[1.1 / 2, rest * 0.6, rest * 0.4]], dtype=F64)
    assert torch.allclose(q, expected, atol=1e-6)


def test_dustbin_over_one_class_by_hand() -> None:
    """C = 3, one specialist over {0, 1}: its dustbin is class 2's mass, so q = (a0, a1, a2 + d) / 2."""
    generalist = torch.tensor([[0.2, 0.5, 0.3]], dtype=F64)
    specialist_in = torch.tensor([[[0.6, 0.1, 0.0]]], dtype=F64)
    dustbin = torch.tensor([[0.3]], dtype=F64)
    membership = torch.tensor([[True, True, False]])
    q = combine(generalist, specialist_in, dustbin, membership, torch.ones(1, 1, dtype=torch.bool))
    assert torch.allclose(q, torch.tensor([[0.4, 0.3, 0.3]], dtype=F64), atol=1e-6)


def test_matches_brute_force_grid_with_overlapping_specialists() -> None:
    """C = 3, specialists over {0, 1} and {1, 2} (overlapping at 1): no closed form, so search a grid."""
    generalist = torch.tensor([[0.5, 0.3, 0.2]], dtype=F64)
    specialist_in = torch.tensor([[[0.2, 0.5, 0.0], [0.0, 0.1, 0.6]]], dtype=F64)
    dustbin = torch.tensor([[0.3, 0.3]], dtype=F64)
    membership = torch.tensor([[True, True, False], [False, True, True]])
    active = torch.ones(1, 2, dtype=torch.bool)
    q = combine(generalist, specialist_in, dustbin, membership, active, tolerance=1e-12)

    step = 1e-3
    q0, q1 = torch.meshgrid(torch.arange(step, 1, step, dtype=F64), torch.arange(step, 1, step, dtype=F64),
                            indexing="ij")
    inside = (q0 + q1) < 1 - step / 2
    grid = torch.stack([q0[inside], q1[inside], 1 - q0[inside] - q1[inside]], dim=-1)
    n = len(grid)
    values = combine_objective(grid, generalist.expand(n, 3), specialist_in.expand(n, 2, 3),
                               dustbin.expand(n, 2), membership, active.expand(n, 2))
    best = grid[values.argmin()]
    assert torch.allclose(q[0], best, atol=2 * step)
    assert combine_objective(q, generalist, specialist_in, dustbin, membership, active).item() \
        <= values.min().item() + 1e-12


def _one_active_each(batch: int, num_specialists: int) -> torch.Tensor:
    """[B, M] with one random active specialist per row, none in the first two rows."""
    active = torch.zeros(batch, num_specialists, dtype=torch.bool)
    active[torch.arange(batch), torch.randint(0, num_specialists, (batch,))] = True
    active[:2] = False
    return active


@pytest.mark.parametrize("dustbin_scale", [0.2, 1.0, 10.0, 1000.0])
def test_closed_form_equals_em_with_one_active_specialist(dustbin_scale: float) -> None:
    generalist, specialist_in, dustbin, membership, _ = _random_case(batch=40, dustbin_scale=dustbin_scale)
    active = _one_active_each(40, 4)
    q = combine_one_active(generalist, specialist_in, dustbin, membership, active)
    q_em = combine_by_em(generalist, specialist_in, dustbin, membership, active, max_iterations=200_000,
                         tolerance=1e-14)
    assert torch.allclose(q, q_em, atol=1e-11)
    assert torch.equal(q[:2], generalist[:2])


def test_combine_sends_rows_with_several_active_specialists_to_em() -> None:
    generalist, specialist_in, dustbin, membership, several = _random_case(batch=40)
    active = _one_active_each(40, 4)
    active[10:20] = several[10:20]  # at least two active in these rows
    q = combine(generalist, specialist_in, dustbin, membership, active, max_iterations=200_000, tolerance=1e-14)
    q_em = combine_by_em(generalist, specialist_in, dustbin, membership, active, max_iterations=200_000,
                         tolerance=1e-14)
    assert torch.allclose(q, q_em, atol=1e-11)


def test_closed_form_spreads_the_dustbin_evenly_where_the_generalist_has_no_mass_outside() -> None:
    """p_g all on S = {0}: any spread of the dustbin's mass over {1, 2} is optimal; EM's uniform start
    spreads it evenly, and so does the closed form."""
    generalist = torch.tensor([[1.0, 0.0, 0.0]], dtype=F64)
    specialist_in, dustbin = torch.tensor([[[0.6, 0.0, 0.0]]], dtype=F64), torch.tensor([[0.4]], dtype=F64)
    membership, active = torch.tensor([[True, False, False]]), torch.ones(1, 1, dtype=torch.bool)
    q = combine_one_active(generalist, specialist_in, dustbin, membership, active)
    assert torch.allclose(q, torch.tensor([[0.8, 0.1, 0.1]], dtype=F64), atol=1e-15)
    assert torch.allclose(q, combine_by_em(generalist, specialist_in, dustbin, membership, active), atol=1e-12)


def test_em_optimum_has_zero_gradient() -> None:
    """At the optimum the objective is stationary in the softmax parameters z (q = softmax(z))."""
    inputs = _random_case()
    q = combine_by_em(*inputs, max_iterations=5000, tolerance=1e-13)
    z = q.log().requires_grad_(True)
    combine_objective(z.softmax(-1), *inputs).sum().backward()
    assert z.grad.abs().max().item() < 1e-8


# ------------------------------------------------------------------------ EM against gradient
@pytest.mark.parametrize("dustbin_scale", [0.2, 1.0, 10.0])
def test_em_agrees_with_gradient_descent(dustbin_scale: float) -> None:
    inputs = _random_case(dustbin_scale=dustbin_scale)
    q_em = combine(*inputs, tolerance=1e-10, max_iterations=5000)
    q_gradient = combine_by_gradient(*inputs, steps=150)
    assert torch.allclose(q_em.sum(-1), torch.ones(6, dtype=F64), atol=1e-12)
    assert (q_em - q_gradient).abs().max().item() < 1e-3
    em_objective = combine_objective(q_em, *inputs)
    assert (em_objective <= combine_objective(q_gradient, *inputs) + 1e-6).all()
    # The specialists moved q: the test would pass vacuously if q stayed at p_g.
    assert (q_em - inputs[0]).abs().max().item() > 1e-2
    assert (em_objective < combine_objective(inputs[0], *inputs) - 1e-3).all()


def test_em_objective_never_increases() -> None:
    inputs = _random_case(dustbin_scale=5.0)  # big dustbins: EM's slow case, many informative steps
    objectives = torch.stack([combine_objective(combine_by_em(*inputs, max_iterations=n, tolerance=0.0), *inputs)
                              for n in range(1, 40)])
    steps = objectives[1:] - objectives[:-1]
    assert (steps <= 1e-12).all()
    assert (objectives[-1] < objectives[0] - 1e-4).any()  # it did move


def test_float32_inputs_keep_their_dtype() -> None:
    inputs = [t.float() if t.is_floating_point() else t for t in _random_case()]
    q = combine(*inputs)
    assert q.dtype == torch.float32
    assert torch.allclose(q.double(), combine(*_cast(inputs, F64), tolerance=1e-12), atol=1e-4)


def _cast(tensors, dtype):
    return [t.to(dtype) if t.is_floating_point() else t for t in tensors]


# ------------------------------------------------------------------------ active outputs only
def _mixed_case(batch: int = 60, num_classes: int = 11, num_specialists: int = 6, dustbin_scale: float = 1.0):
    """Overlapping random subsets, the last one every class (dustbin 0); rows 0-9 with no active
    specialist, rows 10-19 with one, the rest with a random number."""
    generalist, specialist_in, dustbin, membership, _ = _random_case(batch, num_classes, num_specialists,
                                                                     dustbin_scale)
    membership[-1] = True
    specialist_in[:, -1], dustbin[:, -1] = torch.randn(batch, num_classes, dtype=F64).softmax(-1), 0.0
    active = torch.rand(batch, num_specialists) < 0.4
    active[:10] = False
    active[10:20] = _one_active_each(12, num_specialists)[2:]
    return generalist, specialist_in, dustbin, membership, active


@pytest.mark.parametrize("dtype", [F64, torch.float32])
@pytest.mark.parametrize("dustbin_scale", [0.2, 1.0, 10.0])
def test_active_outputs_give_the_dense_answer(dtype: torch.dtype, dustbin_scale: float) -> None:
    inputs = _cast(_mixed_case(dustbin_scale=dustbin_scale), dtype)
    generalist, specialist_in, dustbin, membership, active = inputs
    counts = active.sum(1)
    assert (counts > 2).any() and (active[:, -1] & (counts > 1)).any()  # the all-class subset among others
    packed = _packed(specialist_in, dustbin, membership, active)
    q = combine_active(generalist, packed)
    assert q.dtype == dtype
    assert (q - combine(*inputs)).abs().max().item() < 1e-6
    assert torch.equal(q[:10], generalist[:10])
    assert (q[10:] - generalist[10:]).abs().max().item() > 1e-2  # the specialists moved q
    # Both stop after the first step that moves q by at most `tolerance`: in float32, rounding can
    # make that one step later in either (a gap up to twice the tolerance), so compare equal steps too.
    steps = {"max_iterations": 300, "tolerance": 0.0}
    assert (combine_active(generalist, packed, **steps) - combine(*inputs, **steps)).abs().max().item() < 1e-6


@pytest.mark.parametrize("dustbin_scale", [0.2, 5.0])
def test_active_outputs_reach_the_em_optimum(dustbin_scale: float) -> None:
    inputs = _mixed_case(dustbin_scale=dustbin_scale)
    q = combine_active(inputs[0], _packed(*inputs[1:]), max_iterations=50_000, tolerance=1e-14)
    q_em = combine_by_em(*inputs, max_iterations=50_000, tolerance=1e-14)
    assert (q - q_em).abs().max().item() < 1e-10


def test_packed_outputs_hold_only_the_active_subsets() -> None:
    generalist, specialist_in, dustbin, membership, active = _mixed_case()
    packed = _packed(specialist_in, dustbin, membership, active)
    pairs = int(active.sum())
    entries = int((active * membership.sum(1)).sum())  # the sum of the active subsets' sizes
    assert len(packed.rows) == len(packed.dustbin) == len(packed.sizes) == pairs
    assert len(packed.classes) == len(packed.probs) == entries < active.numel() * membership.shape[1]
    # Each pair's entries are its specialist's whole output but the dustbin.
    totals = torch.zeros(pairs, dtype=F64).index_add_(0, packed.entry_pairs(), packed.probs) + packed.dustbin
    assert torch.allclose(totals, torch.ones(pairs, dtype=F64), atol=1e-12)
    nothing = pack_specialist_outputs([], [], [], [])
    assert len(nothing.classes) == 0 and torch.equal(combine_active(generalist, nothing), generalist)


def test_bad_active_outputs_raise_naming_the_field() -> None:
    rows, classes = [torch.tensor([0, 1])], [torch.tensor([2, 3, 4])]
    probs, dustbins = [torch.full((2, 3), 0.2, dtype=F64)], [torch.full((2,), 0.4, dtype=F64)]
    with pytest.raises(ValueError, match=r"subset_probs\[0\] must have shape \[2, 3\]"):
        pack_specialist_outputs(rows, classes, [probs[0][:, :2]], dustbins)
    with pytest.raises(ValueError, match=r"dustbins\[0\]"):
        pack_specialist_outputs(rows, classes, probs, [dustbins[0][:1]])
    with pytest.raises(ValueError, match=r"classes\[0\] names a class twice"):
        pack_specialist_outputs(rows, [torch.tensor([2, 2, 4])], probs, dustbins)
    with pytest.raises(ValueError, match=r"rows\[0\] names a row twice"):
        pack_specialist_outputs([torch.tensor([1, 1])], classes, probs, dustbins)
    with pytest.raises(TypeError, match=r"rows\[0\] must be a one-dimensional int64"):
        pack_specialist_outputs([rows[0].int()], classes, probs, dustbins)
    with pytest.raises(ValueError, match="one entry per specialist"):
        pack_specialist_outputs(rows, classes, probs, [])
    packed = pack_specialist_outputs(rows, classes, probs, dustbins)
    with pytest.raises(ValueError, match="offsets must rise"):
        ActiveSpecialistOutputs(packed.rows, packed.dustbin, packed.offsets.flip(0), packed.classes, packed.probs)
    generalist = torch.full((3, 5), 0.2, dtype=F64)
    with pytest.raises(ValueError, match=r"outputs.classes must lie in \[0, 4\)"):
        combine_active(generalist[:, :4], packed)
    with pytest.raises(ValueError, match=r"outputs.rows must lie in \[0, 1\)"):
        combine_active(generalist[:1], packed)
    with pytest.raises(TypeError, match="ActiveSpecialistOutputs"):
        combine_active(generalist, (packed.rows, packed.classes))
    with pytest.raises(ValueError, match="max_iterations"):
        combine_active(generalist, packed, max_iterations=0)


# -------------------------------------------------------------------------------- activation
def test_select_active_specialists_top_n() -> None:
    generalist = torch.tensor([[0.5, 0.3, 0.1, 0.1], [0.05, 0.15, 0.2, 0.6]])
    membership = torch.tensor([[True, False, False, False],   # S_0 = {0}
                               [False, True, True, False],    # S_1 = {1, 2}
                               [False, False, True, True]])   # S_2 = {2, 3}
    top1 = select_active_specialists(generalist, membership, top_n=1)
    assert torch.equal(top1, torch.tensor([[True, False, False], [False, False, True]]))
    top2 = select_active_specialists(generalist, membership, top_n=2)
    assert torch.equal(top2, torch.tensor([[True, True, False], [False, True, True]]))


def test_select_active_specialists_rejects_bad_top_n() -> None:
    with pytest.raises(ValueError, match="top_n"):
        select_active_specialists(torch.full((1, 3), 1 / 3), torch.ones(2, 3, dtype=torch.bool), top_n=4)


# ------------------------------------------------------------------------------------ errors
def test_shape_mismatches_raise_value_error() -> None:
    generalist, specialist_in, dustbin, membership, active = _random_case()
    with pytest.raises(ValueError, match="membership"):
        combine(generalist, specialist_in, dustbin, membership[:, :-1], active)
    with pytest.raises(ValueError, match="specialist_in"):
        combine(generalist, specialist_in[:, :-1], dustbin, membership, active)
    with pytest.raises(ValueError, match="specialist_dustbin"):
        combine(generalist, specialist_in, dustbin[:-1], membership, active)
    with pytest.raises(ValueError, match="active"):
        combine(generalist, specialist_in, dustbin, membership, active[:, :-1])
    with pytest.raises(ValueError, match="membership"):
        select_active_specialists(generalist, membership[:, :-1])


def test_wrong_dtypes_raise_type_error() -> None:
    generalist, specialist_in, dustbin, membership, active = _random_case()
    with pytest.raises(TypeError, match="membership"):
        combine(generalist, specialist_in, dustbin, membership.float(), active)
    with pytest.raises(TypeError, match="active"):
        combine(generalist, specialist_in, dustbin, membership, active.long())



def _tables_for(right: dict[str, int]) -> dict:
    """Tables over 4 rows of classes {0, 1}, one subset covering both, each model right on its first
    `right[model]` rows (wrong ones predict class 2)."""
    labels = np.array([0, 1, 0, 1])
    predictions = {name: np.where(np.arange(4) < n, labels, 2) for name, n in right.items()}
    counts = table_counts(labels, predictions, np.ones(4, dtype=np.int64), np.array([[True, True, False]]))
    return specialist_tables(counts, [[0, 1]])


def test_the_distilled_net_keeps_its_share_of_the_combinations_gain() -> None:
    tables = _tables_for({"generalist": 2, "combined": 4, "distilled": 3})
    assert tables["overall"]["gain_kept"] == pytest.approx(0.5)
    assert "keeps 50.00% of the combination's accuracy gain" in format_tables(tables)


def test_no_gain_kept_is_shown_when_the_combination_did_not_gain() -> None:
    tables = _tables_for({"generalist": 3, "combined": 2, "distilled": 1})
    assert tables["overall"]["gain_kept"] is None  # not 2.0 from (1 - 3) / (2 - 3)
    assert "n/a (the combination did not beat the generalist)" in format_tables(tables)


def test_membership_matrix_marks_each_subsets_classes() -> None:
    expected = torch.tensor([[1, 1, 0, 0, 0], [0, 0, 0, 0, 0], [0, 1, 0, 1, 1]], dtype=torch.bool)
    assert torch.equal(membership_matrix([(0, 1), (), [4, 1, 3]], 5), expected)
    assert torch.equal(membership_matrix([torch.tensor([0, 1]), torch.tensor([], dtype=torch.int64),
                                          torch.tensor([4, 1, 3])], 5), expected)  # as the combined model holds them
