"""The evaluate stage: every model a run published, on the test split (and validation), in one pass.

The models come from the upstream stages' manifests: by convention a stage that trains models lists
them as ``outputs["models"] = {name: {"location": ..., "bundles": [dir, ...]}}`` (teacher members
``teacher/member-NN``, the ``teacher`` itself -- an ensemble when it has several bundles --,
``baseline``, ``student``, ...) and the data stage names the dataset as ``outputs["dataset"]``.

The splits are read once for all models: Ray Data streams them through one actor pool that holds
every bundle, computes each model's logits and reduces every batch to one row of
`ClassificationStats` per (model, split); only those rows reach the driver, which merges them. The
results go to ``results.json`` (per-model metrics, the test confusion matrices and calibration bins,
and the paper's derived figures) in the stage directory and at the run root.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from kdray.config import short_repr
from kdray.data.shards import DatasetError, DatasetManifest, read_manifest, read_parquet
from kdray.distill.losses import ensemble_logits
from kdray.evaluation.inference import ModelRef, features, fixed_size_list
from kdray.evaluation.metrics import N_BINS, ClassificationStats, defined_or_none, gain_kept, gap_recovered
from kdray.formatting import number, percent, rounded
from kdray.runtime.artifacts import check_bundle, load_bundle, load_spec
from kdray.runtime.stage import MANIFEST, StageContext, StageResult, read_stage_manifest
from kdray.runtime.storage import Storage

RESULTS = "results.json"
EVALUATED_SPLITS = ("test", "validation")  # test is required; validation is reported when present
SPLIT_COLUMN = "split_index"  # added to the rows being evaluated: which of the splits a row is from
TEACHER, BASELINE, STUDENT = "teacher", "baseline", "student"
MEMBER_PREFIX = "teacher/"


class RunError(Exception):
    """A run's manifests, dataset or models cannot be used as asked; the message says what is there."""


# ------------------------------------------------------------------------------------ a run's models
def run_manifests(run: Storage) -> dict[str, dict[str, Any]]:
    """The finished stages' manifests of a run directory, in pipeline order (`pipeline_order`)."""
    names = [name for name in run.list() if not name.startswith(("_", ".")) and run.is_dir(name)]
    manifests = {}
    for name in names:
        manifest = read_stage_manifest(run, name)
        if manifest is None and run.exists(name, MANIFEST):
            raise RunError(f"{run.uri(name, MANIFEST)} is not a stage manifest (a JSON object): re-run the stage")
        if manifest is not None:
            manifests[name] = manifest
    if not manifests:
        raise RunError(f"{run.location} has no finished stage (no STAGE/manifest.json): is it a kdray run directory?")
    return {name: manifests[name] for name in pipeline_order(manifests)}


def pipeline_order(manifests: Mapping[str, dict[str, Any]]) -> list[str]:
    """Stage names, each after the stages it read (its manifest's `inputs`), ties in the order they
    finished: the order the pipeline ran them, read from the run itself."""
    def inputs(name: str) -> set[str]:
        value = manifests[name].get("inputs")
        return set(value) & set(manifests) if isinstance(value, dict) else set()

    pending = sorted(manifests, key=lambda name: (str(manifests[name].get("finished_at", "")), name))
    ordered: list[str] = []
    while pending:
        # A tampered manifest could make a cycle: then the earliest finished goes first.
        ready = next((name for name in pending if inputs(name) <= set(ordered)), pending[0])
        ordered.append(ready)
        pending.remove(ready)
    return ordered


def run_models(manifests: Mapping[str, dict[str, Any]]) -> dict[str, tuple[str, dict[str, Any]]]:
    """Every model the stages published: name -> (stage, its outputs["models"] entry)."""
    models: dict[str, tuple[str, dict[str, Any]]] = {}
    for stage, manifest in manifests.items():
        published = _outputs(stage, manifest).get("models", {})
        if not isinstance(published, dict) or not all(isinstance(entry, dict) for entry in published.values()):
            raise RunError(f"{stage}/{MANIFEST}: outputs.models must map model names to entries")
        for name, entry in published.items():
            if name in models:
                raise RunError(f"model {name!r} is published by two stages, {models[name][0]!r} and {stage!r}")
            models[name] = (stage, entry)
    return models


def _outputs(stage: str, manifest: dict[str, Any]) -> dict[str, Any]:
    outputs = manifest.get("outputs") or {}
    if not isinstance(outputs, dict):
        raise RunError(f"{stage}/{MANIFEST}: outputs must be a JSON object, got {type(outputs).__name__}")
    return outputs


def model_ref(name: str, entry: dict[str, Any], run: Storage, trusted: Sequence[str] = ()) -> ModelRef:
    """The ModelRef of a manifest entry; RunError unless it names bundles inside `run` (a copied
    run must evaluate its own files, never follow a location back to the original)."""
    try:
        ref = ModelRef(str(entry["location"]), tuple(str(bundle) for bundle in entry["bundles"]), tuple(trusted))
    except (KeyError, TypeError):
        raise RunError(f"model {name!r}: manifest entry {short_repr(entry)} needs 'location' and 'bundles'") from None
    if not run.contains(Storage(ref.location)):
        raise RunError(f"model {name!r} is at {ref.location}, outside the run {run.location}: kdray reads only a "
                       f"run's own files (runs written before kdray stored locations relative to the run cannot be "
                       f"moved or copied)")
    return ref


def entry_refs(name: str, entry: dict[str, Any], run: Storage, trusted: Sequence[str] = ()) -> list[ModelRef]:
    """Every bundle set a model entry loads: its own, and a combination's generalist."""
    parts = [entry, *([entry["generalist"]] if isinstance(entry.get("generalist"), dict) else [])]
    return [model_ref(name, part, run, trusted) for part in parts]


def check_run_models(run: Storage, manifests: Mapping[str, dict[str, Any]], trust_code: bool = False,
                     models: Sequence[str] | None = None) -> tuple[str, ...]:
    """Check every bundle of the run's `models` (default: all) in the driver, before any worker
    loads one: BundleError or RunError naming the file. Returns the factories they may import:
    every one their specs name with `trust_code`, none otherwise."""
    published = run_models(manifests)
    refs = [ref for name, (_, entry) in published.items() if models is None or name in models
            for ref in entry_refs(name, entry, run)]
    specs = {(ref.location, bundle): load_spec(Storage(ref.location), bundle) for ref in refs for bundle in ref.bundles}
    trusted = tuple(sorted({spec.name for spec in specs.values() if ":" in spec.name})) if trust_code else ()
    for location, bundle in specs:
        check_bundle(Storage(location), bundle, trusted)
    return trusted


def run_dataset(manifests: Mapping[str, dict[str, Any]]) -> str:
    """The dataset location the run's data stage published as outputs["dataset"]."""
    locations = {str(outputs["dataset"]) for stage, manifest in manifests.items()
                 if "dataset" in (outputs := _outputs(stage, manifest))}
    if len(locations) != 1:
        found = sorted(locations) or "none"
        raise RunError(f"expected one stage publishing outputs['dataset'] among {sorted(manifests)}, found {found}")
    return locations.pop()


def check_compatible(models: Mapping[str, ModelRef], feature_dim: int, num_classes: int | None = None) -> None:
    """RunError naming the bundle if a model does not take `feature_dim` inputs or give `num_classes` logits."""
    for name, ref in models.items():
        storage = Storage(ref.location)
        for bundle in ref.bundles:
            spec = load_spec(storage, bundle)
            if math.prod(spec.input_shape) != feature_dim or num_classes not in (None, spec.num_outputs):
                raise RunError(
                    f"model {name!r} ({storage.uri(bundle)}) maps {math.prod(spec.input_shape)} features to "
                    f"{spec.num_outputs} classes; the data has {feature_dim} features"
                    + (f" and {num_classes} classes" if num_classes is not None else ""))


# ------------------------------------------------------------------------------------ extension point
# A model entry is normally a set of bundles: one net, or an ensemble whose logits are the log of its
# members' mean probability. A stage whose models combine nets some other way (the specialists
# stage: a generalist and its specialists combined by minimising KL, kdray.specialists.combine) registers here,
# under its stage name, the import path of a function
#
#     combined_logits(dataset, run: Storage, manifest: dict, model: str, batch_size: int,
#                     trusted: tuple[str, ...]) -> Dataset
#
# returning the lazy `dataset` with all its columns plus "logits" ([C] float32 fixed-size lists).
# Every model that stage lists in outputs["models"] is then evaluated (`evaluate_manifests`) and
# predicted (`kdray.evaluation.predict`) through it. An import path, so a stage's code loads only when needed.
COMBINERS: dict[str, str] = {"specialists": "kdray.specialists.combined:combined_logits"}


def combiner(stage: str) -> Callable | None:
    """The registered `combined_logits` function of `stage`, or None for plain bundle models."""
    if stage not in COMBINERS:
        return None
    module, _, function = COMBINERS[stage].partition(":")
    return getattr(importlib.import_module(module), function)


# ------------------------------------------------------------------------------------ one pass
def tagged_splits(storage: Storage, splits: Sequence[str], manifest: DatasetManifest):
    """The rows (x, y) of `splits` as one lazy Dataset, with SPLIT_COLUMN = the index in `splits`.

    One read over all the splits' shards (each row's file tells its split), rather than a union of
    `read_split`s: every extra read operator costs worker start-ups that dominate on small data.
    """
    for split in splits:
        if not manifest.split_shards(split):
            raise DatasetError(f"{storage.uri()} has no shards for split {split!r}")
    shards = [shard for shard in manifest.shards if shard.split in splits]
    paths = [storage.path(shard.file) for shard in shards]
    rows = read_parquet(paths, storage.filesystem, schema=manifest.schema, include_paths=True)
    split_of_file = [list(splits).index(shard.split) for shard in shards]
    return rows.map_batches(_tag_split, fn_kwargs={"paths": paths, "split_of_file": split_of_file},
                            batch_format="pyarrow")


def _tag_split(batch: pa.Table, paths: list[str], split_of_file: list[int]) -> pa.Table:
    """Replace the `path` column Ray Data added with the row's split index."""
    file_index = pc.index_in(batch.column("path"), value_set=pa.array(paths, pa.string()))
    if file_index.null_count:
        outside = batch.column("path").filter(pc.is_null(file_index))[0]
        raise DatasetError(f"read a row from {outside}, a file the dataset manifest does not list")
    split_index = np.asarray(split_of_file, dtype=np.int8)[file_index.to_numpy(zero_copy_only=False)]
    return batch.select(["x", "y"]).append_column(SPLIT_COLUMN, pa.array(split_index))


def _split_records(model: str, logits: np.ndarray, batch: pa.Table, splits: Sequence[str]) -> list[tuple]:
    labels = batch.column("y").to_numpy()
    split_index = batch.column(SPLIT_COLUMN).to_numpy()
    return [(model, split, ClassificationStats.from_logits(logits[split_index == i], labels[split_index == i]))
            for i, split in enumerate(splits) if (split_index == i).any()]


def statistics_table(records: list[tuple[str, str, ClassificationStats]], num_classes: int) -> pa.Table:
    """(model, split, stats) records -> a table with one row each (counts and sums as columns)."""
    def matrix(values: list[np.ndarray], width: int, dtype) -> pa.FixedSizeListArray:
        stacked = np.stack([v.reshape(-1) for v in values]) if values else np.zeros((0, width), dtype)
        return fixed_size_list(stacked.astype(dtype))

    stats = [record[2] for record in records]
    return pa.table({
        "model": pa.array([record[0] for record in records], pa.string()),
        "split": pa.array([record[1] for record in records], pa.string()),
        "rows": pa.array([s.rows for s in stats], pa.int64()),
        "errors": pa.array([s.errors for s in stats], pa.int64()),
        "nll_sum": pa.array([s.nll_sum for s in stats], pa.float64()),
        "confusion": matrix([s.confusion for s in stats], num_classes * num_classes, np.int64),
        "bin_counts": matrix([s.bin_counts for s in stats], N_BINS, np.int64),
        "bin_confidence": matrix([s.bin_confidence for s in stats], N_BINS, np.float64),
        "bin_correct": matrix([s.bin_correct for s in stats], N_BINS, np.int64),
    })


def statistics_records(table: pa.Table) -> Iterator[tuple[str, str, ClassificationStats]]:
    """Inverse of `statistics_table`."""
    num_classes = math.isqrt(table.schema.field("confusion").type.list_size)
    confusion = features(table, "confusion").reshape(-1, num_classes, num_classes)
    bins = {name: features(table, name) for name in ("bin_counts", "bin_confidence", "bin_correct")}
    columns = {name: table.column(name).to_pylist() for name in ("model", "split", "rows", "errors", "nll_sum")}
    for i, (model, split) in enumerate(zip(columns["model"], columns["split"])):
        yield model, split, ClassificationStats(
            columns["rows"][i], columns["errors"][i], columns["nll_sum"][i], confusion[i].copy(),
            bins["bin_counts"][i].copy(), bins["bin_confidence"][i].copy(), bins["bin_correct"][i].copy())


class BatchStatistics:
    """Ray Data actor: holds every model's bundles (each loaded once, shared by the ensembles that
    contain it) and maps a batch of tagged rows to one statistics row per (model, split)."""

    def __init__(self, models: dict[str, ModelRef], num_classes: int, splits: tuple[str, ...]):
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.models, self.num_classes, self.splits = models, num_classes, splits
        self.nets = {}
        for ref in models.values():
            for bundle in ref.bundles:
                if (ref.location, bundle) not in self.nets:
                    self.nets[(ref.location, bundle)] = load_bundle(Storage(ref.location), bundle, self.device,
                                                                    ref.trusted)[0]

    @torch.no_grad()
    def __call__(self, batch: pa.Table) -> pa.Table:
        x = torch.from_numpy(features(batch)).to(self.device)
        outputs = {key: net(x) for key, net in self.nets.items()}
        records = []
        for name, ref in self.models.items():
            members = torch.stack([outputs[(ref.location, bundle)] for bundle in ref.bundles])
            logits = members[0] if len(ref.bundles) == 1 else ensemble_logits(members)
            records += _split_records(name, logits.float().cpu().numpy(), batch, self.splits)
        return statistics_table(records, self.num_classes)


def _logits_statistics(batch: pa.Table, model: str, num_classes: int, splits: tuple[str, ...]) -> pa.Table:
    return statistics_table(_split_records(model, features(batch, "logits"), batch, splits), num_classes)


def merge_statistics(reduced, num_classes: int) -> dict[str, dict[str, ClassificationStats]]:
    """Consume a Dataset of statistics rows on the driver: model -> split -> merged stats."""
    totals: dict[str, dict[str, ClassificationStats]] = {}
    for batch in reduced.iter_batches(batch_format="pyarrow", batch_size=None):
        for model, split, stats in statistics_records(batch):
            splits = totals.setdefault(model, {})
            splits[split] = splits.get(split, ClassificationStats.empty(num_classes)).merge(stats)
    return totals


def evaluate_splits(dataset_location: str, splits: Sequence[str], models: Mapping[str, ModelRef],
                    batch_size: int = 2048, concurrency: int = 1, num_gpus: float = 0
                    ) -> dict[str, dict[str, ClassificationStats]]:
    """Statistics of every model on every split (model -> split -> stats), reading each split once.

    Rows labelled -1 are not counted; a split without labelled rows gets empty statistics.
    """
    from ray.data import ActorPoolStrategy

    if not models:
        raise ValueError("models is empty: nothing to evaluate")
    storage = Storage(dataset_location)
    manifest = read_manifest(storage)
    check_compatible(models, manifest.feature_dim, manifest.num_classes)
    splits = tuple(splits)
    reduced = tagged_splits(storage, splits, manifest).map_batches(
        BatchStatistics, fn_constructor_kwargs={"models": dict(models), "num_classes": manifest.num_classes,
                                                "splits": splits},
        batch_size=batch_size, batch_format="pyarrow", compute=ActorPoolStrategy(size=concurrency), num_gpus=num_gpus)
    totals = merge_statistics(reduced, manifest.num_classes)
    empty = ClassificationStats.empty(manifest.num_classes)
    return {name: {split: totals.get(name, {}).get(split, empty) for split in splits} for name in models}


def evaluate_models(dataset_location: str, split: str, models: dict[str, ModelRef],
                    batch_size: int = 2048) -> dict[str, dict]:
    """Each model's metrics on one split: name -> `ClassificationStats.to_dict(state=True)`."""
    stats = evaluate_splits(dataset_location, (split,), models, batch_size)
    return {name: stats[name][split].to_dict(state=True) for name in models}


# ------------------------------------------------------------------------------------ a run's results
def evaluate_manifests(run: Storage, manifests: Mapping[str, dict[str, Any]], batch_size: int = 2048,
                       concurrency: int = 1, trusted: Sequence[str] = ()) -> dict[str, Any]:
    """results.json's content: every published model on the test split (and validation, if any);
    the models' bundles may import the factories in `trusted`."""
    location = run_dataset(manifests)
    storage = Storage(location)
    manifest = read_manifest(storage)
    if "test" not in manifest.split_names():
        raise RunError(f"dataset {location} has no test split (it has {manifest.split_names()})")
    splits = tuple(split for split in EVALUATED_SPLITS if split in manifest.split_names())
    published = run_models(manifests)
    if not published:
        raise RunError(f"none of the stages {sorted(manifests)} published models (outputs['models'])")
    plain = {name: model_ref(name, entry, run, trusted) for name, (stage, entry) in published.items()
             if combiner(stage) is None}
    stats = evaluate_splits(location, splits, plain, batch_size, concurrency) if plain else {}
    for name, (stage, _) in published.items():
        if (combine := combiner(stage)) is not None:
            rows = combine(tagged_splits(storage, splits, manifest), run, manifests[stage], name, batch_size,
                           tuple(trusted))
            stats[name] = _combined_statistics(rows, name, manifest.num_classes, splits)
    # The test split keeps its confusion matrix and calibration bins (for plots); validation its figures.
    models = {name: {"stage": stage, **{split: stats[name][split].to_dict(state=split == "test") for split in splits}}
              for name, (stage, _) in published.items()}
    results = {"dataset": location, "num_classes": manifest.num_classes, "class_names": list(manifest.class_names),
               "splits": list(splits), "models": models, "derived": derived_figures(models)}
    omitted = manifests.get("transfer", {}).get("summary", {}).get("omitted_classes")
    if omitted:
        results["omitted_classes"] = omitted_class_errors({name: value["test"] for name, value in models.items()}, omitted)
    return results


def _combined_statistics(rows, model: str, num_classes: int, splits: tuple[str, ...]) -> dict[str, ClassificationStats]:
    """Per-split statistics of a Dataset that carries a model's "logits" column (a combiner's output)."""
    reduced = rows.map_batches(_logits_statistics, batch_format="pyarrow",
                               fn_kwargs={"model": model, "num_classes": num_classes, "splits": splits})
    merged = merge_statistics(reduced, num_classes).get(model, {})
    return {split: merged.get(split, ClassificationStats.empty(num_classes)) for split in splits}


def derived_figures(models: Mapping[str, dict[str, Any]]) -> dict[str, float | None]:
    """The paper's summary figures from test metrics, for the models that are present:
    gap_recovered (teacher, baseline, student) and ensemble_gain_kept (>= 2 teacher members)."""
    test = {name: value["test"] for name, value in models.items()}
    figures: dict[str, float | None] = {}
    if {TEACHER, BASELINE, STUDENT} <= test.keys():  # error counts, as the paper reports them
        figures["gap_recovered"] = defined_or_none(gap_recovered(*(test[name]["errors"] for name in (TEACHER, BASELINE, STUDENT))))
    members = [name for name in test if name.startswith(MEMBER_PREFIX)]
    if len(members) >= 2 and {TEACHER, STUDENT} <= test.keys():
        accuracies = [test[name]["accuracy"] for name in members + [TEACHER, STUDENT]]
        if None in accuracies:
            figures["ensemble_gain_kept"] = None
        else:
            member_mean = float(np.mean(accuracies[:-2]))
            figures["ensemble_gain_kept"] = defined_or_none(gain_kept(member_mean, accuracies[-2], accuracies[-1]))
    return figures


def omitted_class_errors(test: Mapping[str, dict[str, Any]], omitted: Sequence[int]) -> dict[str, Any]:
    """For classes left out of the transfer set (the paper's omitted 3s): each class's number of test
    rows, and per model its test errors in all and on each omitted class's rows, read from the test
    confusion matrices (rows: the true class). Class keys are strings, as JSON has them."""
    some_model = next(iter(test.values()))
    return {
        "test_rows": {str(label): sum(some_model["confusion"][label]) for label in omitted},
        "errors": {name: {"all": metrics["errors"],
                          **{str(label): sum(metrics["confusion"][label]) - metrics["confusion"][label][label]
                             for label in omitted}}
                   for name, metrics in test.items()},
    }


def headline(results: dict[str, Any]) -> dict[str, Any]:
    """The stage summary: student, teacher and baseline test error and the derived figures."""
    models = results["models"]
    summary = {f"{name}_test_error": rounded(models[name]["test"]["error_rate"], 5)
               for name in (STUDENT, TEACHER, BASELINE) if name in models}
    summary.update({name: rounded(value, 4) for name, value in results["derived"].items()})
    summary["models"] = len(models)
    return summary


def run_evaluate(context: StageContext) -> StageResult:
    """The pipeline's evaluate stage: results.json in the stage directory and at the run root."""
    # One evaluating actor: inference is cheap next to training, and a pool as wide as the cluster
    # would hold every CPU and starve the reads feeding it (Ray Data's read tasks need a CPU of their own).
    results = evaluate_manifests(context.run, context.inputs, trusted=context.config.model_factories())
    context.output.write_json(results, RESULTS)
    context.run.write_json(results, RESULTS)
    return StageResult(outputs={"results": context.output.uri(RESULTS)}, summary=headline(results))


def evaluate_run(run_location: str, batch_size: int = 2048, trusted: Sequence[str] = ()) -> dict[str, Any]:
    """`kdray evaluate RUN_DIR`: evaluate every model the run's finished stages published; writes
    RUN_DIR/results.json and returns its content. Run it on a driver connected to Ray, after
    `check_run_models` (which also says what to pass as `trusted`)."""
    run = Storage(run_location)
    results = evaluate_manifests(run, run_manifests(run), batch_size, trusted=trusted)
    run.write_json(results, RESULTS)
    return results


# ------------------------------------------------------------------------------------ the table
def format_results_table(results: dict[str, Any]) -> str:
    """A fixed-width table: per model test errors (count), error %, NLL, ECE, validation error %;
    then the derived figures."""
    models = results["models"]
    width = max(len("model"), *(len(name) for name in models)) + 2
    header = f"{'model':<{width}}{'test errors':>15}{'error %':>9}{'NLL':>9}{'ECE':>8}{'val error %':>13}"
    lines = [header, "-" * len(header)]
    for name, value in models.items():
        test, validation = value["test"], value.get("validation")
        errors = f"{test['errors']}/{test['rows']}"
        val_error = validation["error_rate"] if validation else None
        lines.append(f"{name:<{width}}{errors:>15}{percent(test['error_rate']):>9}{number(test['nll']):>9}"
                     f"{number(test['ece']):>8}{percent(val_error):>13}")
    explanations = {
        "gap_recovered": "(baseline - student) / (baseline - teacher), test errors",
        "ensemble_gain_kept": "(student - mean member) / (teacher - mean member), test accuracy",
    }
    derived = results.get("derived") or {}
    if derived:
        lines.append("")
    for name, value in derived.items():
        lines.append(f"{name.replace('_', ' '):<20}{number(value, 3):>7}   {explanations.get(name, '')}".rstrip())
    if "omitted_classes" in results:
        lines.extend(["", *_omitted_lines(results["omitted_classes"], results.get("class_names") or [])])
    return "\n".join(lines)


def _omitted_lines(omitted: dict[str, Any], class_names: Sequence[str]) -> list[str]:
    lines = []
    for label, rows in omitted["test_rows"].items():
        name = f" ({class_names[int(label)]})" if int(label) < len(class_names) else ""
        errors = ", ".join(f"{model} {counts[label]}" for model, counts in omitted["errors"].items())
        lines.append(f"class {label}{name}, left out of the transfer set: errors on its {rows} test rows: {errors}")
    return lines


