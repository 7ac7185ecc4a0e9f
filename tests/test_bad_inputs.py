"""Hostile and careless input through the real CLI (`kdray.cli.main`, in-process): every error a user
can cause is one short `kdray: error:` naming the thing (exit 2, no traceback), nothing is lost, and
no file on disk can make kdray import code.

The table drives commands that refuse before Ray starts; the data-loss tests that need Ray use the
session's Ray (`ray_local`), which the CLI joins instead of starting its own.
"""

from __future__ import annotations

import json
import pickle
import re
import shutil
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from test_cli import TINY
from test_idx import tiny_images, write_idx
from tiny_data import write_blobs

from kdray.cli import main
from kdray.evaluation.evaluate import check_run_models, run_manifests
from kdray.runtime.artifacts import ModelSpec, save_bundle
from kdray.runtime.storage import Storage

DIM, CLASSES = 6, 4


def kdray(argv: list[str], capsys) -> tuple[int, str]:
    code = main([str(arg) for arg in argv])
    captured = capsys.readouterr()
    return code, captured.err


def tree(path: Path) -> dict[str, bytes]:
    """Every file under `path` with its bytes: what 'nothing lost' compares."""
    return {str(file.relative_to(path)): file.read_bytes() for file in sorted(path.rglob("*")) if file.is_file()}


# ------------------------------------------------------------------------------------ a hand-made run
def make_run(root: Path) -> Path:
    """A finished run as the pipeline writes it: a dataset inside the run, a student bundle, and stage
    manifests naming both relative to the run directory."""
    run = root / "run"
    write_blobs(str(run / "data" / "dataset"), classes=CLASSES, dim=DIM, rows=(40, 20, 20), shards_per_split=1)
    spec = ModelSpec("mlp", {"hidden": [8]}, (DIM,), CLASSES)
    save_bundle(Storage(str(run / "student")), "student", spec, spec.build().state_dict())
    write_json(run / "data" / "manifest.json", {"stage": "data", "fingerprint": "d",
                                               "outputs": {"dataset": "./data/dataset"}})
    write_json(run / "student" / "manifest.json", {
        "stage": "student", "fingerprint": "s",
        "outputs": {"models": {"student": {"location": "./student", "bundles": ["student"]}}}})
    (run / "kdray-run.json").write_text("{}")
    return run


def write_json(path: Path, value) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value))


@pytest.fixture
def run(tmp_path) -> Path:
    return make_run(tmp_path)


def edit_json(path: Path, change: Callable[[dict], object]) -> None:
    value = json.loads(path.read_text())
    path.write_text(json.dumps(change(value)))


def student_manifest(run: Path) -> Path:
    return run / "student" / "manifest.json"


def student_spec(run: Path) -> Path:
    return run / "student" / "student" / "model.json"


class MarkerPickle:
    """Unpickling this creates a file: what a model.pt that runs code would do."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


# ------------------------------------------------------------------------------------ the table
def idx_source(directory: Path) -> Path:
    directory.mkdir()
    write_idx(directory / "train-images-idx3-ubyte", tiny_images(30, 1))
    write_idx(directory / "train-labels-idx1-ubyte", np.arange(30, dtype=np.uint8) % 10)
    write_idx(directory / "t10k-images-idx3-ubyte", tiny_images(10, 2))
    write_idx(directory / "t10k-labels-idx1-ubyte", np.arange(10, dtype=np.uint8) % 10)
    return directory


def inspect_edited(run: Path, change: Callable[[dict], object]) -> list:
    """`kdray data inspect` on the run's dataset after `change` to its manifest."""
    edit_json(run / "data" / "dataset" / "manifest.json", change)
    return ["data", "inspect", run / "data" / "dataset"]


def symlink_shard_outside(tmp_path: Path, run: Path) -> None:
    shard = run / "data" / "dataset" / "train-00000.parquet"
    shutil.copy(shard, tmp_path / "outside.parquet")
    shard.unlink()
    shard.symlink_to(tmp_path / "outside.parquet")


def damage(path: Path, change: Callable[[bytes], bytes]) -> None:
    path.write_bytes(change(path.read_bytes()))



# Each case: (id, function(tmp_path, run) -> argv, pattern the one-line error must match).
def config_file(tmp_path: Path, text: str | bytes) -> Path:
    path = tmp_path / "config.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


ALIAS_BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{b}: &{b} [{', '.join([f'*{a}'] * 9)}]\n" for a, b in zip("abcdefgh", "bcdefghi"))

CASES = [
    # --set overrides
    ("set without =", lambda t, r: ["config", "show", "--set", "distill.temperature"], r"must look like section\.key=value"),
    ("set empty key part", lambda t, r: ["config", "show", "--set", "distill..temperature=2"], "must look like"),
    ("set bad YAML", lambda t, r: ["config", "show", "--set", "distill.temperature=[1,"], r"invalid YAML in override distill\.temperature"),
    ("set unknown key", lambda t, r: ["config", "show", "--set", "distill.temprature=2"], r"distill\.temprature: unknown key"),
    ("set into a value", lambda t, r: ["config", "show", "--set", "distill.temperature.x=1"], r"distill\.temperature: not a section"),
    ("set NaN", lambda t, r: ["config", "show", "--set", "distill.temperature=.nan"], r"distill\.temperature: .*finite"),
    ("set run name with newline", lambda t, r: ["config", "show", "--set", 'storage.run_name="a\\n"'], "run_name"),
    ("set run name climbing out", lambda t, r: ["config", "show", "--set", "storage.run_name=../x"], "run_name"),
    # config files
    ("config missing", lambda t, r: ["config", "show", t / "nope.yaml"], r"cannot read config .*nope\.yaml"),
    ("config is a directory", lambda t, r: ["config", "show", t], "cannot read config"),
    ("config not UTF-8", lambda t, r: ["config", "show", config_file(t, b"distill:\n  temperature: \xff\xfe\n")], r"config\.yaml: not UTF-8"),
    ("config a list", lambda t, r: ["config", "show", config_file(t, "- 1\n- 2\n")], "top level must be a mapping"),
    ("config duplicate key", lambda t, r: ["config", "show", config_file(t, "distill:\n  temperature: 2\n  temperature: 3\n")],
     r"duplicate key 'temperature' \(first at line 2\)"),
    ("config duplicate section", lambda t, r: ["config", "show", config_file(t, "distill: {}\nteacher: {}\ndistill: {}\n")],
     "duplicate key 'distill'"),
    ("config recursive alias", lambda t, r: ["config", "show", config_file(t, "distill: &d {student: *d}\n")], "refers to a node that contains it"),
    ("config deep nesting", lambda t, r: ["config", "show", config_file(t, "x: " + "[" * 3000 + "]" * 3000)], "nested too deeply"),
    ("config python tag", lambda t, r: ["config", "show", config_file(t, "x: !!python/object/apply:os.system [echo hi]\n")],
     "could not determine a constructor"),
    ("config unknown section", lambda t, r: ["config", "show", config_file(t, "distil: {}\n")], "distil: unknown key"),
    ("config data path missing", lambda t, r: ["config", "show", config_file(t, f"data: {{source: parquet, path: {t}/none}}\n")],
     r"data\.path: .*does not exist"),
    # kdray run: its run directory
    ("run into a dataset", lambda t, r: ["run", config_file(t, TINY), "--storage-path", r / "data", "--run-name", "dataset"],
     "is not a kdray run"),
    ("run with its data inside it", lambda t, r: ["run", config_file(t, TINY), "--storage-path", r.parent, "--run-name", "run",
                                                  "--set", "data.source=parquet", "--set", f"data.path={r / 'data' / 'dataset'}"],
     "must not contain each other"),
    # evaluate / predict on a damaged run
    ("evaluate a non-run", lambda t, r: ["evaluate", t], "no finished stage"),
    ("manifest a JSON list", lambda t, r: (student_manifest(r).write_text("[1, 2]"), ["evaluate", r])[1],
     r"student/manifest\.json is not a stage manifest"),
    ("manifest outputs a list", lambda t, r: (edit_json(student_manifest(r), lambda m: {**m, "outputs": [1]}), ["evaluate", r])[1],
     r"student/manifest\.json: outputs must be a JSON object"),
    ("manifest entry without bundles", lambda t, r: (edit_json(student_manifest(r), lambda m: {
        **m, "outputs": {"models": {"student": {"location": "./student"}}}}), ["evaluate", r])[1], "needs 'location' and 'bundles'"),
    ("manifest location climbing out", lambda t, r: (edit_json(student_manifest(r), lambda m: {
        **m, "outputs": {"models": {"student": {"location": "./../elsewhere", "bundles": ["student"]}}}}), ["evaluate", r])[1],
     "escapes storage root"),
    ("manifest location outside the run", lambda t, r: (edit_json(student_manifest(r), lambda m: {
        **m, "outputs": {"models": {"student": {"location": str(t), "bundles": ["student"]}}}}), ["evaluate", r])[1],
     "outside the run"),
    ("model.json a list", lambda t, r: (student_spec(r).write_text("[]"), ["evaluate", r])[1], r"model\.json: <root>"),
    ("model.json not JSON", lambda t, r: (student_spec(r).write_bytes(b"\xff{"), ["evaluate", r])[1], r"model\.json: not valid JSON"),
    ("model.json negative outputs", lambda t, r: (edit_json(student_spec(r), lambda s: {**s, "num_outputs": -4}), ["evaluate", r])[1],
     r"model\.json: num_outputs: .*greater than 0"),
    ("model.json unknown model", lambda t, r: (edit_json(student_spec(r), lambda s: {**s, "name": "resnet9000"}), ["evaluate", r])[1],
     "unknown model 'resnet9000'"),
    ("model.json bad option", lambda t, r: (edit_json(student_spec(r), lambda s: {**s, "options": {"depth": 3}}), ["evaluate", r])[1],
     r"model\.json: .*depth"),
    ("model.json names a factory", lambda t, r: (edit_json(student_spec(r), lambda s: {**s, "name": "os:system"}), ["evaluate", r])[1],
     r"names the model factory 'os:system'.*--trust-code"),
    ("model.pt missing", lambda t, r: ((r / "student" / "student" / "model.pt").unlink(), ["evaluate", r])[1], r"model\.pt not found"),
    ("model.pt random bytes", lambda t, r: ((r / "student" / "student" / "model.pt").write_bytes(b"\x00" * 64), ["evaluate", r])[1],
     r"model\.pt is not a weights file kdray can load safely"),
    ("model.pt wrong shapes", lambda t, r: (edit_json(student_spec(r), lambda s: {**s, "options": {"hidden": [9]}}), ["evaluate", r])[1],
     r"model\.pt does not fit the model its model\.json describes"),
    ("predict unknown model", lambda t, r: ["predict", r, r / "data" / "dataset", t / "out", "--model", "teacher"], "has no model 'teacher'"),
    ("predict into its data", lambda t, r: ["predict", r, r / "data" / "dataset", r / "data" / "dataset" / "p"], "must not contain each other"),
    ("predict into the run", lambda t, r: ["predict", r, t / "elsewhere", r / "transfer"], "must not contain each other"),
    ("predict over the data's parent", lambda t, r: ["predict", r, r / "data" / "dataset", r.parent], "must not contain each other"),
    ("predict into a user's directory", lambda t, r: ((t / "mine").mkdir(), (t / "mine" / "notes.txt").write_text("x"),
                                                      ["predict", r, r / "data" / "dataset", t / "mine"])[2],
     "holds files but no kdray predictions"),
    # datasets
    ("synth bad option", lambda t, r: ["data", "synth", t / "out", "--classes", "0"], "--classes: .*greater than 0"),
    ("synth groups over classes", lambda t, r: ["data", "synth", t / "out", "--classes", "3", "--groups", "5"], "groups"),
    ("synth into a user's directory", lambda t, r: ((t / "notes.txt").write_text("x"), ["data", "synth", t])[1],
     "holds files but no kdray dataset"),
    ("synth over a dataset", lambda t, r: ["data", "synth", r / "data" / "dataset"], r"manifest\.json exists; pass --overwrite"),
    ("synth over a run stage", lambda t, r: ["data", "synth", r / "student", "--overwrite"], "holds files but no kdray dataset"),
    ("import-idx onto its source", lambda t, r: ["data", "import-idx", t, t], "must not contain each other"),
    ("import-idx into its source", lambda t, r: ["data", "import-idx", t, t / "out"], "must not contain each other"),
    ("import-idx missing source", lambda t, r: ["data", "import-idx", t / "none", t / "out"], "none"),
    ("fetch onto its source", lambda t, r: ["data", "fetch", "mnist", t, "--source", t], "must not contain each other"),
    ("inspect a non-dataset", lambda t, r: ["data", "inspect", t], r"manifest\.json not found"),
    ("inspect a list manifest", lambda t, r: ((r / "data" / "dataset" / "manifest.json").write_text("[]"),
                                              ["data", "inspect", r / "data" / "dataset"])[1], r"manifest\.json"),
    ("dataset split not a split", lambda t, r: inspect_edited(r, lambda m: {**m, "shards": [
        {**m["shards"][0], "split": "dev"}, *m["shards"][1:]]}), r"split .*'dev'"),
    ("dataset negative classes", lambda t, r: inspect_edited(r, lambda m: {**m, "num_classes": -3}), "num_classes"),
    ("dataset without shards", lambda t, r: inspect_edited(r, lambda m: {**m, "shards": []}), "empty|no shards"),
    ("dataset shard path climbing out", lambda t, r: inspect_edited(r, lambda m: {**m, "shards": [
        {**m["shards"][0], "file": "../elsewhere.parquet"}, *m["shards"][1:]]}), "inside the dataset directory"),
    ("dataset shard listed twice", lambda t, r: inspect_edited(r, lambda m: {**m, "shards": [m["shards"][0], *m["shards"]]}),
     "listed twice"),
    ("dataset ids repeat in a shard", lambda t, r: inspect_edited(r, lambda m: {**m, "shards": [
        {**m["shards"][0], "id_max": 3}, *m["shards"][1:]]}), "id"),
    ("dataset shard a symlink outside", lambda t, r: (symlink_shard_outside(t, r), ["data", "inspect", r / "data" / "dataset"])[1],
     "outside the dataset directory"),
    ("dataset manifest unknown field", lambda t, r: inspect_edited(r, lambda m: {**m, "labels": "y2"}), "labels"),
    ("run on a damaged parquet dataset", lambda t, r: (edit_json(r / "data" / "dataset" / "manifest.json",
                                                                  lambda m: {**m, "num_classes": "four"}),
                                                        ["run", config_file(t, TINY), "--storage-path", t / "runs", "--set",
                                                         "data.source=parquet", "--set", f"data.path={r / 'data' / 'dataset'}"])[1],
     "num_classes"),
    ("set a string for a number", lambda t, r: ["config", "show", "--set", "distill.temperature=hot"], r"distill\.temperature"),
    ("set zero workers", lambda t, r: ["config", "show", "--set", "resources.num_workers=0"], r"resources\.num_workers"),
    ("set a section to a number", lambda t, r: ["config", "show", "--set", "distill=5"], "distill"),
    ("set an unknown model", lambda t, r: ["config", "show", "--set", "teacher.model.name=resnet9000"], "unknown model 'resnet9000'"),
    ("set an omitted class beyond the classes", lambda t, r: ["run", config_file(t, TINY), "--storage-path", t / "runs",
                                                            "--set", "distill.transfer.omit_classes=[99]"], r"omit_classes: \[99\]"),
    ("set a model option it lacks", lambda t, r: ["run", config_file(t, TINY), "--storage-path", t / "runs",
                                                  "--set", "teacher.model.depth=3"], r"teacher\.model: .*depth"),
    ("config tab indentation", lambda t, r: ["config", "show", config_file(t, "distill:\n\ttemperature: 2\n")], "invalid YAML"),
    ("config a section that is a list", lambda t, r: ["config", "show", config_file(t, "teacher: [1, 2]\n")], "teacher"),
    ("synth negative rows", lambda t, r: ["data", "synth", t / "out", "--rows", "-1"], "--rows"),
    ("synth zero shards", lambda t, r: ["data", "synth", t / "out", "--shards", "0"], "--shards"),
    ("import-idx validation fraction 1.5", lambda t, r: ["data", "import-idx", idx_source(t / "idx"), t / "out",
                                                         "--validation-fraction", "1.5"], "validation_fraction"),
    ("import-idx zero rows per shard", lambda t, r: ["data", "import-idx", idx_source(t / "idx"), t / "out",
                                                     "--rows-per-shard", "0"], "rows_per_shard"),
    ("import-idx a file missing", lambda t, r: ((idx_source(t / "idx") / "t10k-labels-idx1-ubyte").unlink(),
                                                ["data", "import-idx", t / "idx", t / "out"])[1], "t10k-labels"),
    ("import-idx wrong magic", lambda t, r: (damage(idx_source(t / "idx") / "train-images-idx3-ubyte", lambda b: b"\x01" + b[1:]),
                                             ["data", "import-idx", t / "idx", t / "out"])[1], r"train-images-idx3-ubyte.*not an IDX"),
    ("import-idx truncated", lambda t, r: (damage(idx_source(t / "idx") / "train-images-idx3-ubyte", lambda b: b[:-50]),
                                           ["data", "import-idx", t / "idx", t / "out"])[1], r"train-images-idx3-ubyte.*truncated"),
    ("import-idx labels fewer than images", lambda t, r: (write_idx(idx_source(t / "idx") / "train-labels-idx1-ubyte",
                                                                    np.zeros(29, dtype=np.uint8)),
                                                          ["data", "import-idx", t / "idx", t / "out"])[1], "train-labels"),
    ("fetch validation fraction 0", lambda t, r: ["data", "fetch", "mnist", t / "out", "--validation-fraction", "0"],
     "validation_fraction"),
    ("address a dashboard URL", lambda t, r: ["data", "inspect", r / "data" / "dataset", "--address", "http://127.0.0.1:8265"],
     "is a dashboard URL"),
    ("address without a port", lambda t, r: ["evaluate", r, "--address", "127.0.0.1"], "is not HOST:PORT"),
    ("report a non-run", lambda t, r: ["report", t], "no finished stage"),
    ("report damaged results", lambda t, r: ((r / "results.json").write_text('["not", "results"]'), ["report", r])[1],
     r"results\.json is not a kdray results file"),
    ("storage path under a file", lambda t, r: ((t / "file").write_text("x"), ["run", config_file(t, TINY), "--storage-path",
                                                                            t / "file" / "runs"])[1], "not writable"),
    ("storage path unknown scheme", lambda t, r: ["run", config_file(t, TINY), "--storage-path", "nosuch://bucket/runs"],
     "cannot resolve storage location"),
]


@pytest.mark.parametrize("argv, pattern", [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_bad_input_is_one_named_error_without_a_traceback(tmp_path, run, capsys, argv, pattern):
    arguments = argv(tmp_path, run)  # sets the case up
    before = tree(tmp_path)
    code, err = kdray(arguments, capsys)

    assert tree(tmp_path) == before  # a refused command changes nothing

    assert code == 2, err
    assert err.startswith("kdray: error: ") and "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) <= 3 and all(len(line) <= 400 for line in lines), err
    assert re.search(pattern, err), err


def test_the_bad_input_table_is_large_and_its_refusals_name_distinct_things():
    assert len(CASES) >= 75 and len({case[0] for case in CASES}) == len(CASES)


@pytest.mark.timeout(30)
def test_an_alias_bomb_is_refused_quickly_showing_no_expansion(tmp_path, capsys):
    code, err = kdray(["config", "show", config_file(tmp_path, ALIAS_BOMB)], capsys)
    assert code == 2 and "expands to more than" in err and len(err) < 300


@pytest.mark.timeout(30)
def test_an_invalid_value_in_a_huge_list_shows_the_key_not_the_list(tmp_path, capsys):
    values = ", ".join(["0.5"] * 5000)
    code, err = kdray(["config", "show", config_file(tmp_path, f"sweep: {{temperatures: [{values}, -1]}}\n")], capsys)
    assert code == 2 and "sweep.temperatures.5000" in err and len(err) < 400


# ------------------------------------------------------------------------------------ nothing lost
def test_import_idx_onto_its_own_source_keeps_the_files(tmp_path, capsys):
    source = idx_source(tmp_path / "idx")
    before = tree(source)
    assert kdray(["data", "import-idx", source, source, "--overwrite"], capsys)[0] == 2
    assert tree(source) == before


def test_a_bad_source_leaves_the_dataset_it_would_replace_whole(tmp_path, capsys):
    source = idx_source(tmp_path / "idx")
    (source / "t10k-images-idx3-ubyte").write_bytes((source / "t10k-images-idx3-ubyte").read_bytes()[:-100])
    write_blobs(str(tmp_path / "dataset"))
    before = tree(tmp_path / "dataset")

    code, err = kdray(["data", "import-idx", source, tmp_path / "dataset", "--overwrite", "--rows-per-shard", "8"], capsys)

    assert code == 2 and "t10k-images-idx3-ubyte" in err
    assert tree(tmp_path / "dataset") == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dataset", "idx"]  # no staging directory left


def test_overwrite_replaces_a_dataset_only_once_the_new_one_is_complete(tmp_path, capsys):
    source = idx_source(tmp_path / "idx")
    write_blobs(str(tmp_path / "dataset"))

    code, _ = kdray(["data", "import-idx", source, tmp_path / "dataset", "--overwrite", "--rows-per-shard", "8"], capsys)

    assert code == 0
    manifest = json.loads((tmp_path / "dataset" / "manifest.json").read_text())
    assert manifest["num_classes"] == 10 and sum(shard["rows"] for shard in manifest["shards"]) == 40
    assert {p.name for p in (tmp_path / "dataset").iterdir()} == {"manifest.json", *(s["file"] for s in manifest["shards"])}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dataset", "idx"]


def test_synth_never_touches_a_directory_of_user_files(tmp_path, capsys):
    (tmp_path / "thesis.tex").write_text("years of work")
    (tmp_path / "manifest.json").write_text('{"mine": true}')  # a manifest, but not a kdray dataset's
    before = tree(tmp_path)
    for flags in ([], ["--overwrite"]):
        assert kdray(["data", "synth", tmp_path, "--rows", "10", *flags], capsys)[0] == 2
    assert tree(tmp_path) == before


def test_predict_cannot_overwrite_the_runs_cached_transfer_set(run, tmp_path, capsys):
    (run / "transfer" / "shards").mkdir(parents=True)
    (run / "transfer" / "shards" / "part-0.parquet").write_bytes(b"cached soft targets")
    write_json(run / "transfer" / "manifest.json", {"stage": "transfer", "fingerprint": "t", "outputs": {}})
    before = tree(run)

    code, err = kdray(["predict", run, run / "data" / "dataset", run / "transfer"], capsys)

    assert code == 2 and "must not contain each other" in err
    assert tree(run) == before


def test_run_refuses_a_run_directory_holding_user_files(tmp_path, capsys):
    (tmp_path / "runs" / "default").mkdir(parents=True)
    (tmp_path / "runs" / "default" / "data").mkdir()
    (tmp_path / "runs" / "default" / "data" / "photos.zip").write_bytes(b"irreplaceable")
    before = tree(tmp_path / "runs")

    code, err = kdray(["run", config_file(tmp_path, TINY), "--storage-path", tmp_path / "runs", "--no-progress"], capsys)

    assert code == 2 and "is not a kdray run" in err
    assert tree(tmp_path / "runs") == before


def test_predict_replaces_its_own_earlier_predictions_and_nothing_else(run, tmp_path, capsys, ray_local):
    out = tmp_path / "predictions"
    assert kdray(["predict", run, run / "data" / "dataset", out], capsys)[0] == 0
    first = json.loads((out / "predictions.json").read_text())
    assert kdray(["predict", run, run / "data" / "dataset", out], capsys)[0] == 0
    second = json.loads((out / "predictions.json").read_text())

    assert first["rows"] == second["rows"] == 80
    assert {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()} == {"predictions.json", *second["files"]}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["predictions", "run"]


# ------------------------------------------------------------------------------------ nothing executed
@pytest.fixture
def marker_module(tmp_path, monkeypatch):
    """A module on sys.path whose import, like its factory, leaves a marker file."""
    marker = tmp_path / "code-ran"
    (tmp_path / "kdray_marker_module.py").write_text(textwrap.dedent(f"""\
        import pathlib
        pathlib.Path({str(marker)!r}).write_text("imported")
        from kdray.models import create_model
        
        def factory(input_shape, num_classes, **options):
            return create_model("mlp", input_shape, num_classes, **options)
        """))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield marker
    sys.modules.pop("kdray_marker_module", None)


def test_a_model_json_naming_a_factory_runs_nothing_without_trust_code(run, marker_module, capsys):
    edit_json(student_spec(run), lambda spec: {**spec, "name": "kdray_marker_module:factory"})
    for command in (["evaluate", run], ["predict", run, run / "data" / "dataset", run.parent / "out"]):
        code, err = kdray(command, capsys)
        assert code == 2 and "--trust-code" in err and "kdray_marker_module:factory" in err
    assert not marker_module.exists()

    storage = Storage(str(run))
    assert check_run_models(storage, run_manifests(storage), trust_code=True) == ("kdray_marker_module:factory",)
    assert marker_module.exists()  # asked for on the command line, the factory is used


def test_a_torch_hub_model_json_does_not_run_the_hubconf_beside_it(run, tmp_path, capsys):
    marker = tmp_path / "hubconf-ran"
    (run / "student" / "student" / "hubconf.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    edit_json(student_spec(run), lambda spec: {**spec, "name": "torch.hub:load", "options": {
        "repo_or_dir": str(run / "student" / "student"), "model": "m", "source": "local"}})

    code, err = kdray(["evaluate", run], capsys)

    assert code == 2 and "torch.hub:load" in err
    assert not marker.exists()


def test_a_pickled_model_pt_is_refused_without_unpickling_code(run, tmp_path, capsys):
    marker = tmp_path / "pickle-ran"
    (run / "student" / "student" / "model.pt").write_bytes(pickle.dumps(MarkerPickle(marker)))

    code, err = kdray(["evaluate", run], capsys)

    assert code == 2 and "can load safely" in err
    assert not marker.exists()


def test_a_copied_run_evaluates_its_own_files_not_the_originals(run, tmp_path, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    (copy / "student" / "student" / "model.pt").write_bytes(b"damaged")

    code, err = kdray(["evaluate", copy], capsys)

    assert code == 2 and str(copy / "student" / "student" / "model.pt") in err


def test_a_run_with_absolute_locations_elsewhere_is_refused(run, tmp_path, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    edit_json(student_manifest(copy), lambda m: {**m, "outputs": {"models": {"student": {
        "location": str(run / "student"), "bundles": ["student"]}}}})

    code, err = kdray(["evaluate", copy], capsys)

    assert code == 2 and "outside the run" in err


def test_a_healthy_run_passes_the_checks_and_trusts_no_code(run):
    storage = Storage(str(run))
    assert check_run_models(storage, run_manifests(storage)) == ()
