"""`kdray report RUN_DIR` and the pipeline's last stage: one HTML page, ``RUN/report/index.html``,
with its PNG figures beside it in ``RUN/report/figures/`` (no scripts, no external assets; open the
file in any browser).

Everything is drawn from the files a run left, so a report can be rebuilt without Ray:

- the results table and the test confusion matrices: ``results.json`` (the evaluate stage);
- learning curves: the ``history.json`` next to every published single-bundle model
  (``teacher/member-NN/``, ``student/student/``, ``student/baseline/``, ``sweep/best/``);
- the sweep's heatmaps and trials table: the trials file its manifest names (outputs "trials");
- any stage's own figures and tables (the clustering's covariance plot, the specialists' table):
  the PNG and CSV files its manifest offers (outputs REPORT_FIGURES, REPORT_TABLES), copied or
  tabulated as they are, under the stage's name.

Figures use matplotlib's object API (`matplotlib.figure.Figure`, rendered by Agg), never pyplot, so
no global backend or state is touched.
"""

from __future__ import annotations

import csv
import html
import io
import math
import posixpath
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from kdray.formatting import percent
from kdray.runtime.stage import REPORT_FIGURES, REPORT_TABLES, StageContext, StageResult
from kdray.runtime.storage import Storage

REPORT_DIR = "report"
PAGE = "index.html"
FIGURES = "figures"
HISTORY = "history.json"
CONFUSION_MODELS = ("teacher", "student", "student-swept")
HEATMAPS = (("width", "temperature"), ("hard_weight", "temperature"))  # (rows, columns)
LABELS = {"temperature": "temperature T", "hard_weight": "hard-target weight", "width": "hidden width (2 layers)"}


# ------------------------------------------------------------------------------------ pure tables
def heatmap_matrix(trials: Sequence[Mapping[str, Any]], rows: str, columns: str, value: str = "val_error",
                   select_by: str | None = None) -> tuple[list, list, np.ndarray]:
    """The matrix a heatmap plots: at each (rows, columns) parameter pair, `value` of the trial with
    the lowest `select_by` (default `value` itself) over the other parameters, i.e. what the best
    setting of the others reached. Selecting by validation error and showing test error keeps the
    test set out of every choice.

    `trials`: rows of the sweep's trials table (dicts with the parameter names, `value`,
    `select_by` and `status`); errored trials and trials missing a figure or either parameter are
    left out. Returns (row values ascending [R], column values ascending [K], matrix [R, K]) with
    NaN where no trial ran.
    """
    select_by = select_by or value
    best: dict[tuple, Mapping[str, Any]] = {}
    for trial in trials:
        key = (trial.get(rows), trial.get(columns))
        if trial.get("status") == "error" or None in (trial.get(value), trial.get(select_by), *key):
            continue
        if key not in best or trial[select_by] < best[key][select_by]:
            best[key] = trial
    row_values = sorted({key[0] for key in best})
    column_values = sorted({key[1] for key in best})
    matrix = np.full((len(row_values), len(column_values)), np.nan)
    for (row, column), trial in best.items():
        matrix[row_values.index(row), column_values.index(column)] = float(trial[value])
    return row_values, column_values, matrix


def row_normalised(confusion: np.ndarray) -> np.ndarray:
    """[C, C] counts (rows: true class) -> each row's share of its class; rows without examples are 0."""
    confusion = np.asarray(confusion, dtype=np.float64)
    totals = confusion.sum(axis=1, keepdims=True)
    return np.divide(confusion, totals, out=np.zeros_like(confusion), where=totals > 0)


# ------------------------------------------------------------------------------------ figures
def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def learning_curves_figure(histories: Mapping[str, Sequence[Mapping[str, float]]]):
    """Validation (solid) and training (dashed) error, and validation NLL, per epoch and model."""
    figure = _figure(11, 4)
    error_axes, nll_axes = figure.subplots(1, 2)
    for index, (name, history) in enumerate(histories.items()):
        color = f"C{index % 10}"
        epochs = [row.get("epoch", i + 1) for i, row in enumerate(history)]
        for key, axes, style, scale in (("val_error", error_axes, "-", 100), ("train_error", error_axes, "--", 100),
                                        ("val_nll", nll_axes, "-", 1)):
            points = [(e, row[key] * scale) for e, row in zip(epochs, history) if key in row]
            if points:
                axes.plot(*zip(*points), style, color=color, label=name if key != "train_error" else None)
    error_axes.set(xlabel="epoch", ylabel="error % (solid: validation, dashed: training)", title="Error")
    nll_axes.set(xlabel="epoch", ylabel="validation NLL", title="Validation NLL")
    nll_axes.legend(fontsize="small", loc="upper right")
    return figure


def confusion_figure(models: Mapping[str, np.ndarray], class_names: Sequence[str]):
    """One panel per model: the test confusion matrix, rows normalised to the true class."""
    figure = _figure(4.6 * len(models), 4.4)
    axes_list = np.atleast_1d(figure.subplots(1, len(models)))
    classes = len(class_names)
    step = max(1, math.ceil(classes / 20))  # at most ~20 tick labels
    for axes, (name, confusion) in zip(axes_list, models.items()):
        image = axes.imshow(row_normalised(confusion), vmin=0, vmax=1, cmap="Blues")
        axes.set_title(name)
        axes.set(xlabel="predicted", ylabel="true")
        ticks = list(range(0, classes, step))
        axes.set_xticks(ticks, [class_names[i] for i in ticks], rotation=90, fontsize="x-small")
        axes.set_yticks(ticks, [class_names[i] for i in ticks], fontsize="x-small")
    figure.colorbar(image, ax=list(axes_list), shrink=0.8, label="share of the true class")
    return figure


def heatmap_figure(row_values: list, column_values: list, matrix: np.ndarray, rows: str, columns: str, title: str,
                   value_label: str = "validation error %"):
    figure = _figure(1.2 + 0.9 * len(column_values), 1.4 + 0.6 * len(row_values))
    axes = figure.subplots()
    image = axes.imshow(np.ma.masked_invalid(100 * matrix), cmap="viridis_r", aspect="auto")
    axes.set_xticks(range(len(column_values)), [f"{v:g}" for v in column_values])
    axes.set_yticks(range(len(row_values)), [f"{v:g}" for v in row_values])
    axes.set(xlabel=LABELS.get(columns, columns), ylabel=LABELS.get(rows, rows), title=title)
    for (i, j), cell in np.ndenumerate(matrix):
        if not np.isnan(cell):
            red, green, blue, _ = image.cmap(image.norm(100 * cell))
            light = 0.299 * red + 0.587 * green + 0.114 * blue > 0.5  # perceived brightness of the cell
            axes.text(j, i, f"{100 * cell:.1f}", ha="center", va="center", fontsize="small",
                      color="black" if light else "white")
    figure.colorbar(image, ax=axes, label=value_label)
    return figure


def _save(figure, output: Storage, name: str) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    output.write_bytes(buffer.getvalue(), FIGURES, name)
    return f"{FIGURES}/{name}"


# ------------------------------------------------------------------------------------ reading the run
def model_histories(manifests: Mapping[str, dict[str, Any]]) -> dict[str, list[dict]]:
    """Per-epoch histories of the models the stages' manifests publish (single-bundle ones), by name."""
    from kdray.evaluation.evaluate import run_models

    histories = {}
    for name, (_, entry) in run_models(manifests).items():
        bundles = entry.get("bundles") or []
        if len(bundles) == 1 and "location" in entry and Storage(entry["location"]).exists(bundles[0], HISTORY):
            histories[name] = Storage(entry["location"]).read_json(bundles[0], HISTORY)
    return histories


# ------------------------------------------------------------------------------------ HTML
def _table(header: Sequence[str], rows: Sequence[Sequence[Any]], highlight: int | None = None) -> str:
    head = "".join(f"<th>{html.escape(str(cell))}</th>" for cell in header)
    body = []
    for index, row in enumerate(rows):
        marker = ' class="best"' if index == highlight else ""
        body.append(f"<tr{marker}>" + "".join(f"<td>{html.escape(_text(cell))}</td>" for cell in row) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _text(cell: Any) -> str:
    if cell is None:
        return "n/a"
    if isinstance(cell, float):
        return f"{cell:.4g}"
    return str(cell)


def _image(path: str, caption: str) -> str:
    return (f'<figure><img src="{html.escape(path)}" alt="{html.escape(caption)}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def _results_section(results: dict[str, Any]) -> str:
    rows = []
    for name, value in results["models"].items():
        test, validation = value["test"], value.get("validation") or {}
        rows.append([name, value.get("stage"), f"{test['errors']}/{test['rows']}", percent(test["error_rate"]),
                     test["nll"], test["ece"], percent(validation.get("error_rate"))])
    parts = ["<h2>Results (test split)</h2>",
             _table(["model", "stage", "test errors", "error %", "NLL", "ECE", "val error %"], rows)]
    derived = results.get("derived") or {}
    if derived:
        parts.append(_table(["figure", "value"], [[name.replace("_", " "), value] for name, value in derived.items()]))
    return "\n".join(parts)


def _confusion_section(results: dict[str, Any], output: Storage) -> str:
    matrices = {name: np.asarray(results["models"][name]["test"]["confusion"]) for name in CONFUSION_MODELS
                if "confusion" in results["models"].get(name, {}).get("test", {})}
    if not matrices:
        return ""
    classes = results.get("num_classes") or len(next(iter(matrices.values())))
    names = results.get("class_names") or [str(c) for c in range(classes)]
    path = _save(confusion_figure(matrices, names), output, "confusion.png")
    return "<h2>Confusion matrices (test)</h2>\n" + _image(path, "Rows: true class, normalised; columns: predicted class")


def _heatmaps(trials: list[dict[str, Any]], output: Storage, metric: str, prefix: str, file_suffix: str,
              budget: str) -> list[str]:
    """The HEATMAPS of the trials' `prefix`-ed errors. The paper plots test error: each cell shows
    the test error of the setting of the other parameters with the lowest `metric` (sweeps
    recorded before test errors show `metric` itself)."""
    select_by = prefix + metric
    value = prefix + "test_error" if any(row.get(prefix + "test_error") is not None for row in trials) else select_by
    chosen = f"test error at the lowest {metric.replace('_', ' ')}" if value != select_by \
        else f"lowest {metric.replace('_', ' ')}"
    label = value.removeprefix(prefix).replace("_", " ").replace("val ", "validation ") + " %"
    parts = []
    for rows, columns in HEATMAPS:
        row_values, column_values, matrix = heatmap_matrix(trials, rows, columns, value, select_by=select_by)
        if not row_values:
            continue
        figure = heatmap_figure(row_values, column_values, matrix, rows, columns, f"{chosen}\n{budget}",
                                value_label=label)
        path = _save(figure, output, f"sweep-{columns}-{rows}{file_suffix}.png")
        parts.append(_image(path, f"{LABELS[columns]} x {LABELS[rows]}: {chosen} over the other parameters, "
                                  f"{budget}"))
    return parts


def _sweep_section(table: dict[str, Any], output: Storage) -> str:
    trials, metric = table["trials"], table.get("metric", "val_error")
    parts = ["<h2>Sweep</h2>"]
    rung = table.get("rung_epoch")
    if rung is not None:  # every trial at ASHA's first rung: the same budget in every cell
        parts += _heatmaps(trials, output, metric, prefix="rung_", file_suffix=f"-epoch{rung}",
                           budget=f"at epoch {rung}, which every trial reached")
    parts += _heatmaps(trials, output, metric, prefix="", file_suffix="",
                       budget="at the last epoch of each trial (ASHA stopped some early)")
    order = sorted(trials, key=lambda row: (row.get(metric) is None, row.get(metric) or 0.0))
    best = next((i for i, row in enumerate(order) if row["trial"] == table.get("best")), None)
    columns = (table.get("columns") or list(trials[0])) if trials else []  # the sweep names its columns
    parts.append(_table(columns, [[row.get(name) for name in columns] for row in order], highlight=best))
    return "\n".join(parts)


def _offered_section(stage: str, outputs: dict[str, Any], run: Storage, output: Storage) -> str:
    """The figures and tables `stage` offers the report, those inside the run only."""
    parts = []
    for caption, location in _inside(run, outputs.get(REPORT_FIGURES)):
        name = f"{stage}-{posixpath.basename(location)}"
        output.write_bytes(Storage(location).read_bytes(), FIGURES, name)
        parts.append(_image(f"{FIGURES}/{name}", caption))
    for caption, location in _inside(run, outputs.get(REPORT_TABLES)):
        header, *rows = list(csv.reader(io.StringIO(Storage(location).read_text())))
        parts.append(f"<h3>{html.escape(caption)}</h3>\n" + _table(header, rows))
    return f"<h2>{html.escape(stage.capitalize())}</h2>\n" + "\n".join(parts) if parts else ""


def _inside(run: Storage, offered: Any) -> list[tuple[str, str]]:
    if not isinstance(offered, dict):
        return []
    return [(str(caption), location) for caption, location in offered.items()
            if isinstance(location, str) and run.contains(Storage(location)) and Storage(location).exists()]


STYLE = """body{font-family:sans-serif;margin:2em;max-width:75em;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:90%}th,td{border:1px solid #ccc;padding:.25em .6em;text-align:right}
th{background:#f0f0f0}td:first-child{text-align:left}tr.best{background:#fff3c4}
figure{margin:1em 0}img{max-width:100%}figcaption{color:#555;font-size:90%}pre{background:#f7f7f7;padding:1em}"""


def write_report(run: Storage, output: Storage | None = None) -> str:
    """Write the report of the run at `run` into `output` (default RUN/report); returns the page's
    location. RunError if `run` holds no finished stage."""
    from kdray.evaluation.evaluate import run_manifests

    manifests = run_manifests(run)
    results = _read_results(run)
    output = output or run.child(REPORT_DIR)
    output.delete(FIGURES)  # figures of an earlier report that this one may not draw
    title = posixpath.basename(run.location.rstrip("/"))
    sections = []
    if results:
        sections.append(_results_section(results))
    else:
        sections.append("<h2>Results</h2><p>No results.json: run <code>kdray evaluate RUN_DIR</code>.</p>")
    histories = model_histories(manifests)
    if histories:
        path = _save(learning_curves_figure(histories), output, "learning-curves.png")
        sections.append("<h2>Learning curves</h2>\n" + _image(path, "Per epoch, from each model's history.json"))
    if results:
        sections.append(_confusion_section(results, output))
    trials = manifests.get("sweep", {}).get("outputs", {}).get("trials")
    if isinstance(trials, str) and run.contains(Storage(trials)) and Storage(trials).exists():
        sections.append(_sweep_section(Storage(trials).read_json(), output))
    sections += [_offered_section(stage, manifest["outputs"], run, output) for stage, manifest in manifests.items()
                 if isinstance(manifest.get("outputs"), dict)]
    if run.exists("config.yaml"):
        sections.append(f"<details><summary>Resolved config</summary><pre>{html.escape(run.read_text('config.yaml'))}"
                        "</pre></details>")
    page = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>kdray run {html.escape(title)}'
            f"</title><style>{STYLE}</style></head>\n<body><h1>kdray run {html.escape(title)}</h1>\n"
            f"<p>{html.escape(run.location)}</p>\n" + "\n".join(part for part in sections if part) + "\n</body></html>\n")
    output.write_text(page, PAGE)
    return output.uri(PAGE)


def _read_results(run: Storage) -> dict[str, Any] | None:
    """The run's results.json, if any; RunError naming it if it is not what `kdray evaluate` writes."""
    from kdray.evaluation.evaluate import RESULTS, RunError

    if not run.exists(RESULTS):
        return None
    try:
        results = run.read_json(RESULTS)
    except ValueError:
        results = None
    models = results.get("models") if isinstance(results, dict) else None
    if not isinstance(models, dict) or not all(isinstance(m, dict) and isinstance(m.get("test"), dict)
                                               for m in models.values()):
        raise RunError(f"{run.uri(RESULTS)} is not a kdray results file: `kdray evaluate RUN_DIR` rewrites it")
    return results


def run_report(context: StageContext) -> StageResult:
    page = write_report(context.run, context.output)
    return StageResult(outputs={"report": page}, summary={"report": page})
