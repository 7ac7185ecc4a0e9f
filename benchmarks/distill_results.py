"""The paper's distillation figures from finished runs, next to the paper's own numbers.

    kdray run jobs/fashion_mnist.yaml && kdray run jobs/ensemble.yaml && kdray run jobs/small_data.yaml
    python benchmarks/distill_results.py RUN_DIR [RUN_DIR ...] [--seeds] [--json PATH]

RUN_DIR is a run directory (STORAGE_PATH/RUN_NAME, a path or URI). Every figure is read from the
run's `results.json` (written by the evaluate stage, all models measured on the same test split in
one run), so this script trains nothing. Per run it prints each model's test error and the derived
figures that apply:
- gap recovered: (baseline - student) / (baseline - teacher) in test errors
  (paper, MNIST: (146 - 74) / (146 - 67) = 91%; issue target >= 0.9);
- ensemble gain kept: (student - mean member) / (ensemble - mean member) in test accuracy
  (paper, speech: 86%; target >= 0.9);
- for a run whose transfer set is a fraction of the training rows (jobs/small_data.yaml): the test
  accuracy of hard labels vs soft targets on that fraction, next to the full-data teacher
  (paper, speech, 3% of the data: 44.5% hard vs 57.0% soft vs 58.9% full data);
- for a run whose transfer set omits classes (jobs/omit_class.yaml): each model's test errors and
  how many of them fall on the omitted classes' test rows, as the evaluate stage counted them
  (paper, MNIST, the 3s omitted: the student 206 errors, 133 of them on the 1,010 threes; with the
  3s' bias raised, 109 and 14).

With --seeds the runs are one job at different seeds (e.g. `--set distill.train.seed=N`): a
student's test error moves by a tenth of a point or more with its seed, which on the ensemble's
0.66-point gain is ±0.2 of the figure, so the mean and range over the runs are printed too.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from kdray.runtime.storage import Storage

RESULTS = "results.json"
PAPER = {"gap_recovered": 0.91, "ensemble_gain_kept": 0.86}
TARGET = {"gap_recovered": 0.9, "ensemble_gain_kept": 0.9}
PAPER_SMALL_DATA = {"hard (3%)": 0.445, "soft (3%)": 0.570, "full data": 0.589}
PAPER_OMITTED = "MNIST, the 3s omitted: student 206 errors, 133 on the 1,010 threes; the 3s' bias raised: 109, 14"


def run_figures(run: Storage) -> dict[str, Any]:
    """One run's model errors and derived figures, from its results.json and config."""
    if not run.exists(RESULTS):
        raise SystemExit(f"{run.uri(RESULTS)} does not exist: run `kdray run` (or `kdray evaluate`) on it first")
    results = run.read_json(RESULTS)
    test = {name: model["test"] for name, model in results["models"].items()}
    figures: dict[str, Any] = {
        "run": run.location,
        "test_error": {name: metrics["error_rate"] for name, metrics in sorted(test.items())},
        "derived": results["derived"],
    }
    if "omitted_classes" in results:  # written by the evaluate stage (kdray.evaluation.evaluate.omitted_class_errors)
        figures["omitted"] = results["omitted_classes"]
    fraction = run.read_json("transfer", "manifest.json")["summary"].get("fraction", 1.0)
    if fraction < 1.0 and {"baseline", "student", "teacher"} <= test.keys():
        figures["small_data"] = {"fraction": fraction, f"hard ({fraction:.0%})": test["baseline"]["accuracy"],
                                 f"soft ({fraction:.0%})": test["student"]["accuracy"],
                                 "full data (teacher)": test["teacher"]["accuracy"]}
    return figures


def print_figures(figures: dict[str, Any]) -> None:
    print(f"\n{figures['run']}")
    for name, error in figures["test_error"].items():
        print(f"  {name:<24} test error {100 * error:6.2f} %")
    for name, value in figures["derived"].items():
        shown = "n/a" if value is None else f"{value:.3f}"
        print(f"  {name:<24} {shown:>8}   (paper {PAPER[name]:.2f}, target >= {TARGET[name]:.2f})")
    if "small_data" in figures:
        paper = ", ".join(f"{k} {v:.1%}" for k, v in PAPER_SMALL_DATA.items())
        measured = ", ".join(f"{k} {v:.1%}" for k, v in figures["small_data"].items() if k != "fraction")
        print(f"  test accuracy: {measured}\n  (paper, speech: {paper})")
    if "omitted" in figures:
        rows = ", ".join(f"class {label} ({count} test rows)" for label, count in figures["omitted"]["test_rows"].items())
        print(f"  omitted from the transfer set: {rows}")
        for name, errors in figures["omitted"]["errors"].items():
            on_omitted = ", ".join(f"{count} on class {label}" for label, count in errors.items() if label != "all")
            print(f"    {name:<22} {errors['all']:5d} test errors, {on_omitted}")
        print(f"  (paper, {PAPER_OMITTED})")


def seed_spread(figures: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Mean, min and max over runs of each model's test error and each derived figure."""
    values: dict[str, list[float]] = {}
    for one in figures:
        for name, value in [*one["test_error"].items(), *one["derived"].items()]:
            if value is not None:
                values.setdefault(name, []).append(value)
    return {name: {"mean": sum(v) / len(v), "min": min(v), "max": max(v), "runs": len(v)} for name, v in values.items()}


def print_spread(spread: dict[str, dict[str, float]]) -> None:
    print(f"\nover {max(s['runs'] for s in spread.values())} seeds: mean (min - max)")
    for name, s in spread.items():
        scale, unit = (1, "") if name in PAPER else (100, " %")
        print(f"  {name:<24} {scale * s['mean']:8.3f} ({scale * s['min']:.3f} - {scale * s['max']:.3f}){unit}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories (paths or URIs)")
    parser.add_argument("--seeds", action="store_true", help="the runs are one job at different seeds: "
                        "also print each figure's mean and range over them")
    parser.add_argument("--json", metavar="PATH", help="write the figures as JSON")
    args = parser.parse_args(argv)
    figures = [run_figures(Storage(location)) for location in args.runs]
    for one in figures:
        print_figures(one)
    output: dict[str, Any] = {"runs": figures}
    if args.seeds:
        output["seeds"] = seed_spread(figures)
        print_spread(output["seeds"])
    if args.json:
        Path(args.json).write_text(json.dumps(output if args.seeds else figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
