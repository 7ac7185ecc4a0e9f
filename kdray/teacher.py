"""The teacher stage: one big net, or an ensemble of N members trained concurrently.

Each member is a `TorchTrainer` run of the shared loop with its own seed (and optionally its own
random subset of the training rows), launched from a small Ray task so several members train at
once as far as the cluster's resources allow. A member whose bundle is already on storage is not
retrained, so an interrupted stage resumes with the members it had not finished.
"""

from __future__ import annotations

from kdray.artifacts import ModelSpec, save_bundle
from kdray.config import Config
from kdray.data import read_manifest, read_split, sample_rows
from kdray.pipeline import StageContext, StageResult
from kdray.runtime import gather
from kdray.storage import Storage
from kdray.train import FitSpec, LossSpec, final_metrics, fit

MEMBER_SEED_STRIDE = 1009  # members' seeds far apart, so their data orders share nothing


def member_name(index: int) -> str:
    return f"member-{index:02d}"


def member_spec(config: Config, input_shape: tuple[int, ...], num_classes: int, index: int) -> FitSpec:
    teacher = config.teacher
    train = teacher.train.model_copy(update={"seed": teacher.train.seed + MEMBER_SEED_STRIDE * index})
    model = ModelSpec(teacher.model.name, teacher.model.options, tuple(input_shape), num_classes)
    return FitSpec(model=model, train=train, loss=LossSpec("hard"))


def _train_member(config: Config, dataset_location: str, output: Storage, work: Storage, index: int) -> dict:
    storage = Storage(dataset_location)
    manifest = read_manifest(storage)
    spec = member_spec(config, manifest.feature_shape, manifest.num_classes, index)
    train = sample_rows(read_split(storage, "train", manifest), config.teacher.member_data_fraction, seed=index)
    result = fit(spec, {"train": train, "validation": read_split(storage, "validation", manifest)},
                 config.resources, work.uri(), member_name(index))
    save_bundle(output, member_name(index), spec.model, result.state_dict)
    output.write_json(result.history, member_name(index), "history.json")
    return final_metrics(result.history)


def run_teacher(context: StageContext) -> StageResult:
    import ray

    config, output = context.config, context.output
    size = config.teacher.ensemble_size
    names = [member_name(i) for i in range(size)]
    todo = [i for i in range(size) if not output.exists(names[i], "model.json")]
    # The launching task only waits on its trainer: it holds no CPU the workers need.
    launch = ray.remote(num_cpus=0)(_train_member)
    pending, refs = list(todo), []
    dataset = context.input_output("data", "dataset")
    while pending:
        batch, pending = pending[: config.resources.concurrent_members], pending[config.resources.concurrent_members:]
        refs += [launch.remote(config, dataset, output, context.work, i) for i in batch]
        gather(refs[-len(batch):], desc="teacher members", progress=context.progress, unit="member")
    members = {name: output.read_json(name, "history.json")[-1] for name in names}
    models = {f"teacher/{name}": {"location": output.location, "bundles": [name]} for name in names}
    if size > 1:
        models["teacher"] = {"location": output.location, "bundles": names}
    else:
        models["teacher"] = models.pop(f"teacher/{names[0]}")
    summary = {"members": size, "val_error": {n: round(m["val_error"], 5) for n, m in members.items()}}
    return StageResult(outputs={"models": models, "teacher": models["teacher"]}, summary=summary)
