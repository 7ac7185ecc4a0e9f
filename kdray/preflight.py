"""Preflight: every check that needs more than one config section, or the dataset's shape, in one
place, run before any stage starts.

The schema (kdray.config) catches bad keys and values one section at a time. What it cannot know
is checked here against the dataset's class count and feature shape, both known before the data
stage: synthetic and IDX data have them in the config, a Parquet dataset in its manifest. Each
configured model is built once for that shape, so a wrong model argument fails in a second, naming
its key, instead of an hour into a run. Every error is a ConfigError naming the key to change.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from kdray.config import ClusteringConfig, Config, ConfigError

# Mixup partners are held whole by the driver and by every task that makes copies.
MAX_PARTNER_BYTES = 256 << 20


@dataclass(frozen=True)
class DataShape:
    """What the checks need to know of the dataset a config will train on."""

    input_shape: tuple[int, ...]
    num_classes: int


def data_shape(config: Config) -> DataShape:
    from kdray.data import dataset_input_shape, read_manifest
    from kdray.runtime.storage import Storage

    if config.data.source == "parquet":  # one manifest read gives both
        manifest = read_manifest(Storage(config.data.path))
        return DataShape(tuple(manifest.feature_shape), manifest.num_classes)
    num_classes = config.data.synth.classes if config.data.source == "synth" else 10  # IDX: 10 classes
    return DataShape(tuple(dataset_input_shape(config.data)), num_classes)


def check_config(config: Config) -> DataShape:
    """Everything that can be known wrong before the first stage runs; returns the data's shape."""
    shape = data_shape(config)
    for check in CHECKS:
        check(config, shape)
    return shape


def _invalid(key: str, message: str) -> ConfigError:
    return ConfigError(f"invalid config: {key}: {message}")


# ------------------------------------------------------------------------------------ the checks
def check_models(config: Config, shape: DataShape) -> None:
    from kdray.models import create_model

    for key, model in {"teacher.model": config.teacher.model, "distill.student": config.distill.student}.items():
        try:
            create_model(model.name, shape.input_shape, shape.num_classes, **model.options)
        except (TypeError, ValueError) as error:
            raise _invalid(key, str(error)) from None


def check_transfer(config: Config, shape: DataShape) -> None:
    transfer, features = config.distill.transfer, math.prod(shape.input_shape)
    bad = [c for c in transfer.omit_classes if c >= shape.num_classes]
    if bad:
        raise _invalid("distill.transfer.omit_classes", f"{bad} not in [0, {shape.num_classes})")
    if isinstance(transfer.top_k, int) and transfer.top_k > shape.num_classes:
        raise _invalid("distill.transfer.top_k", f"{transfer.top_k} exceeds the dataset's {shape.num_classes} classes")
    if transfer.copies > 1 and transfer.augment == "jitter" and len(shape.input_shape) != 3:
        raise _invalid("distill.transfer.copies", f"jittered copies need images (C, H, W); the data's feature "
                       f"shape is {shape.input_shape} (augment: mixup works on any features)")
    partner_bytes = 4 * transfer.mixup_partners * features
    if transfer.copies > 1 and transfer.augment == "mixup" and partner_bytes > MAX_PARTNER_BYTES:
        raise _invalid("distill.transfer.mixup_partners", f"{transfer.mixup_partners} rows of {features} features "
                       f"take {partner_bytes / 2**20:.0f} MiB, over the {MAX_PARTNER_BYTES >> 20} MiB every "
                       "transfer task holds; use fewer")
    if transfer.dataset:
        _check_transfer_dataset(transfer.dataset, shape)


def _check_transfer_dataset(location: str, shape: DataShape) -> None:
    from kdray.data import read_manifest
    from kdray.runtime.storage import Storage

    manifest = read_manifest(Storage(location))
    if tuple(manifest.feature_shape) != shape.input_shape:
        raise _invalid("distill.transfer.dataset", f"{location} has features of shape {tuple(manifest.feature_shape)}"
                       f", the training data {shape.input_shape}: the teacher cannot label it")
    if manifest.num_classes > shape.num_classes:
        raise _invalid("distill.transfer.dataset", f"{location} has {manifest.num_classes} classes, more than the "
                       f"training data's {shape.num_classes}")


def check_clustering(clustering: ClusteringConfig, num_classes: int) -> None:
    """The subset bounds can be met for `num_classes` classes."""
    k = clustering.num_specialists
    if k > num_classes:
        raise _invalid("clustering.num_specialists", f"{k} exceeds the dataset's {num_classes} classes")
    if k * clustering.min_size > num_classes:
        raise _invalid("clustering.min_size", f"{clustering.min_size} x num_specialists ({k}) exceeds the "
                       f"{num_classes} classes: lower min_size or num_specialists")
    if clustering.max_size is not None and k * clustering.max_size < num_classes:
        raise _invalid("clustering.max_size", f"{clustering.max_size} x num_specialists ({k}) cannot hold the "
                       f"{num_classes} classes: raise max_size or num_specialists")
    if clustering.memberships > k:
        raise _invalid("clustering.memberships", f"{clustering.memberships} exceeds num_specialists ({k})")


def check_specialists(config: Config, shape: DataShape) -> None:
    if not config.clustering.enabled:
        return
    check_clustering(config.clustering, shape.num_classes)
    if config.specialists.top_n > shape.num_classes:
        raise _invalid("specialists.top_n", f"{config.specialists.top_n} exceeds the dataset's "
                       f"{shape.num_classes} classes")


def check_sweep(config: Config, shape: DataShape | None = None) -> None:
    """The sweep asks only for what the student config can do."""
    sweep, distill = config.sweep, config.distill
    if not sweep.enabled:
        return
    if sweep.widths and distill.student.name != "mlp":
        raise _invalid("sweep.widths", f"sets the hidden width of a 2-layer 'mlp' student, but "
                       f"distill.student.name is {distill.student.name!r}; remove sweep.widths or use mlp")
    if not distill.transfer.use_labels and any(weight > 0 for weight in sweep.hard_weights):
        raise _invalid("sweep.hard_weights", "must be [0.0] when distill.transfer.use_labels is false (the "
                       f"student sees no labels), got {sweep.hard_weights}")


# The config's own consistency first, then what needs the data's shape, model builds last (slowest).
CHECKS: tuple[Callable[[Config, DataShape], None], ...] = (check_sweep, check_transfer, check_specialists,
                                                           check_models)
