"""The specialists stage's results tables (the paper's Tables 3 and 4, on the test split): accuracy of
the generalist, the combination (and the distilled net) by number of active specialists and by subset."""

from __future__ import annotations

import csv
import io
from typing import Any

import numpy as np
import pyarrow as pa

from kdray.data import read_manifest, read_split
from kdray.evaluation.inference import features, fixed_size_list
from kdray.evaluation.metrics import defined_or_none, gain_kept
from kdray.formatting import percent, rounded
from kdray.runtime.artifacts import ModelRef
from kdray.runtime.stage import StageContext
from kdray.runtime.storage import Storage
from kdray.specialists.combine import membership_matrix
from kdray.specialists.combined import (
    ACTIVE_COLUMN,
    COMBINED,
    DISTILLED,
    DISTILLED_COLUMN,
    GENERALIST_COLUMN,
    CombinedModel,
    map_combined,
)

TABLES, TABLES_MARKDOWN, TABLES_CSV = "tables.json", "specialists.md", "specialists.csv"
COUNTED = ("generalist", "combined", "distilled")


def table_counts(labels: np.ndarray, predictions: dict[str, np.ndarray], active: np.ndarray,
                 membership: np.ndarray) -> dict[str, np.ndarray]:
    """Sums for the results tables over one batch. labels [B]; predictions: model -> [B] classes;
    active [B] active specialists per row; membership [M, C] bool. Returns int64 arrays:
    rows/correct by the number of subsets covering the true class [M + 1], by subset [M] (rows
    whose true class is in it), over rows with an active specialist [1], and overall [1]."""
    covering = membership.sum(0)[labels]
    inside = membership[:, labels]  # [M, B]
    some_active = active > 0
    cover_bins = membership.shape[0] + 1
    counts = {"cover_rows": np.bincount(covering, minlength=cover_bins), "subset_rows": inside.sum(1),
              "active_rows": np.array([some_active.sum()]), "all_rows": np.array([len(labels)])}
    for name, predicted in predictions.items():
        correct = predicted == labels
        counts[f"cover_{name}"] = np.bincount(covering, weights=correct, minlength=cover_bins)
        counts[f"subset_{name}"] = inside.astype(np.int64) @ correct.astype(np.int64)
        counts[f"active_{name}"] = np.array([(correct & some_active).sum()])
        counts[f"all_{name}"] = np.array([correct.sum()])
    return {key: value.astype(np.int64) for key, value in counts.items()}


def _batch_counts(batch: pa.Table, membership: np.ndarray, distilled: bool) -> pa.Table:
    predictions = {"generalist": features(batch, GENERALIST_COLUMN).argmax(1), "combined": features(batch, "logits").argmax(1)}
    if distilled:
        predictions["distilled"] = features(batch, DISTILLED_COLUMN).argmax(1)
    counts = table_counts(batch.column("y").to_numpy(), predictions, batch.column(ACTIVE_COLUMN).to_numpy(), membership)
    return pa.table({key: fixed_size_list(value[None]) for key, value in counts.items()})


def _accuracy(correct: float, rows: float) -> float | None:
    return None if rows == 0 else float(correct) / float(rows)


def _relative(new: float | None, old: float | None) -> float | None:
    return None if new is None or not old else (new - old) / old


def _row(rows: int, counts: dict[str, np.ndarray], prefix: str, index: int, models: tuple[str, ...]) -> dict:
    row = {"rows": int(rows)}
    for name in models:
        row[f"{name}_accuracy"] = _accuracy(counts[f"{prefix}_{name}"][index], rows)
    row["relative_change"] = _relative(row["combined_accuracy"], row["generalist_accuracy"])
    return row


def specialist_tables(counts: dict[str, np.ndarray], subsets: list[list[int]]) -> dict[str, Any]:
    """tables.json from the summed `table_counts`: overall (Table 3), by covering specialists
    (Table 4), over rows with an active specialist, and per subset (before and after)."""
    models = tuple(name for name in COUNTED if f"all_{name}" in counts)
    overall = _row(counts["all_rows"][0], counts, "all", 0, models)
    if "distilled" in models:
        accuracies = (overall[f"{name}_accuracy"] or 0.0 for name in ("generalist", "combined", "distilled"))
        overall["gain_kept"] = defined_or_none(gain_kept(*accuracies))
    return {
        "models": list(models),
        "overall": overall,
        "active": _row(counts["active_rows"][0], counts, "active", 0, models),
        "by_covering": [{"covering": k, **_row(n, counts, "cover", k, models)}
                        for k, n in enumerate(counts["cover_rows"]) if n > 0],
        "by_subset": [{"subset": m, "classes": list(classes), **_row(counts["subset_rows"][m], counts, "subset", m, models)}
                      for m, classes in enumerate(subsets)],
    }


def write_tables(context: StageContext, models: dict[str, dict], dataset: str, subsets: list[list[int]]) -> dict:
    """Score the generalist, the combination (and the distilled net) on the test split in one pass;
    write tables.json, specialists.md and specialists.csv to the stage directory."""
    storage = Storage(dataset)
    manifest = read_manifest(storage)
    membership = membership_matrix(subsets, manifest.num_classes).numpy()
    rows = read_split(storage, "test", manifest).select_columns(["x", "y"])
    trusted = context.config.model_factories()
    extra = {DISTILLED_COLUMN: ModelRef(models[DISTILLED]["location"], tuple(models[DISTILLED]["bundles"]), trusted)} \
        if DISTILLED in models else None
    rows = map_combined(rows, CombinedModel.from_entry(models[COMBINED], trusted), diagnostics=True, extra=extra)
    reduced = rows.map_batches(_batch_counts, fn_kwargs={"membership": membership, "distilled": DISTILLED in models},
                               batch_format="pyarrow")
    totals: dict[str, np.ndarray] = {}
    for batch in reduced.iter_batches(batch_format="pyarrow", batch_size=None):
        for key in batch.column_names:
            summed = features(batch, key).sum(0)
            totals[key] = totals.get(key, 0) + summed
    tables = specialist_tables(totals, subsets)
    output = context.output
    output.write_json(tables, TABLES)
    output.write_text(format_tables(tables, markdown=True), TABLES_MARKDOWN)
    output.write_text(tables_csv(tables), TABLES_CSV)
    return tables


def table_summary(tables: dict) -> dict:
    overall = tables["overall"]
    summary = {key: rounded(value, 5) for key, value in overall.items() if key != "rows"}
    summary["by_covering"] = {str(row["covering"]): rounded(row["relative_change"]) for row in tables["by_covering"]}
    return summary


def _signed(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:+.1f}%"


def _table_lines(header: list[str], rows: list[list[str]], markdown: bool) -> list[str]:
    if markdown:
        return ["| " + " | ".join(header) + " |", "|" + "|".join("---:" for _ in header) + "|",
                *("| " + " | ".join(row) + " |" for row in rows)]
    widths = [max(len(cell) for cell in column) + 2 for column in zip(header, *rows)]
    lines = ["".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(line, widths)))
             for line in [header, *rows]]
    return [lines[0], "-" * len(lines[0]), *lines[1:]]


def _accuracy_columns(models: list[str]) -> list[str]:
    names = {"generalist": "generalist %", "combined": "+ specialists %", "distilled": "distilled %"}
    return [names[m] for m in models] + ["relative change"]


def _cells(row: dict, models: list[str]) -> list[str]:
    return [percent(row[f"{m}_accuracy"]) for m in models] + [_signed(row["relative_change"])]


def format_tables(tables: dict, markdown: bool = False) -> str:
    """The results as printable (or markdown) tables: Table 3 and Table 4 analogs, then per subset."""
    models = tables["models"]
    header = ["test examples", "rows", *_accuracy_columns(models)]
    rows = [["all", str(tables["overall"]["rows"]), *_cells(tables["overall"], models)],
            ["a specialist active", str(tables["active"]["rows"]), *_cells(tables["active"], models)]]
    rows += [[f"covered by {r['covering']}", str(r["rows"]), *_cells(r, models)] for r in tables["by_covering"]]
    subset_header = ["subset", "classes", "rows", *_accuracy_columns(models)]
    subset_rows = [[str(r["subset"]), " ".join(map(str, r["classes"])), str(r["rows"]), *_cells(r, models)]
                   for r in tables["by_subset"]]
    title = "## " if markdown else ""
    lines = [f"{title}Generalist vs generalist + specialists (test split)", "",
             *_table_lines(header, rows, markdown), ""]
    if "gain_kept" in tables["overall"]:
        kept = tables["overall"]["gain_kept"]
        lines += [f"distilled back into one net: keeps {percent(kept)}% of the combination's accuracy gain"
                  if kept is not None else
                  "distilled back into one net: n/a (the combination did not beat the generalist)", ""]
    lines += [f"{title}Per subset: test examples whose true class is in the subset", "",
              *_table_lines(subset_header, subset_rows, markdown)]
    return "\n".join(lines) + "\n"


def tables_csv(tables: dict) -> str:
    """The Table 4 analog (by covering specialists, then all rows) as CSV, for the HTML report."""
    models = tables["models"]
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["true class covered by", "test examples", *_accuracy_columns(models)])
    for row in tables["by_covering"]:
        writer.writerow([f"{row['covering']} specialists", row["rows"], *_cells(row, models)])
    writer.writerow(["all", tables["overall"]["rows"], *_cells(tables["overall"], models)])
    return buffer.getvalue()
