"""data -> teacher -> transfer -> student -> evaluate on a tiny dataset, through the real runner."""

import glob

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from benchmark_scripts import load_benchmark

from kdray.distill.student import validation_logits
from kdray.distill.transfer import read_transfer
from kdray.evaluation.evaluate import RESULTS, format_results_table
from kdray.evaluation.inference import ModelRef, features
from kdray.pipeline import pipeline_stages, run_pipeline
from kdray.runtime.artifacts import load_bundle
from kdray.runtime.stage import read_stage_manifest


@pytest.fixture(scope="module")
def finished_run(distilled_run):
    return distilled_run.config, distilled_run.run, distilled_run.first, distilled_run.full


def test_stages_ran_once_and_rerun_recomputes_nothing(finished_run):
    config, run, first, full = finished_run
    assert [o.status for o in first] == ["ran", "ran"]
    assert {o.name: o.status for o in full} == {
        "data": "skipped", "teacher": "skipped", "transfer": "ran", "student": "ran", "sweep": "disabled",
        "clustering": "disabled", "specialists": "disabled", "evaluate": "ran", "report": "ran"}
    again = run_pipeline(pipeline_stages(), config, run, progress=False, log=lambda _: None)
    assert {o.status for o in again} == {"skipped", "disabled"}


def test_transfer_logits_equal_the_teachers_outputs(finished_run):
    _, run, _, _ = finished_run
    teacher, _ = load_bundle(run.child("teacher"), "member-00")
    shards = read_transfer(read_stage_manifest(run, "transfer")["outputs"]["transfer"])
    table = pa.concat_tables(shards.iter_batches(batch_format="pyarrow"))
    with torch.no_grad():
        expected = teacher(torch.from_numpy(features(table))).numpy()
    np.testing.assert_allclose(features(table, "t"), expected, rtol=1e-5, atol=1e-5)
    labels = table.column("y").to_numpy()
    assert 3 not in set(labels) and len(labels) > 0.6 * 800  # class 3 omitted, the rest kept


def test_student_baseline_and_results(finished_run):
    _, run, _, _ = finished_run
    results = run.read_json(RESULTS)
    models = results["models"]
    assert {"teacher", "student", "baseline", "student-corrected"} <= set(models)
    for name in ("teacher", "student", "baseline"):
        assert models[name]["test"]["rows"] == 200
        assert models[name]["test"]["error_rate"] < 0.75  # better than chance on 4 blobs
    student_bias = load_bundle(run.child("student"), "student-corrected")[1].logit_bias
    assert len(student_bias) == 4 and abs(sum(student_bias)) < 1e-4
    exported = torch.export.load(run.child("student").path("student", "model.pt2")).module()
    model, _ = load_bundle(run.child("student"), "student")
    x = torch.randn(5, 6)
    torch.testing.assert_close(exported(x), model(x))


def test_errors_on_the_omitted_class_are_counted_for_each_model(finished_run):
    config, run, _, _ = finished_run
    test = pq.read_table(sorted(glob.glob(f"{config.data.path}/test-*.parquet")))
    x, y = torch.from_numpy(features(test)), test.column("y").to_numpy()
    results = run.read_json(RESULTS)

    omitted = results["omitted_classes"]

    assert omitted["test_rows"] == {"3": int((y == 3).sum())}
    for name in ("student", "student-corrected"):
        model, _ = load_bundle(run.child("student"), name)
        with torch.no_grad():
            wrong = model(x).argmax(1).numpy() != y
        assert omitted["errors"][name] == {"all": int(wrong.sum()), "3": int(wrong[y == 3].sum())}, name
    assert load_benchmark("distill_results").run_figures(run)["omitted"]["errors"] == omitted["errors"]
    table = format_results_table(results)
    assert f"class 3 (c3), left out of the transfer set: errors on its {(y == 3).sum()} test rows: " in table
    assert f"student {omitted['errors']['student']['3']}," in table


def test_the_bias_fit_holds_a_fixed_sample_of_a_big_validation_split(finished_run):
    config, run, _, _ = finished_run
    student = ModelRef(run.child("student").location, ("student",), ())
    logits, labels = validation_logits(student, config.data.path)
    assert logits.shape == (200, 4) and labels.shape == (200,)  # all 800 logits fit the default budget
    sampled, sampled_labels = validation_logits(student, config.data.path, max_logits=200)
    again, _ = validation_logits(student, config.data.path, max_logits=200)
    assert 20 <= len(sampled) <= 80 and torch.equal(sampled, again)  # about a quarter, the same each time
    # Each sampled row's logits are that row's: they appear among the whole split's (to float32
    # rounding: the rows meet the model in other batches).
    nearest = torch.cdist(sampled.double(), logits.double()).min(1)
    assert (nearest.values < 1e-4).all()
    assert torch.equal(labels[nearest.indices], sampled_labels)
