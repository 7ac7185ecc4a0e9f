"""Checks that need more than the config schema, run before any work starts.

The schema (kdray.config) catches bad keys and values; here each configured model is built once
against the dataset's real input shape, so a wrong model argument fails in a second, naming the
config key, instead of an hour into a run.
"""

from __future__ import annotations

import math

from kdray.config import Config, ConfigError, ModelConfig

# Mixup partners are held whole by the driver and by every task that makes copies.
MAX_PARTNER_BYTES = 256 << 20


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
    transfer = config.distill.transfer
    if transfer.copies > 1 and transfer.augment == "jitter" and len(input_shape) != 3:
        raise ConfigError(f"invalid config: distill.transfer.copies: jittered copies need images (C, H, W); "
                          f"the data's feature shape is {tuple(input_shape)} (augment: mixup works on any features)")
    partner_bytes = 4 * transfer.mixup_partners * math.prod(input_shape)
    if transfer.copies > 1 and transfer.augment == "mixup" and partner_bytes > MAX_PARTNER_BYTES:
        raise ConfigError(f"invalid config: distill.transfer.mixup_partners: {transfer.mixup_partners} rows of "
                          f"{math.prod(input_shape)} features take {partner_bytes / 2**20:.0f} MiB, over the "
                          f"{MAX_PARTNER_BYTES >> 20} MiB every transfer task holds; use fewer")
    check_models(config, input_shape, num_classes)
