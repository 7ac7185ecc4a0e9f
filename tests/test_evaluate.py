"""The evaluate stage and `predict` on a real local Ray, against numpy-computed answers.

The models are tiny nets whose weights the test sets, so every logit is recomputed here with numpy
from the same weights: the metrics Ray computes must match those exactly (error counts, confusion)
or to float32 precision (NLL).
"""

import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from kdray.config import AUTO_TOP_K, DENSE_CLASSES, Config, kept_classes
from kdray.data.shards import DatasetError, DatasetManifest, shard_name, shard_table, write_manifest, write_shard
from kdray.evaluation.evaluate import (
    RESULTS,
    RunError,
    evaluate_models,
    evaluate_run,
    format_results_table,
    run_evaluate,
    run_manifests,
)
from kdray.evaluation.inference import ModelRef, map_logits
from kdray.evaluation.metrics import ClassificationStats
from kdray.evaluation.predict import PREDICTIONS, predict, prediction_rows
from kdray.runtime.artifacts import ModelSpec, save_bundle
from kdray.runtime.stage import StageContext
from kdray.runtime.storage import Storage, StorageError

CLASSES, DIM, ROWS = 3, 4, 300
UNLABELED_TEST_ROWS = 10  # the last test rows are labelled -1: evaluation must skip them
MEANS = np.array([[2.0, 0.0, 0.0, 1.0], [0.0, 2.0, 0.0, -1.0], [0.0, 0.0, 2.0, 0.0]], dtype=np.float32)


# ------------------------------------------------------------------------------------ fixtures
def write_dataset(location: str) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """3 overlapping Gaussian blobs in 4-d, 300 rows per split in 2 shards; returns split -> (ids, x, y)."""
    rng = np.random.default_rng(7)
    storage, shards, splits, next_id = Storage(location), [], {}, 0
    for split in ("train", "validation", "test"):
        y = rng.integers(0, CLASSES, size=ROWS)
        x = (MEANS[y] + rng.normal(scale=1.2, size=(ROWS, DIM))).astype(np.float32)
        if split == "test":
            y[-UNLABELED_TEST_ROWS:] = -1
        ids = np.arange(next_id, next_id + ROWS) * 3 + 5  # not 0..N-1, so a row index is not mistaken for an id
        next_id += ROWS
        for index, part in enumerate(np.array_split(np.arange(ROWS), 2)):
            shards.append(write_shard(storage, shard_name(split, index), split, shard_table(ids[part], x[part], y[part])))
        splits[split] = (ids, x, y)
    write_manifest(storage, DatasetManifest(CLASSES, (DIM,), tuple(shards)))
    return splits


def linear_state(weight: np.ndarray, bias: np.ndarray) -> dict[str, torch.Tensor]:
    """mlp with hidden=() is logistic regression: its only layer is the head."""
    return {"head.weight": torch.tensor(weight, dtype=torch.float32), "head.bias": torch.tensor(bias, dtype=torch.float32)}


def mlp_state(seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    shapes = {"body.linear1.weight": (8, DIM), "body.linear1.bias": (8,), "head.weight": (CLASSES, 8), "head.bias": (CLASSES,)}
    return {name: torch.randn(shape, generator=generator) for name, shape in shapes.items()}


def numpy_logits(state: dict[str, torch.Tensor], x: np.ndarray) -> np.ndarray:
    weights = {name: tensor.numpy().astype(np.float64) for name, tensor in state.items()}
    hidden = x.astype(np.float64)
    if "body.linear1.weight" in weights:
        hidden = np.maximum(hidden @ weights["body.linear1.weight"].T + weights["body.linear1.bias"], 0.0)
    return hidden @ weights["head.weight"].T + weights["head.bias"]


def numpy_log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


STATES = {
    # nearest class mean: w_c = mu_c, b_c = -|mu_c|^2 / 2
    "teacher/member-00": linear_state(MEANS, -0.5 * (MEANS ** 2).sum(axis=1)),
    # a noisier nearest-mean rule whose mistakes differ, so averaging the two gains accuracy
    "teacher/member-01": linear_state(MEANS + np.random.default_rng(0).normal(scale=0.5, size=MEANS.shape),
                                      -0.5 * (MEANS ** 2).sum(axis=1) + np.random.default_rng(0).normal(scale=0.3, size=CLASSES)),
    # A random net as the baseline and a crude linear student: the teacher beats the baseline, so
    # the derived figures (defined only for a positive gap) exist.
    "baseline": mlp_state(seed=3),
    "student": linear_state(np.eye(CLASSES, DIM), np.zeros(CLASSES)),
}
BUNDLES = {"teacher/member-00": ("teacher", "member-00"), "teacher/member-01": ("teacher", "member-01"),
           "baseline": ("student", "baseline"), "student": ("student", "student")}


def model_logits(name: str, x: np.ndarray) -> np.ndarray:
    """numpy logits of a model of the hand-made run; the teacher is its members' log-mean-probability."""
    if name == "teacher":
        members = [numpy_log_softmax(model_logits(m, x)) for m in ("teacher/member-00", "teacher/member-01")]
        return np.log(np.mean(np.exp(members), axis=0))
    return numpy_logits(STATES[name], x)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, ray_local):
    """A hand-made run: data, teacher (2-member ensemble) and student stage manifests plus bundles."""
    root = tmp_path_factory.mktemp("evaluate")
    splits = write_dataset(str(root / "dataset"))
    run = Storage(str(root / "run"))
    for name, state in STATES.items():
        stage, bundle = BUNDLES[name]
        hidden = [8] if "body.linear1.weight" in state else []
        save_bundle(run.child(stage), bundle, ModelSpec("mlp", {"hidden": hidden}, (DIM,), CLASSES), state)
    teacher, student = run.child("teacher").location, run.child("student").location
    models = {
        "teacher": {"teacher/member-00": {"location": teacher, "bundles": ["member-00"]},
                    "teacher/member-01": {"location": teacher, "bundles": ["member-01"]},
                    "teacher": {"location": teacher, "bundles": ["member-00", "member-01"]}},
        "student": {"student": {"location": student, "bundles": ["student"]},
                    "baseline": {"location": student, "bundles": ["baseline"]}},
    }
    run.write_json({"stage": "data", "fingerprint": "d", "outputs": {"dataset": str(root / "dataset")}}, "data", "manifest.json")
    for stage, published in models.items():
        # `inputs` as the pipeline records them: what orders a run's stages when it is read back
        inputs = {"data": "d", **({"teacher": "t"} if stage == "student" else {})}
        run.write_json({"stage": stage, "fingerprint": stage[0], "inputs": inputs, "outputs": {"models": published}},
                       stage, "manifest.json")
    return run, str(root / "dataset"), splits


def expected_stats(name: str, x: np.ndarray, y: np.ndarray) -> dict:
    """Reference figures computed here with numpy only."""
    labelled = y >= 0
    logits, y = model_logits(name, x)[labelled], y[labelled]
    predicted = logits.argmax(axis=1)
    confusion = np.zeros((CLASSES, CLASSES), dtype=np.int64)
    np.add.at(confusion, (y, predicted), 1)
    nll = -numpy_log_softmax(logits)[np.arange(len(y)), y].mean()
    return {"rows": len(y), "errors": int((predicted != y).sum()), "nll": nll, "confusion": confusion.tolist(),
            "ece": ClassificationStats.from_logits(logits, y).ece}


# ------------------------------------------------------------------------------------ evaluate
def test_evaluate_models_matches_numpy_for_single_models_and_the_ensemble(run_dir):
    run, data, splits = run_dir
    _, x, y = splits["test"]
    teacher, student = run.child("teacher").location, run.child("student").location
    models = {"teacher/member-00": ModelRef(teacher, ("member-00",)), "teacher/member-01": ModelRef(teacher, ("member-01",)),
              "teacher": ModelRef(teacher, ("member-00", "member-01")), "student": ModelRef(student, ("student",))}
    results = evaluate_models(data, "test", models, batch_size=64)

    assert list(results) == list(models)
    for name, metrics in results.items():
        expected = expected_stats(name, x, y)
        assert metrics["rows"] == ROWS - UNLABELED_TEST_ROWS
        assert metrics["errors"] == expected["errors"], name
        assert metrics["confusion"] == expected["confusion"], name
        assert metrics["nll"] == pytest.approx(expected["nll"], abs=1e-5), name
        assert metrics["ece"] == pytest.approx(expected["ece"], abs=1e-5), name
        assert metrics["error_rate"] == expected["errors"] / expected["rows"]
    # The models differ, so a mix-up between them (or members instead of the ensemble) would show.
    assert len({results[name]["nll"] for name in models}) == len(models)
    assert all(metrics["errors"] > 0 for metrics in results.values())


def test_evaluate_run_writes_results_with_derived_figures_and_a_table(run_dir):
    run, _, splits = run_dir
    results = evaluate_run(run.location)

    assert run.read_json(RESULTS) == results
    assert set(results["models"]) == {"teacher/member-00", "teacher/member-01", "teacher", "student", "baseline"}
    assert results["splits"] == ["test", "validation"]
    for name, value in results["models"].items():
        for split in ("test", "validation"):
            _, x, y = splits[split]
            assert value[split]["errors"] == expected_stats(name, x, y)["errors"], (name, split)
        assert "confusion" in value["test"] and "confusion" not in value["validation"]
    test = {name: value["test"] for name, value in results["models"].items()}
    assert test["teacher"]["errors"] < test["baseline"]["errors"]  # both derived figures are defined
    assert results["derived"]["gap_recovered"] == pytest.approx(
        (test["baseline"]["errors"] - test["student"]["errors"]) / (test["baseline"]["errors"] - test["teacher"]["errors"]))
    member_mean = (test["teacher/member-00"]["accuracy"] + test["teacher/member-01"]["accuracy"]) / 2
    assert results["derived"]["ensemble_gain_kept"] == pytest.approx(
        (test["student"]["accuracy"] - member_mean) / (test["teacher"]["accuracy"] - member_mean))

    table = format_results_table(results)
    for name, value in test.items():
        row = next(line for line in table.splitlines() if line.startswith(name + " "))
        assert f"{value['errors']}/{value['rows']}" in row and f"{100 * value['error_rate']:.2f}" in row
    assert "gap recovered" in table and "ensemble gain kept" in table


def test_run_evaluate_stage_writes_both_results_files_and_a_headline_summary(run_dir, tmp_path):
    run, _, _ = run_dir
    inputs = run_manifests(run)
    del inputs["teacher"]  # the student stage's models alone: no teacher, so no derived figures
    output = run.child("evaluate")
    context = StageContext(Config(), run, output, run.child("_work", "evaluate-x"), inputs, progress=False)
    result = run_evaluate(context)

    assert output.read_json(RESULTS) == run.read_json(RESULTS)
    results = run.read_json(RESULTS)
    assert set(results["models"]) == {"student", "baseline"} and results["derived"] == {}
    assert result.summary["student_test_error"] == round(results["models"]["student"]["test"]["error_rate"], 5)
    assert "teacher_test_error" not in result.summary and result.outputs == {"results": output.uri(RESULTS)}


def test_a_run_without_stage_manifests_is_refused(tmp_path):
    with pytest.raises(RunError, match="no finished stage"):
        evaluate_run(str(tmp_path))


# ------------------------------------------------------------------------------------ predict
def test_predict_writes_every_row_with_numpy_argmax_and_probabilities(run_dir, tmp_path):
    run, data, splits = run_dir
    written = predict(run.location, data, str(tmp_path / "out"), model="teacher")

    assert written == 3 * ROWS
    manifest = Storage(str(tmp_path / "out")).read_json(PREDICTIONS)
    assert manifest["model"] == "teacher" and manifest["rows"] == written and manifest["files"]
    table = pq.read_table(str(tmp_path / "out" / "shards")).sort_by("id")
    assert table.schema.field("probabilities").type == pa.list_(pa.float32(), CLASSES)
    ids = np.concatenate([splits[s][0] for s in ("train", "validation", "test")])
    x = np.concatenate([splits[s][1] for s in ("train", "validation", "test")])
    order = np.argsort(ids)
    np.testing.assert_array_equal(table.column("id").to_numpy(), ids[order])
    logits = model_logits("teacher", x[order])
    np.testing.assert_array_equal(table.column("prediction").to_numpy(), logits.argmax(axis=1))
    probabilities = np.stack(table.column("probabilities").to_numpy(zero_copy_only=False))
    np.testing.assert_allclose(probabilities, np.exp(numpy_log_softmax(logits)), atol=1e-5)


def test_predict_can_write_each_rows_top_classes_instead(run_dir, tmp_path):
    run, data, splits = run_dir
    predict(run.location, data, str(tmp_path / "out"), model="teacher", top_k=2)
    assert Storage(str(tmp_path / "out")).read_json(PREDICTIONS)["columns"] == \
        ["id", "prediction", "top_classes", "top_probabilities"]
    table = pq.read_table(str(tmp_path / "out" / "shards")).sort_by("id")
    assert "probabilities" not in table.column_names
    x = np.concatenate([splits[s][1] for s in ("train", "validation", "test")])
    ids = np.concatenate([splits[s][0] for s in ("train", "validation", "test")])
    probabilities = np.exp(numpy_log_softmax(model_logits("teacher", x[np.argsort(ids)])))
    top = np.stack(table.column("top_classes").to_numpy(zero_copy_only=False))
    expected = np.argsort(-probabilities, axis=1, kind="stable")[:, :2]
    np.testing.assert_array_equal(top, expected)
    np.testing.assert_allclose(np.stack(table.column("top_probabilities").to_numpy(zero_copy_only=False)),
                               np.take_along_axis(probabilities, expected, axis=1), atol=1e-5)


def test_kept_classes_follow_the_setting_and_the_class_count():
    assert kept_classes(None, 20_000) is None and kept_classes(7, 10) == 7
    assert kept_classes("auto", DENSE_CLASSES) is None  # every class up to the threshold
    assert kept_classes("auto", DENSE_CLASSES + 1) == AUTO_TOP_K


def test_predict_names_the_available_models_for_an_unknown_one(run_dir, tmp_path):
    run, data, _ = run_dir
    with pytest.raises(RunError, match=r"no model 'specialists'.*teacher/member-00.*student"):
        predict(run.location, data, str(tmp_path / "out"), model="specialists")


def test_prediction_rows_checks_a_plain_parquet_directory(tmp_path, ray_local):
    pq.write_table(pa.table({"id": [1, 2], "features": [[0.0], [1.0]]}), str(tmp_path / "rows.parquet"))
    with pytest.raises(DatasetError, match="'x' column"):
        prediction_rows(Storage(str(tmp_path)))
    with pytest.raises(DatasetError, match="neither a kdray dataset"):
        prediction_rows(Storage(str(tmp_path / "missing")))
    x = pa.FixedSizeListArray.from_arrays(pa.array(np.arange(8, dtype=np.float32)), DIM)
    pq.write_table(pa.table({"id": pa.array([10, 11]), "x": x}), str(tmp_path / "rows.parquet"))
    rows, width = prediction_rows(Storage(str(tmp_path)))
    assert width == DIM and rows.columns() == ["id", "x"]


def test_predict_refuses_to_write_into_its_data(run_dir):
    run, data, _ = run_dir
    with pytest.raises(StorageError, match="must not contain each other"):
        predict(run.location, data, data + "/predictions")


# ------------------------------------------------------------------------------------ extension point
def member_zero_logits(dataset, run, manifest, model, batch_size, trusted):
    """A stand-in combiner for the COMBINERS hook: the first bundle of the stage's model entry."""
    entry = manifest["outputs"]["models"][model]
    return map_logits(dataset, ModelRef(entry["location"], (entry["bundles"][0],), trusted), batch_size=batch_size)


def test_a_registered_combiner_evaluates_its_stages_models(run_dir, monkeypatch):
    from kdray.evaluation import evaluate

    run, _, splits = run_dir
    manifests = run_manifests(run)
    teacher = manifests["teacher"]["outputs"]["models"]["teacher"]
    manifests = {"data": manifests["data"],
                 "specialists": {"outputs": {"models": {"combined": {**teacher, "combiner": "test"}}}}}
    monkeypatch.setitem(evaluate.COMBINERS, "specialists", f"{__name__}:member_zero_logits")
    results = evaluate.evaluate_manifests(run, manifests)

    _, x, y = splits["test"]
    combined = results["models"]["combined"]
    assert combined["stage"] == "specialists"
    assert combined["test"]["errors"] == expected_stats("teacher/member-00", x, y)["errors"]
    assert combined["validation"]["rows"] == ROWS
    assert not math.isnan(combined["test"]["nll"])
