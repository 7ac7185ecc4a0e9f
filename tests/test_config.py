"""kdray.config: YAML -> validated, frozen pydantic models; errors name the file and the key path."""

from __future__ import annotations

import pydantic
import pytest
import yaml

from kdray.config import (
    Config,
    ConfigError,
    config_from_dict,
    config_to_yaml,
    default_config_text,
    load_config,
    parse_overrides,
)

# (YAML text, the key path the error must name). Shared with tests/test_cli.py, which checks that
# each one also makes the commands exit non-zero before doing any work.
BAD_VALUES = {
    "temperature-zero": ("distill:\n  temperature: 0\n", "distill.temperature"),
    "temperature-negative": ("distill:\n  temperature: -2.5\n", "distill.temperature"),
    "hard-weight-above-one": ("distill:\n  hard_weight: 1.5\n", "distill.hard_weight"),
    "synth-rows-zero": ("data:\n  synth:\n    rows: 0\n", "data.synth.rows"),
    "batch-size-negative": ("distill:\n  train:\n    batch_size: -1\n", "distill.train.batch_size"),
    "parquet-without-path": ("data:\n  source: parquet\n", "data.path"),
    "parquet-path-missing": ("data:\n  source: parquet\n  path: /nonexistent/kdray-dataset\n", "data.path"),
    "unknown-top-level-key": ("distil:\n  temperature: 2\n", "distil"),
    "unknown-nested-key": ("distill:\n  temprature: 2\n", "distill.temprature"),
    "unknown-deep-key": ("teacher:\n  train:\n    epochz: 3\n", "teacher.train.epochz"),
    "not-a-section": ("storage: 5\n", "storage"),
}
NOT_A_CONFIG = {
    "a-list": ("- distill\n- temperature\n", "must be a mapping"),
    "a-scalar": ("just a string\n", "must be a mapping"),
    "invalid-yaml": ("distill:\n  temperature: [4\n", "invalid YAML"),
    "yaml-tag": ("distill: !!python/object/apply:os.system ['true']\n", "invalid YAML"),
}


def write_config(tmp_path, text: str, name: str = "config.yaml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("case", sorted(BAD_VALUES))
def test_bad_value_names_key_path_and_file(tmp_path, case):
    text, key = BAD_VALUES[case]
    path = write_config(tmp_path, text)
    with pytest.raises(ConfigError) as error:
        load_config(path)
    message = str(error.value)
    assert path in message
    assert f"  {key}: " in message, message


@pytest.mark.parametrize("case", sorted(NOT_A_CONFIG))
def test_not_a_config_mapping_is_rejected_naming_the_file(tmp_path, case):
    text, expected = NOT_A_CONFIG[case]
    path = write_config(tmp_path, text)
    with pytest.raises(ConfigError, match=expected) as error:
        load_config(path)
    assert path in str(error.value)


@pytest.mark.parametrize("case", ["a-list", "a-scalar"])
def test_not_a_mapping_is_rejected_even_with_overrides(tmp_path, case):
    # Overrides are merged into the file's tree: a list must not be turned into a dict on the way.
    path = write_config(tmp_path, NOT_A_CONFIG[case][0])
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(path, {"distill": {"temperature": 8}})


@pytest.mark.parametrize("text, overrides, key", [
    ("storage: 5\n", {"storage": {"run_name": "x"}}, "storage"),
    ("distill:\n  student: mlp\n", {"distill": {"student": {"hidden": [4]}}}, "distill.student"),
])
def test_an_override_does_not_hide_an_invalid_section_in_the_file(tmp_path, text, overrides, key):
    path = write_config(tmp_path, text)
    with pytest.raises(ConfigError) as error:
        load_config(path, overrides)
    assert path in str(error.value) and f"  {key}: not a section" in str(error.value)


def test_missing_file_is_a_config_error(tmp_path):
    missing = str(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="cannot read config") as error:
        load_config(missing)
    assert missing in str(error.value)


def test_every_error_is_listed_not_just_the_first(tmp_path):
    path = write_config(tmp_path, "distill:\n  temperature: 0\n  hard_weight: 2\n")
    message = str(pytest.raises(ConfigError, load_config, path).value)
    assert "distill.temperature" in message and "distill.hard_weight" in message


def test_groups_may_not_exceed_classes():
    with pytest.raises(ConfigError, match=r"groups \(8\) must not exceed classes \(4\)"):
        config_from_dict({"data": {"synth": {"classes": 4, "groups": 8}}})


@pytest.mark.parametrize("synth, message", [
    ({"classes": 12, "groups": 4, "bridges": 9}, r"bridges \(9\) must leave every group a class of its own: at most "
                                                 r"classes - groups = 8"),
    ({"classes": 12, "groups": 1, "bridges": 2}, r"bridges \(2\) need at least 2 groups"),
])
def test_bridges_must_leave_each_group_a_class_and_have_a_second_group(synth, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict({"data": {"synth": synth}})


def test_parquet_source_with_an_existing_path_is_valid(tmp_path):
    config = config_from_dict({"data": {"source": "parquet", "path": str(tmp_path)}})
    assert config.data.path == str(tmp_path)


def test_run_name_must_be_a_plain_directory_name():
    with pytest.raises(ConfigError, match="storage.run_name"):
        config_from_dict({"storage": {"run_name": "../elsewhere"}})


def test_unknown_model_name_lists_registered_models():
    with pytest.raises(ConfigError, match=r"teacher\.model\.name: unknown model 'resnet9000'.*mlp"):
        config_from_dict({"teacher": {"model": {"name": "resnet9000"}}})


def test_model_options_are_kept_for_the_factory():
    config = config_from_dict({"teacher": {"model": {"name": "mlp", "hidden": [10], "dropout": 0.0}}})
    assert config.teacher.model.options == {"hidden": [10], "dropout": 0.0}


def test_embedded_default_loads_and_validates():
    config = load_config()
    assert isinstance(config, Config)
    assert config.data.source == "synth"
    assert config.storage.run_name == "default"
    assert isinstance(yaml.safe_load(default_config_text()), dict)


def test_file_values_override_defaults_and_the_rest_stay_default(tmp_path):
    config = load_config(write_config(tmp_path, "distill:\n  temperature: 2.5\n"))
    assert config.distill.temperature == 2.5
    assert config.distill.hard_weight == Config().distill.hard_weight == 0.1
    assert config.teacher.train.epochs == 12  # a section default that differs from TrainConfig's


def test_overrides_win_over_the_file_and_are_validated(tmp_path):
    path = write_config(tmp_path, "distill:\n  temperature: 2.5\n  hard_weight: 0.3\n")
    config = load_config(path, parse_overrides(["distill.temperature=8", "teacher.train.epochs=3"]))
    assert config.distill.temperature == 8.0
    assert config.distill.hard_weight == 0.3  # a sibling of the override keeps the file's value
    assert config.teacher.train.epochs == 3
    with pytest.raises(ConfigError, match=r"distill\.temperature"):
        load_config(path, parse_overrides(["distill.temperature=-1"]))
    with pytest.raises(ConfigError, match=r"distill\.temprature: unknown key"):
        load_config(path, parse_overrides(["distill.temprature=8"]))


def test_parse_overrides_builds_a_tree_of_yaml_scalars():
    tree = parse_overrides(["distill.temperature=8", "distill.student.hidden=[10, 20]", "sweep.enabled=true",
                            "storage.run_name=a=b"])
    assert tree == {"distill": {"temperature": 8, "student": {"hidden": [10, 20]}}, "sweep": {"enabled": True},
                    "storage": {"run_name": "a=b"}}


@pytest.mark.parametrize("pair", ["distill.temperature", "=8"])
def test_malformed_override_is_rejected(pair):
    with pytest.raises(ConfigError, match="section.key=value"):
        parse_overrides([pair])


def test_config_is_frozen():
    config = Config()
    with pytest.raises(pydantic.ValidationError):
        config.distill.temperature = 2.0


def test_yaml_round_trip_is_lossless(tmp_path):
    config = load_config(write_config(tmp_path, "distill:\n  temperature: 3\n  student:\n    name: mlp\n"
                                                "    hidden: [16]\n"))
    path = write_config(tmp_path, config_to_yaml(config), "resolved.yaml")
    assert load_config(path) == config
