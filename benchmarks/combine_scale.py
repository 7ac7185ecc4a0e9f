"""The KL combination at the paper's shape: the dense inputs (`combine` on specialist_in [B, U, C],
as SpecialistCombiner built them before) against the active specialists' outputs alone
(`combine_active` on `pack_specialist_outputs`), time per 1,000 rows and peak tensor memory.

    python benchmarks/combine_scale.py [--rows 2048] [--specialists 61] [--classes 1000 15000]
                                       [--top-n 1 2] [--dense-limit-gb 4] [--json PATH]

Synthetic, in this process: U specialists over disjoint subsets of about C / U classes, p_g from
random logits, each active specialist's subset distribution from random logits with a dustbin of
5-20%, all float64 as SpecialistCombiner uses them. Each method is timed from the specialists'
outputs (building its inputs, then solving) to q; its peak tensor memory is the most bytes of CPU
tensors alive at once during the same work, from torch.profiler's allocation events, counting
q but not the inputs both methods share. The dense path is skipped where its two [B, U, C] float64
tensors (specialist_in and its product with the membership) would pass --dense-limit-gb.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from kdray.specialists.combine import (
    combine,
    combine_active,
    membership_matrix,
    pack_specialist_outputs,
    select_active_specialists,
)

F64 = torch.float64


@dataclass
class Problem:
    """p_g [B, C], the subsets and, per specialist used in the batch, its outputs on its active rows."""

    generalist: torch.Tensor
    membership: torch.Tensor
    active: torch.Tensor
    used: list[int]
    rows: list[torch.Tensor]
    classes: list[torch.Tensor]
    subset_probs: list[torch.Tensor]
    dustbins: list[torch.Tensor]


def synthetic_problem(batch: int, num_specialists: int, num_classes: int, top_n: int, seed: int = 0) -> Problem:
    generator = torch.Generator().manual_seed(seed)
    subsets = torch.randperm(num_classes, generator=generator).tensor_split(num_specialists)
    membership = membership_matrix(subsets, num_classes)
    generalist = torch.randn(batch, num_classes, generator=generator, dtype=F64).mul(3).softmax(-1)
    active = select_active_specialists(generalist, membership, top_n)
    used = active.any(0).nonzero().flatten().tolist()
    rows = [active[:, m].nonzero().flatten() for m in used]
    dustbins = [0.05 + 0.15 * torch.rand(len(r), generator=generator, dtype=F64) for r in rows]
    subset_probs = [(1 - d)[:, None] * torch.randn(len(r), len(subsets[m]), generator=generator, dtype=F64)
                    .mul(2).softmax(-1) for m, r, d in zip(used, rows, dustbins)]
    return Problem(generalist, membership, active, used, rows, [subsets[m] for m in used], subset_probs, dustbins)


def dense_path(problem: Problem) -> torch.Tensor:
    """q through the dense inputs, built as SpecialistCombiner built them."""
    batch, num_classes = problem.generalist.shape
    specialist_in = torch.zeros(batch, len(problem.used), num_classes, dtype=F64)
    dustbin = torch.zeros(batch, len(problem.used), dtype=F64)
    for u, (rows, classes, probs, bins) in enumerate(zip(problem.rows, problem.classes, problem.subset_probs,
                                                         problem.dustbins)):
        specialist_in[rows[:, None], u, classes[None, :]] = probs
        dustbin[rows, u] = bins
    return combine(problem.generalist, specialist_in, dustbin, problem.membership[problem.used],
                   problem.active[:, problem.used])


def sparse_path(problem: Problem) -> torch.Tensor:
    """q from the active specialists' outputs alone."""
    packed = pack_specialist_outputs(problem.rows, problem.classes, problem.subset_probs, problem.dustbins)
    return combine_active(problem.generalist, packed)


def peak_tensor_bytes(function, *args) -> int:
    """The most bytes of CPU tensors allocated by function(*args) and alive at once."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        function(*args)
    events = sorted((event for event in profiler.profiler.kineto_results.events() if event.name() == "[memory]"),
                    key=lambda event: event.start_ns())
    live = peak = 0
    for event in events:
        live += event.nbytes()
        peak = max(peak, live)
    return peak


def best_seconds(function, *args, repeats: int) -> tuple[float, torch.Tensor]:
    best, result = math.inf, None
    for _ in range(repeats):
        started = time.perf_counter()
        result = function(*args)
        best = min(best, time.perf_counter() - started)
    return best, result


def measure(batch: int, num_specialists: int, num_classes: int, top_n: int, dense_limit_gb: float) -> dict:
    problem = synthetic_problem(batch, num_specialists, num_classes, top_n)
    repeats = 3 if num_classes <= 2000 else 1
    counts = problem.active.sum(1)
    figure = {"classes": num_classes, "top_n": top_n, "rows": batch, "specialists_used": len(problem.used),
              "active_per_row": counts.double().mean().item(), "rows_with_several": int((counts > 1).sum()),
              "packed_entries": sum(len(r) * len(c) for r, c in zip(problem.rows, problem.classes)),
              "dense_entries": batch * len(problem.used) * num_classes}
    seconds, q_sparse = best_seconds(sparse_path, problem, repeats=repeats)
    figure |= {"sparse_ms_per_1000": seconds / batch * 1e6,
               "sparse_peak_bytes": peak_tensor_bytes(sparse_path, problem)}
    dense_gb = 2 * figure["dense_entries"] * 8 / 1e9
    if dense_gb > dense_limit_gb:
        return figure | {"dense_skipped": f"two [B, U, C] float64 tensors: {dense_gb:.1f} GB > {dense_limit_gb} GB"}
    seconds, q_dense = best_seconds(dense_path, problem, repeats=repeats)
    return figure | {"dense_ms_per_1000": seconds / batch * 1e6,
                     "dense_peak_bytes": peak_tensor_bytes(dense_path, problem),
                     "max_abs_gap": (q_sparse - q_dense).abs().max().item()}


def table(figures: list[dict]) -> str:
    columns = ["C", "top_n", "active per row (rows with 2+)", "packed entries ÷ B·U·C",
               "ms per 1,000 rows: dense → sparse (ratio)", "peak tensor MB: dense → sparse (ratio)",
               "max abs gap in q"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for f in figures:
        entries = f"{f['packed_entries']:,} ÷ {f['dense_entries']:,}"
        sparse_mb = f["sparse_peak_bytes"] / 2**20
        if "dense_skipped" in f:
            timing = f"skipped → {f['sparse_ms_per_1000']:.1f}"
            memory = f"skipped ({f['dense_skipped']}) → {sparse_mb:,.0f}"
            gap = "n/a"
        else:
            timing = (f"{f['dense_ms_per_1000']:.1f} → {f['sparse_ms_per_1000']:.1f} "
                      f"({f['sparse_ms_per_1000'] / f['dense_ms_per_1000']:.3f})")
            dense_mb = f["dense_peak_bytes"] / 2**20
            memory = f"{dense_mb:,.0f} → {sparse_mb:,.0f} ({sparse_mb / dense_mb:.3f})"
            gap = f"{f['max_abs_gap']:.1e}"
        lines.append(f"| {f['classes']:,} | {f['top_n']} | {f['active_per_row']:.2f} ({f['rows_with_several']}) | "
                     f"{entries} | {timing} | {memory} | {gap} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2048)
    parser.add_argument("--specialists", type=int, default=61)
    parser.add_argument("--classes", type=int, nargs="+", default=[1000, 15_000])
    parser.add_argument("--top-n", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--dense-limit-gb", type=float, default=4.0)
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()

    started = time.perf_counter()
    figures = [measure(args.rows, args.specialists, num_classes, top_n, args.dense_limit_gb)
               for num_classes in args.classes for top_n in args.top_n]
    print(f"B = {args.rows} rows, U = {args.specialists} specialists, float64, {torch.get_num_threads()} torch "
          f"threads, torch {torch.__version__}; ratios are sparse ÷ dense, in this process")
    print(table(figures))
    print(f"total {time.perf_counter() - started:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
