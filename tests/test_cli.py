"""The `kdray` command line at its boundary: `config show`, `run` refusing bad configs before any work
(exit 2, the key path on stderr, nothing written), `data inspect` as a real process, `data synth`."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml
from test_config import BAD_VALUES, NOT_A_CONFIG
from tiny_data import write_blobs

from kdray.cli import main
from kdray.config import ConfigError, config_from_dict, load_config
from kdray.preflight import check_config

# Small enough that a run which wrongly got past the checks would fail or finish fast, not train for
# minutes: each test below expects the run to stop before its first stage.
TINY = """\
data:
  synth: {rows: 60, validation_rows: 12, test_rows: 12, classes: 4, groups: 2, dim: 5, shards: 1}
teacher:
  model: {name: mlp, hidden: [8]}
  train: {epochs: 1}
distill:
  student: {name: mlp, hidden: [4]}
  train: {epochs: 1}
"""


def write_config(tmp_path, text: str, name: str = "config.yaml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def kdray(argv: list[str], capsys) -> tuple[int, str, str]:
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# ------------------------------------------------------------------------------------ config show
def test_config_show_prints_the_embedded_default_resolved(capsys):
    code, out, _ = kdray(["config", "show"], capsys)
    assert code == 0
    shown = yaml.safe_load(out)
    assert shown["data"]["source"] == "synth" and shown["storage"]["run_name"] == "default"
    assert shown["resources"]["epoch_cache_mb"] == 1024  # a default the embedded YAML does not set
    assert config_from_dict(shown) == load_config()


def test_config_show_prints_defaults_with_file_values_and_overrides_winning(tmp_path, capsys):
    path = write_config(tmp_path, "distill:\n  temperature: 2.5\n  hard_weight: 0.3\n")
    code, out, _ = kdray(["config", "show", path], capsys)
    assert code == 0
    shown = yaml.safe_load(out)
    assert shown["distill"]["temperature"] == 2.5 and shown["distill"]["hard_weight"] == 0.3
    assert shown["distill"]["train"]["batch_size"] == 256 and shown["teacher"]["train"]["epochs"] == 12

    code, out, _ = kdray(["config", "show", path, "--set", "distill.temperature=8",
                          "--set", "teacher.train.epochs=3"], capsys)
    assert code == 0
    shown = yaml.safe_load(out)
    assert shown["distill"]["temperature"] == 8.0 and shown["teacher"]["train"]["epochs"] == 3
    assert shown["distill"]["hard_weight"] == 0.3


@pytest.mark.parametrize("override, key", [("distill.temperature=0", "distill.temperature"),
                                           ("distill.temprature=8", "distill.temprature")])
def test_config_show_rejects_a_bad_override(capsys, override, key):
    code, out, err = kdray(["config", "show", "--set", override], capsys)
    assert code == 2 and out == ""
    assert key in err and "<embedded default.yaml>" in err


@pytest.mark.parametrize("case", sorted(BAD_VALUES))
def test_config_show_exits_2_naming_key_and_file(tmp_path, capsys, case):
    text, key = BAD_VALUES[case]
    path = write_config(tmp_path, text)
    code, out, err = kdray(["config", "show", path], capsys)
    assert code == 2 and out == ""
    assert err.startswith(f"kdray: error: invalid config {path}:")
    assert f"  {key}: " in err


# ------------------------------------------------------------------------------------ run: refused early
@pytest.mark.parametrize("case", sorted(BAD_VALUES) + sorted(NOT_A_CONFIG))
def test_run_with_a_bad_config_exits_2_and_writes_nothing(tmp_path, capsys, case):
    text, expected = {**BAD_VALUES, **NOT_A_CONFIG}[case]
    path = write_config(tmp_path, text)
    runs = tmp_path / "runs"
    code, out, err = kdray(["run", path, "--storage-path", str(runs)], capsys)
    assert code == 2
    assert expected in err and path in err
    assert "Traceback" not in err and "run directory" not in out
    assert not runs.exists()


def test_run_with_a_bad_config_in_a_real_process(tmp_path):
    path = write_config(tmp_path, "distill:\n  hard_weight: 1.5\n")
    runs = tmp_path / "runs"
    runs.mkdir()
    result = subprocess.run([sys.executable, "-m", "kdray", "run", path, "--storage-path", str(runs)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert f"invalid config {path}" in result.stderr and "distill.hard_weight" in result.stderr
    assert "Traceback" not in result.stderr
    assert list(runs.iterdir()) == []


@pytest.mark.parametrize("section, key", [("teacher", "model"), ("distill", "student")])
def test_run_catches_a_model_option_typo_before_work_starts(tmp_path, capsys, section, key):
    config = yaml.safe_load(TINY)
    config[section][key]["hiden"] = config[section][key].pop("hidden")
    path = write_config(tmp_path, yaml.safe_dump(config))
    runs = tmp_path / "runs"
    code, out, err = kdray(["run", path, "--storage-path", str(runs)], capsys)
    assert code == 2
    assert f"{section}.{key}" in err and "'hiden'" in err and "'hidden'" in err  # names the fix too
    assert not runs.exists() and out == ""


def test_run_refuses_an_unwritable_storage_path(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    code, _, err = kdray(["run", write_config(tmp_path, TINY), "--storage-path", str(blocker / "runs")], capsys)
    assert code == 2
    assert f"storage path {blocker / 'runs' / 'default'} is not writable" in err


# ------------------------------------------------------------------------------------ preflight
def test_preflight_accepts_a_good_config_and_names_the_bad_model():
    config = config_from_dict(yaml.safe_load(TINY))
    check_config(config)
    bad = config_from_dict({**yaml.safe_load(TINY), "teacher": {"model": {"name": "mlp", "hidden": [8], "dropout": 2}}})
    with pytest.raises(ConfigError, match=r"^invalid config: teacher\.model: "):
        check_config(bad)


def test_preflight_checks_omitted_classes_against_the_dataset(tmp_path):
    write_blobs(str(tmp_path / "ds"), classes=3, dim=5, rows=(12, 6, 6), shards_per_split=1)
    raw = {**yaml.safe_load(TINY), "data": {"source": "parquet", "path": str(tmp_path / "ds")}}
    check_config(config_from_dict(raw))  # the dataset's 3 classes and 5 features, not synth's
    raw["distill"] = {**raw["distill"], "transfer": {"omit_classes": [1, 3]}}
    with pytest.raises(ConfigError, match=r"distill\.transfer\.omit_classes: \[3\] not in \[0, 3\)"):
        check_config(config_from_dict(raw))


# Every preflight check, through `kdray run` (and `kdray sweep` for the sweep's): each is refused with
# exit 2 naming its key, before Ray starts or the run directory exists, so no stage and no training ran.
# "{other}" is a dataset of another shape, for the transfer-set checks.
PREFLIGHT_CASES = {
    "model argument": (["teacher.model.dropout=2"], "teacher.model"),
    "omitted class": (["distill.transfer.omit_classes=[4]"], "distill.transfer.omit_classes"),
    "top-k above the classes": (["distill.transfer.top_k=5"], "distill.transfer.top_k"),
    "jitter on flat features": (["distill.transfer.copies=2"], "distill.transfer.copies"),
    "mixup partners too big": (["distill.transfer.copies=2", "distill.transfer.augment=mixup",
                                "distill.transfer.mixup_partners=20000000"], "distill.transfer.mixup_partners"),
    "transfer set of other features": (["distill.transfer.dataset={other}/dim6"], "distill.transfer.dataset"),
    "transfer set of more classes": (["distill.transfer.dataset={other}/classes6"], "distill.transfer.dataset"),
    "more specialists than classes": (["clustering.enabled=true", "clustering.num_specialists=5"],
                                      "clustering.num_specialists"),
    "subsets too big": (["clustering.enabled=true", "clustering.num_specialists=3", "clustering.min_size=2"],
                        "clustering.min_size"),
    "subsets too small": (["clustering.enabled=true", "clustering.num_specialists=2", "clustering.min_size=1",
                           "clustering.max_size=1"], "clustering.max_size"),
    "memberships above specialists": (["clustering.enabled=true", "clustering.num_specialists=2",
                                       "clustering.memberships=3"], "clustering.memberships"),
    "top-n above the classes": (["clustering.enabled=true", "clustering.num_specialists=2",
                                 "specialists.top_n=5"], "specialists.top_n"),
    "sweep width of a cnn": (["distill.student.name=cnn", "sweep.widths=[30]"], "sweep.widths"),
    "sweep hard weight without labels": (["distill.transfer.use_labels=false", "sweep.hard_weights=[0.1]"],
                                         "sweep.hard_weights"),
}


@pytest.fixture(scope="module")
def other_datasets(tmp_path_factory):
    root = tmp_path_factory.mktemp("other")
    write_blobs(str(root / "dim6"), classes=4, dim=6, rows=(12, 6, 6), shards_per_split=1)
    write_blobs(str(root / "classes6"), classes=6, dim=5, rows=(12, 6, 6), shards_per_split=1)
    return root


@pytest.mark.parametrize("case", PREFLIGHT_CASES)
def test_preflight_refuses_before_anything_runs(case, other_datasets, tmp_path, capsys):
    overrides, key = PREFLIGHT_CASES[case]
    command = "sweep" if key.startswith("sweep.") else "run"
    sets = [f"--set={pair.format(other=other_datasets)}" for pair in overrides]
    runs = tmp_path / "runs"
    code, out, err = kdray([command, write_config(tmp_path, TINY), "--storage-path", str(runs), *sets], capsys)
    assert code == 2 and err.startswith(f"kdray: error: invalid config: {key}: "), err
    assert not runs.exists() and "[kdray]" not in out  # no run directory, no stage started


def test_run_pipeline_checks_the_config_before_writing(tmp_path):
    from kdray.pipeline import pipeline_stages, run_pipeline
    from kdray.runtime.storage import Storage

    raw = yaml.safe_load(TINY)
    raw["clustering"] = {"enabled": True, "num_specialists": 5}
    with pytest.raises(ConfigError, match=r"^invalid config: clustering\.num_specialists: 5 exceeds"):
        run_pipeline(pipeline_stages(), config_from_dict(raw), Storage(str(tmp_path / "run")), log=lambda _: None)
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------ data inspect
def test_data_inspect_in_a_real_process(ray_local, tmp_path):
    import ray

    (tmp_path / "not-a-dataset").mkdir()
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}  # join the test cluster
    result = subprocess.run([sys.executable, "-m", "kdray", "data", "inspect", str(tmp_path / "not-a-dataset")],
                            capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 2
    assert f"kdray: error: {tmp_path / 'not-a-dataset' / 'manifest.json'} not found" in result.stderr
    assert "Traceback" not in result.stderr


# ------------------------------------------------------------------------------------ data synth
@pytest.mark.parametrize("option", ["--classes", "--rows", "--dim"])
def test_data_synth_rejects_a_non_positive_size_naming_the_option(tmp_path, capsys, option):
    pytest.importorskip("kdray.data.synth")
    out_dir = tmp_path / "synth"
    code, _, err = kdray(["data", "synth", str(out_dir), option, "0"], capsys)
    assert code == 2
    assert f"kdray: error: {option}: " in err
    assert not out_dir.exists()


def test_data_synth_rejects_more_bridges_than_the_groups_can_spare(tmp_path, capsys):
    out_dir = tmp_path / "synth"
    code, _, err = kdray(["data", "synth", str(out_dir), "--classes", "4", "--groups", "2", "--bridges", "3"], capsys)
    assert code == 2
    assert "bridges (3) must leave every group a class of its own: at most classes - groups = 2" in err
    assert not out_dir.exists()


def test_predict_top_k_takes_a_count_all_or_auto(capsys):
    import argparse

    from kdray.cli import _top_k

    assert (_top_k("5"), _top_k("all"), _top_k("auto")) == (5, None, "auto")
    for bad in ("0", "-1", "some"):
        with pytest.raises(argparse.ArgumentTypeError, match="'all' or 'auto'"):
            _top_k(bad)
    with pytest.raises(SystemExit):
        main(["predict", "RUN", "DATA", "OUT", "--top-k", "0"])
    assert "--top-k: expected a number of classes" in capsys.readouterr().err
