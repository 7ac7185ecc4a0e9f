"""A pipeline stage on a `file://` storage path: every artifact lands under the URI's directory, is
recorded (stage manifest, dataset manifest with each shard's hash), and is read back through the
URI, by the driver and by Ray tasks; nothing is written anywhere else, such as a `file:` directory
that code treating the URI as a local path would create in the working directory."""

from __future__ import annotations

import hashlib
import json
import os

import ray

from kdray.config import config_from_dict
from kdray.data.validate import inspect_dataset
from kdray.pipeline import pipeline_stages, run_pipeline
from kdray.runtime.stage import read_stage_manifest
from kdray.runtime.storage import Storage

SYNTH = {"rows": 120, "validation_rows": 24, "test_rows": 24, "classes": 3, "groups": 1, "dim": 4, "shards": 2}


@ray.remote(num_cpus=0)
def _working_directory() -> str:
    return os.getcwd()


def files_under(directory) -> set[str]:
    return {os.path.relpath(os.path.join(d, f), directory) for d, _, fs in os.walk(directory) for f in fs}


def test_the_data_stage_writes_and_reads_every_artifact_through_a_file_uri(ray_local, tmp_path, monkeypatch):
    root, cwd = tmp_path / "store", tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    config = config_from_dict({"data": {"source": "synth", "synth": SYNTH},
                               "storage": {"storage_path": f"file://{root}", "run_name": "uri"}})
    run = Storage(config.storage.storage_path).child(config.storage.run_name)
    assert run.location == f"file://{root}/uri"

    data = pipeline_stages()[:1]
    [outcome] = run_pipeline(data, config, run, progress=False, log=lambda _: None)
    assert outcome.status == "ran"

    # Everything is under the URI's directory, and accounted for.
    on_disk_stage = json.loads((root / "uri" / "data" / "manifest.json").read_text())
    assert on_disk_stage["outputs"] == {"dataset": "./data/dataset"}  # relative to the run, so it can move
    stage = read_stage_manifest(run, "data")
    assert stage["outputs"] == {"dataset": f"file://{root}/uri/data/dataset"}  # downstream reads the URI
    dataset = json.loads((root / "uri" / "data" / "dataset" / "manifest.json").read_text())
    shards = {shard["file"]: shard for shard in dataset["shards"]}
    on_disk = files_under(root / "uri")
    assert on_disk == {"config.yaml", "kdray-run.json", "data/.attempt", "data/manifest.json",
                       "data/dataset/manifest.json",
                       *(f"data/dataset/{name}" for name in shards)}, on_disk  # no stray or .tmp-* files
    for name, shard in shards.items():
        content = (root / "uri" / "data" / "dataset" / name).read_bytes()
        assert (len(content), hashlib.sha256(content).hexdigest()) == (shard["bytes"], shard["sha256"])
    assert sorted(os.listdir(tmp_path)) == ["cwd", "store"]
    for directory in {str(cwd), ray.get(_working_directory.remote())}:
        assert not any(name.startswith("file:") for name in os.listdir(directory)), directory

    # Read back through the URI: Ray tasks check every shard; a re-run finds the stage done.
    report = inspect_dataset(Storage(stage["outputs"]["dataset"]))
    assert report.manifest.rows() == 168 and {r.file for r in report.shards} == set(shards)
    [again] = run_pipeline(data, config, run, progress=False, log=lambda _: None)
    assert again.status == "skipped" and again.manifest == stage
