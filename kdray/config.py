"""Typed, validated configuration: YAML (safe_load) -> frozen pydantic models, one per section.

The field defaults below *are* kdray's defaults (one place); `kdray/default.yaml` is the embedded
default run. Unknown keys and invalid values fail before any work starts, with the key path
(``distill.temperature``) and the file named.
"""

from __future__ import annotations

import importlib.resources
import os
import re
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

PositiveInt = Annotated[int, Field(gt=0)]
NonNegativeInt = Annotated[int, Field(ge=0)]
PositiveFloat = Annotated[float, Field(gt=0, allow_inf_nan=False)]
NonNegativeFloat = Annotated[float, Field(ge=0, allow_inf_nan=False)]
UnitFloat = Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)]
OpenUnitFloat = Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)]

DEFAULT_CONFIG_NAME = "default.yaml"


class ConfigError(Exception):
    """A config file or value is invalid; the message names the file and key path."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# ------------------------------------------------------------------------------------ data
class SynthConfig(Section):
    """The synthetic many-class dataset with planted confusable groups (see kdray.data.synth)."""

    rows: PositiveInt = 24_000
    validation_rows: PositiveInt = 4_000
    test_rows: PositiveInt = 8_000
    classes: PositiveInt = 40
    groups: PositiveInt = 8
    dim: PositiveInt = 32
    latent_dim: PositiveInt = 8
    shards: PositiveInt = 4
    group_spread: PositiveFloat = 6.0
    class_spread: PositiveFloat = 1.0
    noise: PositiveFloat = 0.75
    # The last `bridges` class ids draw half their rows in the group nearest their own, so they
    # are confusable with both (kdray.data.synth): what overlapping specialists are for.
    bridges: NonNegativeInt = 0
    seed: int = 0

    @model_validator(mode="after")
    def _groups_fit(self) -> SynthConfig:
        if self.groups > self.classes:
            raise ValueError(f"groups ({self.groups}) must not exceed classes ({self.classes})")
        if self.bridges and self.groups < 2:
            raise ValueError(f"bridges ({self.bridges}) need at least 2 groups to lie between, got {self.groups}")
        if self.bridges > self.classes - self.groups:
            raise ValueError(f"bridges ({self.bridges}) must leave every group a class of its own: at most "
                             f"classes - groups = {self.classes - self.groups}")
        return self


class DataConfig(Section):
    source: Literal["synth", "parquet", "fashion-mnist", "mnist"] = "synth"
    # parquet: a kdray dataset directory (required). fashion-mnist / mnist: a local folder with
    # the IDX files (optional; the Debian copy, then a download, are tried otherwise).
    path: str | None = Field(None, validate_default=True)  # validated even when absent
    synth: SynthConfig = SynthConfig()
    validation_fraction: Annotated[float, Field(gt=0, lt=1)] = 1 / 12
    rows_per_shard: PositiveInt = 10_000
    seed: int = 0

    def fingerprint_view(self) -> dict[str, Any]:
        """What the data stage's result depends on: `synth` only when it generates the data, so
        a new synthetic option does not invalidate the stages of an image or Parquet run."""
        return self.model_dump(mode="json", exclude=None if self.source == "synth" else {"synth"})

    # A field validator (not a model validator) so the error names `data.path`, not `data`.
    @field_validator("path")
    @classmethod
    def _path_matches_source(cls, path: str | None, info: ValidationInfo) -> str | None:
        if info.data.get("source") == "parquet" and not path:
            raise ValueError("required when source is 'parquet' (a kdray dataset directory)")
        if path and "://" not in path and not os.path.exists(os.path.expanduser(path)):
            raise ValueError(f"{path!r} does not exist")
        return path


# ------------------------------------------------------------------------------------ models
class ModelConfig(BaseModel):
    """`name` is a registered model or `package.module:factory`; other keys are its arguments."""

    model_config = ConfigDict(extra="allow", frozen=True)
    name: str = "mlp"

    @property
    def options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})

    @field_validator("name")
    @classmethod
    def _known_name(cls, name: str) -> str:
        if ":" in name:
            return name
        from kdray.models import MODELS  # torch import deferred until a model is named

        if name not in MODELS:
            raise ValueError(f"unknown model {name!r}; registered: {sorted(MODELS)} or 'package.module:factory'")
        return name


class TrainConfig(Section):
    epochs: PositiveInt = 10
    batch_size: PositiveInt = 256
    optimizer: Literal["sgd", "adam", "adamw"] = "adam"
    lr: PositiveFloat = 1e-3
    momentum: UnitFloat = 0.9
    weight_decay: NonNegativeFloat = 0.0
    lr_schedule: Literal["constant", "cosine", "step"] = "cosine"
    max_norm: PositiveFloat | None = None  # the paper's per-unit weight constraint
    seed: int = 0


class TeacherConfig(Section):
    model: ModelConfig = ModelConfig(name="mlp", hidden=[1200, 1200], dropout=0.5, input_dropout=0.2)
    train: TrainConfig = TrainConfig(epochs=12)
    ensemble_size: PositiveInt = 1
    member_data_fraction: OpenUnitFloat = 1.0  # each member sees this random fraction of train


MIXUP_FIELDS = ("augment", "mixup_alpha", "mixup_partners")


class TransferConfig(Section):
    """Which rows the teacher labels with soft targets."""

    fraction: OpenUnitFloat = 1.0  # of the training split (the paper's 3% experiment: 0.03)
    omit_classes: list[NonNegativeInt] = []  # the paper's omitted-3 experiment
    dataset: str | None = None  # a separate (possibly unlabeled) kdray dataset instead of train
    top_k: PositiveInt | None = None  # keep only the top-k logits plus the rest's log-mass
    use_labels: bool = True  # False: the student sees only soft targets
    # >1: the teacher also labels copies - 1 augmented versions of each row, so the student sees
    # its answers beyond the training rows themselves, where overfitted ensemble members (which
    # agree on every training row) disagree (kdray.transfer; benchmarks/distillation.md: what each
    # was worth, measured over seeds). `jitter`: each copy shifted by up to `jitter` pixels per
    # axis (images only; jobs/ensemble.yaml). `mixup`: each copy an unlabeled blend
    # lam * row + (1 - lam) * partner, lam ~ Beta(mixup_alpha, mixup_alpha), the partner one of
    # `mixup_partners` transfer rows (any features; jobs/fashion_mnist.yaml).
    copies: PositiveInt = 1
    augment: Literal["jitter", "mixup"] = "jitter"
    jitter: PositiveInt = 2
    mixup_alpha: PositiveFloat = 1.0
    mixup_partners: PositiveInt = 4096
    seed: int = 0

    def fingerprint_view(self) -> dict[str, Any]:
        """What the transfer stage's result depends on: the mixup fields only when mixup copies
        are made, so runs without them keep the fingerprints they had before those fields."""
        mixup = self.copies > 1 and self.augment == "mixup"
        return self.model_dump(mode="json", exclude=None if mixup else set(MIXUP_FIELDS))


class DistillConfig(Section):
    temperature: PositiveFloat = 4.0
    hard_weight: UnitFloat = 0.1
    student: ModelConfig = ModelConfig(name="mlp", hidden=[800, 800])
    train: TrainConfig = TrainConfig()
    transfer: TransferConfig = TransferConfig()
    baseline: bool = True  # also train the same student on hard labels only, same budget
    bias_correction: bool = False  # fit per-class logit biases on the validation split


# ------------------------------------------------------------------------------------ specialists
class ClusteringConfig(Section):
    enabled: bool = False
    num_specialists: PositiveInt = 8
    min_size: PositiveInt = 2
    max_size: PositiveInt | None = None
    memberships: PositiveInt = 1  # >1: a class may join that many subsets (the paper's overlap)
    overlap_margin: NonNegativeFloat = 0.5  # extra subsets within (1 + margin) x the own centroid's distance
    # ...and holding at least this share of the class's positive co-variation with other classes
    # (its confusions). 0: distance alone. On jobs/specialists_overlap.yaml distance ratios do not
    # tell the planted two-group classes (1.13-1.77) from plain ones (1.18-1.68); shares do
    # (bridges 0.19-0.50, plain classes at most 0.25).
    overlap_min_share: UnitFloat = 0.0
    batch_size: PositiveInt = 8  # online k-means: columns per update
    epochs: PositiveInt = 20  # online k-means: passes over the columns
    # online k-means: seeds tried, least inertia kept. On jobs/specialists.yaml's covariance (200
    # classes, 20 planted groups) 8 restarts merged two groups (ARI 0.93, inertia 93.1 against the
    # planted partition's 91.0); 64 found the planted partition for each of 4 seeds (~1 s).
    restarts: PositiveInt = 64
    seed: int = 0

    @model_validator(mode="after")
    def _sizes_ordered(self) -> ClusteringConfig:
        if self.max_size is not None and self.max_size < self.min_size:
            raise ValueError(f"max_size ({self.max_size}) must be at least min_size ({self.min_size})")
        return self


class SpecialistsConfig(Section):
    train: TrainConfig = TrainConfig(epochs=4)
    subset_fraction: Annotated[float, Field(gt=0, lt=1)] = 0.5  # share of each stream from its own classes
    soft_target_weight: UnitFloat = 0.0  # generalist soft targets as a regulariser
    temperature: PositiveFloat = 2.0  # of those soft targets, and of distill_back's
    top_n: PositiveInt = 1  # the generalist's top-n classes select the active specialists
    distill_back: bool = False  # distil generalist + specialists into one student
    distill_train: TrainConfig = TrainConfig(epochs=4)  # that student (the generalist's architecture)
    distill_hard_weight: UnitFloat = 0.1
    max_concurrent: PositiveInt | None = None  # specialists training at once; None: as many as CPUs allow


class SweepConfig(Section):
    enabled: bool = False
    search: Literal["grid", "random"] = "grid"
    temperatures: Annotated[list[PositiveFloat], Field(min_length=1)] = [1.0, 2.0, 4.0, 8.0, 20.0]
    hard_weights: Annotated[list[UnitFloat], Field(min_length=1)] = [0.0, 0.1, 0.5]
    widths: list[PositiveInt] = []  # hidden width of a 2-layer student; [] keeps distill.student
    num_samples: PositiveInt = 1
    max_epochs: PositiveInt = 10
    grace_period: PositiveInt = 2
    metric: Literal["val_error", "val_nll"] = "val_error"
    seed: int = 0  # of random search's draws

    @model_validator(mode="after")
    def _grace_within_budget(self) -> SweepConfig:
        if self.grace_period > self.max_epochs:
            raise ValueError(f"grace_period ({self.grace_period}) must not exceed max_epochs ({self.max_epochs})")
        return self


# ------------------------------------------------------------------------------------ runtime
class ResourcesConfig(Section):
    num_workers: PositiveInt = 1
    use_gpu: bool | Literal["auto"] = "auto"
    cpus_per_worker: PositiveFloat = 1.0
    gpus_per_worker: NonNegativeFloat = 1.0
    # Training runs at once: ensemble members, or the student and its baseline (fewer where the
    # cluster's CPUs could not also serve their Ray Data reads: kdray.train.concurrent_fits).
    concurrent_members: PositiveInt = 2
    specialist_cpus: PositiveFloat = 0.25
    specialist_gpus: NonNegativeFloat = 0.25
    max_concurrent_trials: PositiveInt = 2
    max_failures: NonNegativeInt = 2
    # A training worker keeps its shard of the training split (and rank 0 the validation split) in
    # memory after the first epoch when it fits in this many MiB, and skips streaming it again;
    # 0 streams every epoch. Counted per worker, on its device.
    epoch_cache_mb: NonNegativeInt = 1024
    local_num_cpus: PositiveInt | None = None  # logical CPUs for an in-process local Ray


_RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class StorageConfig(Section):
    storage_path: str = "~/kdray-runs"  # local path or URI (s3://, gs://, file://)
    run_name: str = "default"

    @field_validator("run_name")
    @classmethod
    def _plain_name(cls, name: str) -> str:
        if not _RUN_NAME.fullmatch(name):
            raise ValueError(f"run_name {name!r} must be letters, digits, '.', '_' or '-'")
        return name


class Config(Section):
    data: DataConfig = DataConfig()
    teacher: TeacherConfig = TeacherConfig()
    distill: DistillConfig = DistillConfig()
    clustering: ClusteringConfig = ClusteringConfig()
    specialists: SpecialistsConfig = SpecialistsConfig()
    sweep: SweepConfig = SweepConfig()
    resources: ResourcesConfig = ResourcesConfig()
    storage: StorageConfig = StorageConfig()

    def model_factories(self) -> tuple[str, ...]:
        """The `package.module:factory` import paths this config names: the only code a run may
        import to rebuild its models (a name found in a file on disk is never trusted by itself)."""
        names = (self.teacher.model.name, self.distill.student.name)
        return tuple(sorted({name for name in names if ":" in name}))


# ------------------------------------------------------------------------------------ loading
REPR_LIMIT = 80  # characters of an offending value shown in an error


def short_repr(value: Any) -> str:
    """`repr(value)` cut to REPR_LIMIT characters: an error names the value, not a whole document."""
    text = repr(value) if not isinstance(value, (dict, list)) or len(value) <= 8 else f"<{type(value).__name__} " \
        f"of {len(value)} items>"
    return text if len(text) <= REPR_LIMIT else text[: REPR_LIMIT - 3] + "..."


def _format_errors(error: ValidationError, source: str) -> str:
    lines = [f"invalid config {source}:"]
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"]) or "<root>"
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = "unknown key"
        lines.append(f"  {key}: {message} (got {short_repr(item.get('input'))})")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ YAML
# A YAML alias repeats a node without copying it, so a few hundred bytes of nested aliases stand
# for millions of values; anything that walks the document (validation, an error message) would
# then hang. No config comes near this many values.
MAX_YAML_VALUES = 20_000


class _StrictLoader(yaml.SafeLoader):
    """safe_load that refuses a key given twice in one mapping (YAML's last-wins hides typos)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` may be overridden, by design
                continue
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, (str, int, float, bool)) or key is None:
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key!r} (first at line {seen[key] + 1})", key_node.start_mark)
                seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


_IN_PROGRESS = -1


def _expanded_size(node: yaml.Node, sizes: dict[int, int]) -> int:
    """How many values `node` stands for once its aliases are expanded (shared nodes counted once
    per use, each computed once)."""
    if sizes.get(id(node)) == _IN_PROGRESS:
        raise ConfigError(f"a YAML alias refers to a node that contains it (line {node.start_mark.line + 1})")
    if id(node) not in sizes:
        sizes[id(node)] = _IN_PROGRESS
        children = ([child for pair in node.value for child in pair] if isinstance(node, yaml.MappingNode)
                    else node.value if isinstance(node, yaml.SequenceNode) else [])
        sizes[id(node)] = min(1 + sum(_expanded_size(child, sizes) for child in children), MAX_YAML_VALUES + 1)
    return sizes[id(node)]


def parse_yaml(text: str, source: str) -> Any:
    """`text` as plain Python values (YAML's safe subset); ConfigError naming `source` and the line
    for invalid YAML, a key given twice, or aliases expanding past MAX_YAML_VALUES."""
    loader = _StrictLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        try:
            size = _expanded_size(node, {})
        except ConfigError as error:
            raise ConfigError(f"invalid YAML in {source}: {error}") from None
        if size > MAX_YAML_VALUES:
            raise ConfigError(f"invalid YAML in {source}: it expands to more than {MAX_YAML_VALUES} values "
                              f"(nested aliases); write the values out")
        return loader.construct_document(node)
    except yaml.YAMLError as error:
        raise ConfigError(f"invalid YAML in {source}: {_one_line(error)}") from None
    except RecursionError:
        raise ConfigError(f"invalid YAML in {source}: nested too deeply") from None
    finally:
        loader.dispose()


def _one_line(error: yaml.YAMLError) -> str:
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None) or str(error)
    where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
    context = getattr(error, "context", None)
    return f"{context + ': ' if context else ''}{problem}{where}"


def read_config_text(path: str) -> str:
    """A config file's text; ConfigError naming the file when it cannot be read as UTF-8."""
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except OSError as error:
        raise ConfigError(f"cannot read config {path}: {error.strerror or error}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ConfigError(f"cannot read config {path}: not UTF-8 text (byte {error.start})") from None


def _set_dotted(tree: dict, dotted_key: str, value: Any) -> None:
    *parents, leaf = dotted_key.split(".")
    for part in parents:
        tree = tree.setdefault(part, {})
        if not isinstance(tree, dict):
            raise ConfigError(f"override {dotted_key}: {part} is not a section")
    tree[leaf] = value


_OVERRIDE_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


def parse_overrides(pairs: list[str]) -> dict:
    """`["distill.temperature=8", ...]` -> nested dict; values parsed as YAML (flow) values."""
    tree: dict = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        key = key.strip()
        if not sep or not _OVERRIDE_KEY.match(key):
            raise ConfigError(f"override {short_repr(pair)} must look like section.key=value")
        _set_dotted(tree, key, parse_yaml(raw, f"override {key}"))
    return tree


def _deep_merge(base: dict, update: dict, source: str, prefix: str = "") -> dict:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value, source, f"{prefix}{key}.")
        elif isinstance(value, dict) and merged.get(key) is not None:
            # Replacing it would silently drop the file's invalid value instead of reporting it.
            raise ConfigError(f"invalid config {source}:\n  {prefix}{key}: not a section, cannot override "
                              f"its keys (got {merged[key]!r})")
        else:
            merged[key] = value
    return merged


def default_config_text() -> str:
    return importlib.resources.files("kdray").joinpath(DEFAULT_CONFIG_NAME).read_text()


def config_from_dict(raw: Any, source: str = "<dict>") -> Config:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"invalid config {source}: the top level must be a mapping of sections")
    try:
        return Config.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(_format_errors(error, source)) from None


def load_config(path: str | None = None, overrides: dict | None = None) -> Config:
    """Read `path` (or the embedded default), apply `overrides`, validate. Raises ConfigError."""
    if path is None:
        source, text = f"<embedded {DEFAULT_CONFIG_NAME}>", default_config_text()
    else:
        source, text = path, read_config_text(path)
    raw = parse_yaml(text, source)
    if raw is not None and not isinstance(raw, dict):  # before merging: dict() of a list is not an error
        raise ConfigError(f"invalid config {source}: the top level must be a mapping of sections")
    if overrides:
        raw = _deep_merge(raw or {}, overrides, source)
    return config_from_dict(raw, source)


def config_to_yaml(config: Config) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
