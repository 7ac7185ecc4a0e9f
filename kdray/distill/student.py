"""The student stage: the distilled model and its hard-label baseline, trained on the cached
transfer shards with the shared loop, then exported.

The student minimises (1 - hard_weight) * T^2 * KL(teacher_T || student_T) + hard_weight * CE(y),
the hard term on labelled rows only; the baseline has the same architecture and budget but hard
labels alone, on the labelled training rows the transfer set was drawn from (with K augmented
copies per row in the transfer set, K times the student's epochs: the same number of updates).
Optionally a per-class logit bias is fitted on the validation split afterwards (the paper's fix
for classes missing from the transfer set).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch

from kdray.config import Config, kept_classes
from kdray.data import read_manifest, read_split, sample_rows
from kdray.distill.bias import fit_class_bias
from kdray.distill.transfer import read_transfer, transfer_rows
from kdray.evaluation.inference import ModelRef, features, map_logits
from kdray.runtime.artifacts import ModelSpec, export_program, load_bundle, save_bundle
from kdray.runtime.progress import EpochProgress, train_in_tasks
from kdray.runtime.stage import StageContext, StageResult
from kdray.runtime.storage import Storage
from kdray.runtime.train import FitSpec, LossSpec, concurrent_fits, final_metrics, fit_and_save

STUDENT, BASELINE, CORRECTED = "student", "baseline", "student-corrected"
BIAS_FIT_LOGITS = 1 << 26  # validation logits the driver holds for the bias fit: 256 MiB of float32


def student_loss(config: Config, num_classes: int) -> LossSpec:
    distill = config.distill
    hard_weight = distill.hard_weight if distill.transfer.use_labels else 0.0
    return LossSpec("distill", distill.temperature, hard_weight, kept_classes(distill.transfer.top_k, num_classes))


def student_spec(config: Config, input_shape: tuple[int, ...], num_classes: int, loss: LossSpec) -> FitSpec:
    student = config.distill.student
    return FitSpec(ModelSpec(student.name, student.options, tuple(input_shape), num_classes),
                   config.distill.train, loss)


def baseline_spec(config: Config, input_shape: tuple[int, ...], num_classes: int) -> FitSpec:
    """The hard-label baseline: the student's model and optimiser, and as many updates as the
    student gets. Its epochs are the plain rows, the student's hold each row's copies too."""
    spec = student_spec(config, input_shape, num_classes, LossSpec("hard"))
    epochs = spec.train.epochs * config.distill.transfer.copies
    return replace(spec, train=spec.train.model_copy(update={"epochs": epochs}))


def _training_rows(config: Config, name: str, dataset_location: str, transfer_location: str):
    """The student's transfer shards, or for the baseline the labelled training rows they were
    drawn from (with labels whether or not the student may use them; no separate transfer dataset
    and no jittered copies: those need the teacher to label them)."""
    if name == BASELINE:
        labelled = config.distill.transfer.model_copy(update={"use_labels": True, "dataset": None, "copies": 1})
        return transfer_rows(labelled, dataset_location)
    return read_transfer(transfer_location)


def _train_model(config: Config, name: str, spec: FitSpec, dataset_location: str, transfer_location: str,
                 output: Storage, work: Storage, callbacks: list) -> None:
    """One Ray task: the student or the baseline trained and saved as `output/name/`."""
    datasets = {"train": _training_rows(config, name, dataset_location, transfer_location),
                "validation": read_split(Storage(dataset_location), "validation")}
    fit_and_save(spec, datasets, config.resources, work.uri(), output, name, callbacks)


def rows_per_epoch(transfer_summary: dict, train_rows: int, separate_transfer_set: bool) -> dict[str, int]:
    """What an epoch of the student and of the baseline holds, from the transfer stage's summary:
    the transfer rows, and the labelled rows they were drawn from (the transfer rows without their
    jittered copies; with a separate transfer set, that fraction of the training split)."""
    baseline = round(train_rows * transfer_summary["fraction"]) if separate_transfer_set \
        else transfer_summary["rows"] // transfer_summary["copies"]
    return {STUDENT: transfer_summary["rows"], BASELINE: baseline}


def _train_models(context: StageContext, specs: dict[str, FitSpec], dataset_location: str, train_rows: int) -> None:
    """Train the models not yet saved (an interrupted stage keeps those it finished), as
    concurrent Ray tasks: student and baseline are independent."""
    todo = {name: spec for name, spec in specs.items() if not context.output.exists(name, "model.json")}
    config, transfer = context.config, context.input_output("transfer", "transfer")
    rows = rows_per_epoch(context.inputs["transfer"]["summary"], train_rows, config.distill.transfer.dataset is not None)
    with EpochProgress("student", {name: spec.train.epochs for name, spec in todo.items()}, context.progress,
                       rows) as bar:
        train_in_tasks(_train_model, {name: (config, name, spec, dataset_location, transfer, context.output,
                                             context.work) for name, spec in todo.items()},
                       concurrent_fits(config.resources), bar)


def validation_logits(model: ModelRef, dataset_location: str,
                      max_logits: int = BIAS_FIT_LOGITS) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, C] logits and [N] labels of the validation split, or of a fixed sample of its rows (by id
    hash) where all of them would hold more than `max_logits` logits: the driver's memory for the
    bias fit stays flat however big the split."""
    storage = Storage(dataset_location)
    manifest = read_manifest(storage)
    rows = read_split(storage, "validation", manifest).select_columns(["id", "x", "y"])
    total = manifest.rows("validation") * manifest.num_classes
    if total > max_logits:
        rows = sample_rows(rows, max_logits / total, seed=0)
    logits, labels = [], []
    for batch in map_logits(rows.select_columns(["x", "y"]), model).iter_batches(batch_format="pyarrow",
                                                                                   batch_size=4096):
        logits.append(features(batch, "logits"))
        labels.append(batch.column("y").to_numpy())
    return torch.from_numpy(np.concatenate(logits)), torch.from_numpy(np.concatenate(labels))


def _correct_bias(context: StageContext, dataset_location: str) -> list[float]:
    output = context.output
    logits, labels = validation_logits(ModelRef(output.location, (STUDENT,), context.config.model_factories()),
                                       dataset_location)
    bias = fit_class_bias(logits, labels)
    model, spec = load_bundle(output, STUDENT, trusted=context.config.model_factories())
    save_bundle(output, CORRECTED, spec.with_bias(bias.tolist()), model.state_dict())
    return [round(b, 4) for b in bias.tolist()]


def run_student(context: StageContext) -> StageResult:
    config = context.config
    dataset_location = context.input_output("data", "dataset")
    manifest = read_manifest(Storage(dataset_location))
    shape, classes = manifest.feature_shape, manifest.num_classes
    specs = {STUDENT: student_spec(config, shape, classes, student_loss(config, classes))}
    if config.distill.baseline:
        specs[BASELINE] = baseline_spec(config, shape, classes)
    _train_models(context, specs, dataset_location, manifest.rows("train"))
    summary = {name: final_metrics(context.output.read_json(name, "history.json")) for name in specs}
    models = {name: {"location": context.output.location, "bundles": [name]} for name in specs}
    if config.distill.bias_correction:
        summary["class_bias"] = _correct_bias(context, dataset_location)
        models[CORRECTED] = {"location": context.output.location, "bundles": [CORRECTED]}
    model, spec = load_bundle(context.output, STUDENT, trusted=config.model_factories())
    export_program(context.output, STUDENT, model, spec)
    return StageResult(outputs={"models": models, "student": models[STUDENT]}, summary=summary)
