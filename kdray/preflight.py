"""Checks that need more than the config schema, run before any work starts.

The schema (kdray.config) catches bad keys and values; here each configured model is built once
against the dataset's real input shape, so a wrong model argument fails in a second, naming the
config key, instead of an hour into a run.
"""

from __future__ import annotations

from kdray.config import Config, ConfigError, ModelConfig


def _model_sections(config: Config) -> dict[str, ModelConfig]:
    return {"teacher.model": config.teacher.model, "distill.student": config.distill.student}


def check_models(config: Config, input_shape: tuple[int, ...], num_classes: int) -> None:
    from kdray.models import create_model

    for key, model in _model_sections(config).items():
        try:
            create_model(model.name, input_shape, num_classes, **model.options)
        except (TypeError, ValueError) as error:
            raise ConfigError(f"invalid config: {key}: {error}") from None


def _num_classes(config: Config) -> int:
    from kdray.data import read_manifest
    from kdray.storage import Storage

    if config.data.source == "synth":
        return config.data.synth.classes
    if config.data.source in ("fashion-mnist", "mnist"):
        return 10
    return read_manifest(Storage(config.data.path)).num_classes


def check_config(config: Config) -> None:
    """Everything that can be known wrong before the first stage runs."""
    from kdray.data import dataset_input_shape

    num_classes = _num_classes(config)
    bad = [c for c in config.distill.transfer.omit_classes if c >= num_classes]
    if bad:
        raise ConfigError(f"invalid config: distill.transfer.omit_classes: {bad} not in [0, {num_classes})")
    input_shape = dataset_input_shape(config.data)
    if config.distill.transfer.copies > 1 and len(input_shape) != 3:
        raise ConfigError(f"invalid config: distill.transfer.copies: jittered copies need images (C, H, W); "
                          f"the data's feature shape is {tuple(input_shape)}")
    check_models(config, input_shape, num_classes)
