"""The teacher stage: one big net, or an ensemble of N members trained concurrently.

Each member is a `TorchTrainer` run of the shared loop with its own seed (and optionally its own
random subset of the training rows), launched from a small Ray task so several members train at
once as far as the cluster's resources allow. A member whose bundle is already on storage is not
retrained, so an interrupted stage resumes with the members it had not finished.
"""

from __future__ import annotations

from kdray.config import Config
from kdray.data import read_manifest, read_split, sample_rows
from kdray.data.sampling import model_seed
from kdray.runtime.artifacts import ModelSpec
from kdray.runtime.progress import EpochProgress, train_in_tasks
from kdray.runtime.stage import StageContext, StageResult
from kdray.runtime.storage import Storage
from kdray.runtime.train import FitSpec, LossSpec, concurrent_fits, final_metrics, fit_and_save


def member_name(index: int) -> str:
    return f"member-{index:02d}"


def member_spec(config: Config, input_shape: tuple[int, ...], num_classes: int, index: int) -> FitSpec:
    teacher = config.teacher
    train = teacher.train.model_copy(update={"seed": model_seed(teacher.train.seed, index)})
    model = ModelSpec(teacher.model.name, teacher.model.options, tuple(input_shape), num_classes)
    return FitSpec(model=model, train=train, loss=LossSpec("hard"))


def _train_member(config: Config, dataset_location: str, output: Storage, work: Storage, index: int,
                  callbacks: list) -> dict:
    storage = Storage(dataset_location)
    manifest = read_manifest(storage)
    spec = member_spec(config, manifest.feature_shape, manifest.num_classes, index)
    train = sample_rows(read_split(storage, "train", manifest), config.teacher.member_data_fraction, seed=index)
    history = fit_and_save(spec, {"train": train, "validation": read_split(storage, "validation", manifest)},
                           config.resources, work.uri(), output, member_name(index), callbacks)
    return final_metrics(history)


def run_teacher(context: StageContext) -> StageResult:
    config, output = context.config, context.output
    size = config.teacher.ensemble_size
    names = [member_name(i) for i in range(size)]
    todo = [i for i in range(size) if not output.exists(names[i], "model.json")]
    dataset = context.input_output("data", "dataset")
    with EpochProgress("teacher", {names[i]: config.teacher.train.epochs for i in todo}, context.progress) as bar:
        train_in_tasks(_train_member, {names[i]: (config, dataset, output, context.work, i) for i in todo},
                       concurrent_fits(config.resources), bar)
    members = {name: output.read_json(name, "history.json")[-1] for name in names}
    models = {f"teacher/{name}": {"location": output.location, "bundles": [name]} for name in names}
    if size > 1:
        models["teacher"] = {"location": output.location, "bundles": names}
    else:
        models["teacher"] = models.pop(f"teacher/{names[0]}")
    summary = {"members": size, "val_error": {n: round(m["val_error"], 5) for n, m in members.items()}}
    return StageResult(outputs={"models": models, "teacher": models["teacher"]}, summary=summary)
