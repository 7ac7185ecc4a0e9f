"""kdray.pipeline: stages are skipped when up to date, re-run exactly downstream of a change, and a
failed stage leaves no manifest. Toy stages (real functions writing real files) on a real Config."""

from __future__ import annotations

import os
import shutil
from collections import Counter

import pytest

from kdray.config import Config, config_from_dict, load_config
from kdray.pipeline import Stage, run_pipeline, stage_fingerprint
from kdray.runtime.stage import ATTEMPT, MANIFEST, WORK_DIR, StageContext, StageResult, read_stage_manifest
from kdray.runtime.storage import Storage, StorageError


class ToyStages:
    """prepare <- fit <- report, and prepare <- side: each call counted, each writes an artifact.

    `prepare` reads teacher.train.epochs, `fit` reads distill.temperature, `side` reads
    distill.hard_weight, `report` reads no config of its own."""

    def __init__(self):
        self.calls: Counter[str] = Counter()
        self.fail: set[str] = set()

    def prepare(self, context: StageContext) -> StageResult:
        self.calls["prepare"] += 1
        epochs = context.config.teacher.train.epochs
        context.output.write_text(f"epochs={epochs}\n", "data.txt")
        return StageResult(outputs={"data": context.output.uri("data.txt")}, summary={"epochs": epochs})

    def fit(self, context: StageContext) -> StageResult:
        self.calls["fit"] += 1
        data = Storage(context.input_output("prepare", "data")).read_text()  # a file location
        context.output.write_text("partial\n", "partial.txt")
        if "fit" in self.fail:
            raise RuntimeError("fit crashed")
        context.output.write_text(f"{data}temperature={context.config.distill.temperature}\n", "model.txt")
        return StageResult(outputs={"model": context.output.uri("model.txt")})

    def side(self, context: StageContext) -> StageResult:
        self.calls["side"] += 1
        context.output.write_text(f"hard_weight={context.config.distill.hard_weight}\n", "side.txt")
        return StageResult()

    def report(self, context: StageContext) -> StageResult:
        self.calls["report"] += 1
        model = context.input_output("fit", "model")
        text = Storage(os.path.dirname(model)).read_text(os.path.basename(model))
        context.output.write_text(text, "report.txt")
        return StageResult(summary={"lines": text.count("\n")})

    def stages(self) -> list[Stage]:
        return [
            Stage("prepare", self.prepare, config_keys=("teacher.train.epochs",)),
            Stage("fit", self.fit, config_keys=("distill.temperature",), depends_on=("prepare",)),
            Stage("side", self.side, config_keys=("distill.hard_weight",), depends_on=("prepare",)),
            Stage("report", self.report, config_keys=(), depends_on=("fit",)),
        ]


def config_with(temperature: float = 4.0, epochs: int = 2, hard_weight: float = 0.1) -> Config:
    return config_from_dict({"distill": {"temperature": temperature, "hard_weight": hard_weight},
                             "teacher": {"train": {"epochs": epochs}}})


def run(toy: ToyStages, config: Config, storage: Storage) -> dict[str, str]:
    outcomes = run_pipeline(toy.stages(), config, storage, progress=False, log=lambda line: None)
    return {outcome.name: outcome.status for outcome in outcomes}


def files_under(directory) -> list[str]:
    return sorted(os.path.relpath(os.path.join(d, f), directory) for d, _, fs in os.walk(directory) for f in fs)


@pytest.fixture
def toy() -> ToyStages:
    return ToyStages()


@pytest.fixture(params=["path", "file-uri"])
def storage(request, tmp_path) -> Storage:
    root = tmp_path / "runs" / "toy"
    return Storage(str(root) if request.param == "path" else f"file://{root}")


def test_a_finished_run_recomputes_nothing(toy, storage):
    config = config_with()
    assert run(toy, config, storage) == dict.fromkeys(["prepare", "fit", "side", "report"], "ran")
    assert storage.read_text("report", "report.txt") == "epochs=2\ntemperature=4.0\n"
    before = {name: storage.read_json(name, MANIFEST) for name in toy.calls}
    assert run(toy, config, storage) == dict.fromkeys(["prepare", "fit", "side", "report"], "skipped")
    assert toy.calls == dict.fromkeys(["prepare", "fit", "side", "report"], 1)
    assert {name: storage.read_json(name, MANIFEST) for name in toy.calls} == before


def test_an_equal_config_from_another_source_is_still_up_to_date(toy, storage, tmp_path):
    run(toy, config_with(temperature=8.0), storage)
    (tmp_path / "c.yaml").write_text("teacher:\n  train:\n    epochs: 2\ndistill:\n  temperature: 8\n")
    assert set(run(toy, load_config(str(tmp_path / "c.yaml")), storage).values()) == {"skipped"}


def test_a_downstream_change_reruns_only_that_stage_and_its_dependants(toy, storage):
    run(toy, config_with(temperature=4.0), storage)
    prepare_manifest = storage.read_json("prepare", MANIFEST)
    statuses = run(toy, config_with(temperature=8.0), storage)
    assert statuses == {"prepare": "skipped", "fit": "ran", "side": "skipped", "report": "ran"}
    assert toy.calls == {"prepare": 1, "fit": 2, "side": 1, "report": 2}
    assert storage.read_text("report", "report.txt") == "epochs=2\ntemperature=8.0\n"
    assert storage.read_json("prepare", MANIFEST) == prepare_manifest

    statuses = run(toy, config_with(temperature=8.0, hard_weight=0.5), storage)
    assert statuses == {"prepare": "skipped", "fit": "skipped", "side": "ran", "report": "skipped"}


def test_an_upstream_change_reruns_everything_downstream(toy, storage):
    run(toy, config_with(epochs=2), storage)
    assert set(run(toy, config_with(epochs=3), storage).values()) == {"ran"}
    assert storage.read_text("report", "report.txt") == "epochs=3\ntemperature=4.0\n"


def test_changing_back_reruns_rather_than_trusting_stale_files(toy, storage):
    run(toy, config_with(temperature=4.0), storage)
    run(toy, config_with(temperature=8.0), storage)
    assert run(toy, config_with(temperature=4.0), storage)["fit"] == "ran"
    assert storage.read_text("report", "report.txt") == "epochs=2\ntemperature=4.0\n"


def test_a_failed_stage_leaves_no_manifest_and_is_rerun_alone(toy, storage):
    toy.fail.add("fit")
    with pytest.raises(RuntimeError, match="fit crashed"):
        run(toy, config_with(), storage)
    assert toy.calls == {"prepare": 1, "fit": 1}  # nothing after the failure ran
    assert read_stage_manifest(storage, "prepare") is not None
    assert not storage.exists("fit", MANIFEST) and read_stage_manifest(storage, "fit") is None

    toy.fail.clear()
    statuses = run(toy, config_with(), storage)
    assert statuses == {"prepare": "skipped", "fit": "ran", "side": "ran", "report": "ran"}
    assert toy.calls == {"prepare": 1, "fit": 2, "side": 1, "report": 1}


def test_a_stage_that_fails_after_a_config_change_loses_its_old_manifest(toy, storage):
    run(toy, config_with(temperature=4.0), storage)
    toy.fail.add("fit")
    with pytest.raises(RuntimeError):
        run(toy, config_with(temperature=8.0), storage)
    assert not storage.exists("fit", MANIFEST)
    assert not storage.exists("fit", "model.txt")  # the old result is not left looking current
    toy.fail.clear()
    assert run(toy, config_with(temperature=4.0), storage)["fit"] == "ran"


def test_a_retry_keeps_an_interrupted_attempt_but_a_new_config_starts_clean(toy, storage):
    seen = []

    def fit(context: StageContext) -> StageResult:
        seen.append((context.output.exists("partial.txt"), context.work.exists("checkpoint")))
        context.work.write_text("epoch 3", "checkpoint")
        return ToyStages.fit(toy, context)

    stages = toy.stages()
    stages[1] = Stage("fit", fit, config_keys=("distill.temperature",), depends_on=("prepare",))
    toy.fail.add("fit")
    with pytest.raises(RuntimeError):
        run_pipeline(stages, config_with(), storage, log=lambda line: None)
    with pytest.raises(RuntimeError):
        run_pipeline(stages, config_with(), storage, log=lambda line: None)
    with pytest.raises(RuntimeError):
        run_pipeline(stages, config_with(temperature=8.0), storage, log=lambda line: None)
    assert seen == [(False, False), (True, True), (False, False)]
    toy.fail.clear()
    run_pipeline(stages, config_with(temperature=8.0), storage, log=lambda line: None)
    finished = storage.read_json("fit", MANIFEST)["fingerprint"]
    assert storage.exists(WORK_DIR) and not storage.exists(WORK_DIR, f"fit-{finished}")  # scratch removed


def test_stage_manifest_records_fingerprint_inputs_and_artifacts(toy, storage, tmp_path):
    config = config_with()
    run(toy, config, storage)
    prepare, fit = storage.read_json("prepare", MANIFEST), storage.read_json("fit", MANIFEST)
    stages = {stage.name: stage for stage in toy.stages()}
    assert prepare["fingerprint"] == stage_fingerprint(stages["prepare"], config, {})
    assert fit["fingerprint"] == stage_fingerprint(stages["fit"], config, {"prepare": prepare["fingerprint"]})
    assert prepare["inputs"] == {} and fit["inputs"] == {"prepare": prepare["fingerprint"]}
    assert prepare["artifacts"] == ["data.txt"]
    assert fit["artifacts"] == ["model.txt", "partial.txt"]
    # on disk relative to the run, so a copied run reads its own files; resolved when read
    assert prepare["outputs"] == {"data": "./prepare/data.txt"}
    assert read_stage_manifest(storage, "prepare")["outputs"] == {"data": storage.uri("prepare", "data.txt")}
    assert prepare["summary"] == {"epochs": 2} and prepare["stage"] == "prepare"
    assert storage.read_json("report", MANIFEST)["summary"] == {"lines": 2}
    # written through an atomic rename: no temporary file is left anywhere in the run
    files = files_under(tmp_path / "runs" / "toy")
    assert not [name for name in files if ".tmp-" in name]
    assert {f"{name}/{MANIFEST}" for name in stages} <= set(files)
    assert {f"{name}/{ATTEMPT}" for name in stages} <= set(files)


def test_fingerprint_depends_only_on_the_keys_a_stage_reads():
    stage = Stage("fit", lambda context: StageResult(), config_keys=("distill.temperature", "teacher.model"))
    base = stage_fingerprint(stage, config_with(), {})
    assert stage_fingerprint(stage, config_with(hard_weight=0.9), {}) == base
    assert stage_fingerprint(stage, config_with(temperature=2.0), {}) != base
    other_model = config_from_dict({"teacher": {"train": {"epochs": 2}, "model": {"name": "mlp", "hidden": [7]}}})
    assert stage_fingerprint(stage, other_model, {}) != base  # a model option counts
    assert stage_fingerprint(stage, config_with(), {"prepare": "abc"}) != base


def test_data_fingerprint_reads_the_synthetic_options_only_when_they_make_the_data():
    stage = Stage("data", lambda context: StageResult(), config_keys=("data",))

    def fingerprint(source: str, **synth) -> str:
        return stage_fingerprint(stage, config_from_dict({"data": {"source": source, "synth": synth}}), {})

    assert fingerprint("fashion-mnist", bridges=3) == fingerprint("fashion-mnist")
    assert fingerprint("synth", bridges=3) != fingerprint("synth")
    assert fingerprint("mnist") != fingerprint("fashion-mnist")


def test_the_resolved_config_is_saved_in_the_run_directory(toy, storage):
    config = config_with(temperature=8.0)
    run(toy, config, storage)
    assert storage.list()[:1] == ["config.yaml"]
    saved = load_config(storage.path("config.yaml"))
    assert saved == config
    assert "temperature: 8.0" in storage.read_text("config.yaml")
    assert "batch_size: 256" in storage.read_text("config.yaml")  # defaults are written out too


def test_disabled_stages_are_reported_and_may_not_be_depended_on(toy, storage):
    stages = toy.stages()
    stages[0] = Stage("prepare", toy.prepare, config_keys=(), enabled=lambda config: config.sweep.enabled)
    with pytest.raises(ValueError, match=r"stage fit needs \['prepare'\]"):
        run_pipeline(stages, config_with(), storage, log=lambda line: None)
    outcomes = run_pipeline(stages[:1], config_with(), storage, log=lambda line: None)
    assert [(o.name, o.status, o.manifest) for o in outcomes] == [("prepare", "disabled", None)]
    assert toy.calls == {}


def test_progress_lines_name_each_stage(toy, storage):
    lines: list[str] = []
    run_pipeline(toy.stages(), config_with(), storage, progress=False, log=lines.append)
    run_pipeline(toy.stages(), config_with(), storage, progress=False, log=lines.append)
    assert any(line.startswith("[kdray] fit: running (") for line in lines)
    assert any(line.startswith("[kdray] fit: up to date (") and line.endswith("skipped") for line in lines)


def test_a_copied_run_resumes_from_its_own_files(toy, tmp_path):
    original = Storage(str(tmp_path / "runs" / "toy"))
    run(toy, config_with(), original)
    shutil.copytree(original.location, tmp_path / "copy")
    copy = Storage(str(tmp_path / "copy"))
    copy.write_text("epochs=copied\n", "prepare", "data.txt")

    assert run(toy, config_with(temperature=8.0), copy)["fit"] == "ran"  # prepare skipped: its output is reused

    assert copy.read_text("fit", "model.txt") == "epochs=copied\ntemperature=8.0\n"
    assert original.read_text("fit", "model.txt") == "epochs=2\ntemperature=4.0\n"


def test_a_directory_of_user_files_is_never_made_a_run(toy, tmp_path):
    (tmp_path / "mine" / "prepare").mkdir(parents=True)
    (tmp_path / "mine" / "prepare" / "notes.txt").write_text("keep me")
    with pytest.raises(StorageError, match="is not a kdray run"):
        run(toy, config_with(), Storage(str(tmp_path / "mine")))
    assert files_under(tmp_path / "mine") == ["prepare/notes.txt"] and toy.calls == {}
