"""A generalist and its specialists at inference (paper, section 5.3), as a Ray Data batch job.

`SpecialistCombiner` is the callable class an actor pool runs: it holds the generalist (one net or
an ensemble) and every specialist, and for each batch of rows

1. takes the generalist's distribution p_g [B, C] and its top-n classes (specialists.top_n);
2. finds the active specialists, those whose subset meets them (`kdray.combine.select_active_specialists`),
   and runs each specialist only on the rows where it is active;
3. builds the dense inputs `kdray.combine.combine` expects -- specialist_in [B, U, C] (each active
   specialist's probabilities scattered onto its classes), specialist_dustbin [B, U], membership
   [U, C] -- for the U specialists active somewhere in the batch, and solves for the q minimising
   KL(p_g || q) + sum_m KL(p_m || q) (EM, in float64);
4. appends log q as the "logits" column (rows without an active specialist get log p_g exactly).

`combined_logits` is the specialists stage's entry in `kdray.evaluate.COMBINERS`, so `kdray evaluate`
and `kdray predict` score and predict "generalist+specialists" through it. The same job writes the
stage's results tables (`write_tables`: the paper's Tables 3 and 4 analogs, on the test split) and
labels the training split for distilling the combination back into one net (`distill_back`).
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from kdray.artifacts import ModelSpec, load_bundle, load_spec, save_bundle
from kdray.combine import combine, select_active_specialists
from kdray.data import read_manifest, read_split
from kdray.inference import LogitsPredictor, ModelRef, features, fixed_size_list, map_logits
from kdray.losses import ensemble_logits
from kdray.metrics import defined_or_none, gain_kept
from kdray.pipeline import StageContext
from kdray.storage import Storage

DISTILLED = "specialists-distilled"
TABLES, TABLES_MARKDOWN, TABLES_CSV = "tables.json", "specialists.md", "specialists.csv"
TRANSFER_DIR, TRANSFER_DONE = "transfer", "transfer.json"
GENERALIST_COLUMN, ACTIVE_COLUMN, DISTILLED_COLUMN = "generalist_logits", "active_specialists", "distilled_logits"


@dataclass(frozen=True)
class CombinedModel:
    generalist: ModelRef
    specialists: ModelRef
    top_n: int

    @classmethod
    def from_entry(cls, entry: dict[str, Any], trusted: tuple[str, ...] = ()) -> CombinedModel:
        """From the specialists stage's outputs["models"]["generalist+specialists"] entry; its
        bundles may name the factories in `trusted`."""
        generalist = entry["generalist"]
        return cls(ModelRef(generalist["location"], tuple(generalist["bundles"]), trusted),
                   ModelRef(entry["location"], tuple(entry["bundles"]), trusted), int(entry["top_n"]))


class SpecialistCombiner:
    """Ray Data actor: appends `output_column` = log q [B, C] (and, with diagnostics, the
    generalist's log-probabilities and the number of active specialists per row; with `extra`,
    more models' logits: column -> ModelRef, so one actor pool serves them all and leaves the
    CPUs its reads need)."""

    def __init__(self, model: CombinedModel, output_column: str = "logits", diagnostics: bool = False,
                 extra: dict[str, ModelRef] | None = None):
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        generalist = Storage(model.generalist.location)
        trusted = model.generalist.trusted
        self.generalists = [load_bundle(generalist, b, self.device, trusted)[0] for b in model.generalist.bundles]
        storage = Storage(model.specialists.location)
        self.specialists, self.classes = [], []
        for bundle in model.specialists.bundles:
            net, spec = load_bundle(storage, bundle, self.device, model.specialists.trusted)
            self.specialists.append(net)
            self.classes.append(torch.tensor(spec.extra["classes"], dtype=torch.int64, device=self.device))
        num_classes = load_spec(generalist, model.generalist.bundles[0]).num_outputs
        self.membership = torch.zeros(len(self.specialists), num_classes, dtype=torch.bool, device=self.device)
        for m, classes in enumerate(self.classes):
            self.membership[m, classes] = True
        self.top_n, self.output_column, self.diagnostics = model.top_n, output_column, diagnostics
        self.extra = {column: LogitsPredictor(ref, column) for column, ref in (extra or {}).items()}

    @torch.no_grad()
    def combined(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, D] -> (log q [B, C], log p_g [B, C], active specialists per row [B])."""
        outputs = torch.stack([net(x) for net in self.generalists]).float()
        log_generalist = torch.log_softmax(outputs[0], -1) if len(outputs) == 1 else ensemble_logits(outputs)
        p_g = log_generalist.double().exp()
        active = select_active_specialists(p_g, self.membership, self.top_n)
        used = active.any(0).nonzero().flatten()
        if used.numel() == 0:
            return log_generalist, log_generalist, active.sum(1)
        batch, num_classes = p_g.shape
        specialist_in = torch.zeros(batch, len(used), num_classes, dtype=torch.float64, device=self.device)
        dustbin = torch.zeros(batch, len(used), dtype=torch.float64, device=self.device)
        for u, m in enumerate(used.tolist()):
            rows = active[:, m].nonzero().flatten()
            probs = torch.softmax(self.specialists[m](x[rows]).double(), -1)
            specialist_in[rows[:, None], u, self.classes[m][None, :]] = probs[:, :-1]
            dustbin[rows, u] = probs[:, -1]
        q = combine(p_g, specialist_in, dustbin, self.membership[used], active[:, used])
        # q underflowing to 0 gets the log of the smallest normal float32: finite, and exp() gives 0 back.
        return q.clamp(min=np.finfo(np.float32).tiny).log().float(), log_generalist, active.sum(1)

    def __call__(self, batch: pa.Table) -> pa.Table:
        x = torch.from_numpy(features(batch)).to(self.device)
        log_q, log_generalist, active = self.combined(x)
        batch = batch.append_column(self.output_column, fixed_size_list(log_q.cpu().numpy()))
        if self.diagnostics:
            batch = batch.append_column(GENERALIST_COLUMN, fixed_size_list(log_generalist.float().cpu().numpy()))
            batch = batch.append_column(ACTIVE_COLUMN, pa.array(active.cpu().numpy().astype(np.int64)))
        for column, predictor in self.extra.items():
            batch = batch.append_column(column, fixed_size_list(predictor.logits(x.cpu().numpy())))
        return batch


def map_combined(dataset, model: CombinedModel, output_column: str = "logits", diagnostics: bool = False,
                 extra: dict[str, ModelRef] | None = None, batch_size: int = 2048, concurrency: int = 1,
                 num_gpus: float = 0):
    """`dataset` (with an "x" column) plus the combined log-probabilities, lazily, by an actor pool."""
    import ray.data

    return dataset.map_batches(
        SpecialistCombiner, fn_constructor_kwargs={"model": model, "output_column": output_column,
                                                   "diagnostics": diagnostics, "extra": extra},
        batch_size=batch_size, batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=concurrency),
        num_gpus=num_gpus)


def combined_logits(dataset, run: Storage, manifest: dict, model: str, batch_size: int = 2048,
                    trusted: tuple[str, ...] = ()):
    """kdray.evaluate.COMBINERS["specialists"]: the lazy `dataset` plus "logits" for one of the
    specialists stage's models (the combination, or the plain distilled net)."""
    entry = manifest["outputs"]["models"][model]
    if "generalist" not in entry:
        return map_logits(dataset, ModelRef(entry["location"], tuple(entry["bundles"]), trusted), batch_size=batch_size)
    return map_combined(dataset, CombinedModel.from_entry(entry, trusted), batch_size=batch_size)


# ------------------------------------------------------------------------------------ distil back
def distill_back(context: StageContext, combined_entry: dict, dataset: str) -> dict:
    """Train one net of the generalist's architecture (from its weights) on the combination's
    distribution over the training split; returns its outputs["models"] entry."""
    from kdray.train import FitSpec, LossSpec, fit
    from kdray.transfer import read_transfer

    config, output = context.config.specialists, context.output
    if not output.exists(DISTILLED, "model.json"):
        combined = CombinedModel.from_entry(combined_entry, context.config.model_factories())
        transfer = _combined_transfer(output, combined, dataset)
        generalist, spec = load_bundle(Storage(combined.generalist.location), combined.generalist.bundles[0],
                                       trusted=combined.generalist.trusted)
        model = ModelSpec(spec.name, spec.options, spec.input_shape, spec.num_outputs)
        fit_spec = FitSpec(model, config.distill_train, LossSpec("distill", config.temperature, config.distill_hard_weight),
                           init_weights=generalist.state_dict())
        validation = read_split(Storage(dataset), "validation")
        result = fit(fit_spec, {"train": read_transfer(transfer), "validation": validation}, context.config.resources,
                     context.work.uri(), DISTILLED)
        output.write_json(result.history, DISTILLED, "history.json")
        save_bundle(output, DISTILLED, model, result.state_dict)
    return {"location": output.location, "bundles": [DISTILLED]}


def _combined_transfer(output: Storage, combined: CombinedModel, dataset: str) -> str:
    """The training split with column "t" = log q, cached under output/transfer (reused on resume)."""
    from kdray.train import TEACHER_LOGITS
    from kdray.transfer import count_rows

    if not output.exists(TRANSFER_DONE):
        output.delete(TRANSFER_DIR)  # a partial write would otherwise add duplicate rows
        rows = read_split(Storage(dataset), "train").select_columns(["id", "x", "y"])
        map_combined(rows, combined, output_column=TEACHER_LOGITS).write_parquet(
            output.path(TRANSFER_DIR), filesystem=output.filesystem)
        output.write_json({"rows": count_rows(output, TRANSFER_DIR)}, TRANSFER_DONE)
    return output.uri(TRANSFER_DIR)


# ------------------------------------------------------------------------------------ tables
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
    from kdray.specialists import COMBINED

    storage = Storage(dataset)
    manifest = read_manifest(storage)
    membership = np.zeros((len(subsets), manifest.num_classes), dtype=bool)
    for m, classes in enumerate(subsets):
        membership[m, classes] = True
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
    summary = {key: _rounded(value, 5) for key, value in overall.items() if key != "rows"}
    summary["by_covering"] = {str(row["covering"]): _rounded(row["relative_change"]) for row in tables["by_covering"]}
    return summary


def _rounded(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else round(value, digits)


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}"


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
    return [_percent(row[f"{m}_accuracy"]) for m in models] + [_signed(row["relative_change"])]


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
        lines += [f"distilled back into one net: keeps {_percent(kept)}% of the combination's accuracy gain"
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
