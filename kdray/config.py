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

    rows: PositiveInt = Field(24_000, description="Rows of the training split.")
    validation_rows: PositiveInt = Field(4_000, description="Rows of the validation split.")
    test_rows: PositiveInt = Field(8_000, description="Rows of the test split.")
    classes: PositiveInt = Field(40, description="Number of classes.")
    groups: PositiveInt = Field(
        8, description="Confusable groups the classes are planted in (at most `classes`): classes of one group "
                       "overlap, groups lie apart. The manifest records each class's group.")
    dim: PositiveInt = Field(32, description="Features per row.")
    latent_dim: PositiveInt = Field(
        8, description="Dimension of the latent space where groups and classes are drawn, before a fixed "
                       "random non-linear map to `dim` features.")
    shards: PositiveInt = Field(4, description="Parquet shards per split, each written by one Ray task.")
    group_spread: PositiveFloat = Field(6.0, description="Standard deviation of the group centres in latent space.")
    class_spread: PositiveFloat = Field(
        1.0, description="Standard deviation of a class's mean around its group's centre.")
    noise: PositiveFloat = Field(0.75, description="Standard deviation of a row around its class's mean.")
    bridges: NonNegativeInt = Field(
        0, description="The last `bridges` classes draw half their rows in the group nearest their own, so they "
                       "are confusable with two groups: the classes overlapping specialists are for.")
    seed: int = Field(0, description="Seed of the whole dataset; the rows are the same for a seed whatever the "
                                     "number of Ray workers.")

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
    """The dataset every stage reads: generated, a kdray Parquet dataset, or imported IDX images."""

    source: Literal["synth", "parquet", "fashion-mnist", "mnist"] = Field(
        "synth", description="`synth`: generate the data; `parquet`: a kdray dataset directory; "
                             "`fashion-mnist`, `mnist`: import the IDX files.")
    path: str | None = Field(  # validated even when absent, so `parquet` without a path fails
        None, validate_default=True,
        description="`parquet`: the kdray dataset directory (required). `fashion-mnist`, `mnist`: a local folder "
                    "with the IDX files (optional; the Debian package's copy, then a download, are tried "
                    "otherwise).")
    synth: SynthConfig = Field(SynthConfig(), description="The synthetic dataset, when `source` is `synth`.")
    validation_fraction: Annotated[float, Field(gt=0, lt=1)] = Field(
        1 / 12, description="`fashion-mnist`, `mnist`: share of the training images held out as the validation "
                            "split.")
    rows_per_shard: PositiveInt = Field(
        10_000, description="`fashion-mnist`, `mnist`: rows per Parquet shard of the imported dataset.")
    seed: int = Field(0, description="`fashion-mnist`, `mnist`: seed of the validation split's draw.")

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
    name: str = Field(
        "mlp", description="A registered model (`mlp`, `cnn`) or an import path `package.module:factory`; "
                           "the section's other keys are passed to it as arguments.")

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
    """One model's training, in the loop every model that trains on a dataset shares."""

    epochs: PositiveInt = Field(
        10, description="Passes over the model's training rows (a student's: the transfer set, copies included).")
    batch_size: PositiveInt = Field(256, description="Rows per optimisation step of each worker.")
    optimizer: Literal["sgd", "adam", "adamw"] = Field(
        "adam", description="`sgd` (with `momentum`), `adam`, or `adamw` (decoupled weight decay).")
    lr: PositiveFloat = Field(1e-3, description="Learning rate at the start of the schedule.")
    momentum: UnitFloat = Field(0.9, description="SGD's momentum; unused by `adam` and `adamw`.")
    weight_decay: NonNegativeFloat = Field(
        0.0, description="Weight decay: an L2 penalty for `sgd` and `adam`, decoupled for `adamw`.")
    lr_schedule: Literal["constant", "cosine", "step"] = Field(
        "cosine", description="Stepped once per epoch: `cosine` anneals to 0 over `epochs`; `step` divides the "
                              "rate by 10 every third of `epochs`; `constant` keeps it.")
    max_norm: PositiveFloat | None = Field(
        None, description="The paper's weight constraint: after every step, each hidden unit's incoming weight "
                          "vector is scaled back to this L2 norm if longer; null: none.")
    seed: int = Field(0, description="Seed of the initial weights and the batch order (ensemble members add "
                                     "1009 × their index).")


class TeacherConfig(Section):
    """The teacher (the paper's cumbersome model): one big net, or an ensemble whose prediction is
    the mean of its members' probabilities."""

    model: ModelConfig = Field(
        ModelConfig(name="mlp", hidden=[1200, 1200], dropout=0.5, input_dropout=0.2),
        description="The teacher's architecture (each member's, for an ensemble).")
    train: TrainConfig = Field(TrainConfig(epochs=12), description="The teacher's training (each member's).")
    ensemble_size: PositiveInt = Field(
        1, description="Members, trained with different seeds, up to `resources.concurrent_members` at once.")
    member_data_fraction: OpenUnitFloat = Field(
        1.0, description="Each member trains on this random fraction of the training split (1: all of it).")


MIXUP_FIELDS = ("augment", "mixup_alpha", "mixup_partners")
# Above DENSE_CLASSES classes a row's full logits cost more to store than its top ones teach: the
# transfer set and predictions keep each row's top AUTO_TOP_K unless told otherwise.
DENSE_CLASSES = 1000
AUTO_TOP_K = 100


def kept_classes(top_k: int | Literal["auto"] | None, num_classes: int) -> int | None:
    """How many of a row's classes a `top_k` setting keeps at `num_classes` classes (None: all)."""
    if top_k == "auto":
        return None if num_classes <= DENSE_CLASSES else AUTO_TOP_K
    return top_k


class TransferConfig(Section):
    """Which rows the teacher labels with soft targets."""

    fraction: OpenUnitFloat = Field(
        1.0, description="Share of the training split in the transfer set (the paper's 3% experiment: 0.03).")
    omit_classes: list[NonNegativeInt] = Field(
        [], description="Classes left out of the transfer set (the paper's omitted-3 experiment); the results "
                        "also count each model's test errors on them.")
    dataset: str | None = Field(
        None, description="A separate kdray dataset, labels optional, to use as the transfer set instead of the "
                          "training split; null: the training split.")
    top_k: PositiveInt | Literal["auto"] | None = Field(
        "auto", description="Keep only the teacher's top-k log-probabilities per row plus the rest's log-mass; "
                            f"null: all of them; auto: all up to {DENSE_CLASSES:,} classes, the top {AUTO_TOP_K} "
                            "above.")
    use_labels: bool = Field(True, description="false: the student sees only soft targets (no hard-label term).")
    # Copies let the student see the teacher's answers beyond the training rows themselves, where
    # overfitted ensemble members (which agree on every training row) disagree.
    copies: PositiveInt = Field(
        1, description="K > 1: the teacher also labels K − 1 augmented copies of each row, still in one pass; "
                       "each row is followed by its copies.")
    augment: Literal["jitter", "mixup"] = Field(
        "jitter", description="How copies are made: `jitter` shifts each copy by up to `jitter` pixels per axis "
                              "(images only); `mixup` makes each copy an unlabelled blend of the row and a "
                              "partner row (any features).")
    jitter: PositiveInt = Field(2, description="`augment: jitter`: the largest shift, in pixels per axis.")
    mixup_alpha: PositiveFloat = Field(
        1.0, description="`augment: mixup`: a copy is λ·row + (1 − λ)·partner, "
                         "λ ~ Beta(mixup_alpha, mixup_alpha).")
    mixup_partners: PositiveInt = Field(
        4096, description="`augment: mixup`: transfer rows drawn once as the partners.")
    seed: int = Field(0, description="Seed of the `fraction` sample, the mixup partners and each copy's shift or "
                                     "λ (hashed from the copy's id, so independent of batching).")

    def fingerprint_view(self) -> dict[str, Any]:
        """What the transfer stage's result depends on: the mixup fields only when mixup copies
        are made, so runs without them keep the fingerprints they had before those fields."""
        mixup = self.copies > 1 and self.augment == "mixup"
        return self.model_dump(mode="json", exclude=None if mixup else set(MIXUP_FIELDS))


class DistillConfig(Section):
    """The student and what it learns from: (1 − hard_weight) · T² · KL(teacher ‖ student) at
    temperature T, plus hard_weight · cross-entropy with the true labels."""

    temperature: PositiveFloat = Field(
        4.0, description="T: both distributions of the soft term are softmax(logits / T); the term is scaled "
                         "by T².")
    hard_weight: UnitFloat = Field(
        0.1, description="Weight of the hard-label term; the soft term gets 1 − hard_weight.")
    student: ModelConfig = Field(ModelConfig(name="mlp", hidden=[800, 800]), description="The student's architecture.")
    train: TrainConfig = Field(TrainConfig(), description="The student's training.")
    transfer: TransferConfig = Field(TransferConfig(), description="Which rows the teacher labels.")
    baseline: bool = Field(
        True, description="Also train the student's architecture on hard labels only, for the same number of "
                          "updates, on the labelled rows the transfer set was drawn from.")
    bias_correction: bool = Field(
        False, description="Fit a per-class logit bias on the validation split and evaluate the student with "
                           "it as well.")


# ------------------------------------------------------------------------------------ specialists
class ClusteringConfig(Section):
    """The generalist's classes split into specialists' subsets: online k-means over the columns of
    the covariance of its predicted probabilities on the validation split."""

    enabled: bool = Field(
        False, description="Add the clustering and specialists stages after the teacher, which becomes the "
                           "generalist.")
    num_specialists: PositiveInt = Field(8, description="Subsets, one specialist each.")
    min_size: PositiveInt = Field(2, description="Fewest classes in a subset.")
    max_size: PositiveInt | None = Field(None, description="Most classes in a subset; null: no limit.")
    memberships: PositiveInt = Field(
        1, description="Subsets a class may belong to; > 1: the paper's overlapping subsets.")
    overlap_margin: NonNegativeFloat = Field(
        0.5, description="With `memberships` > 1, a class may join a further subset whose centroid lies within "
                         "(1 + margin) × its own centroid's distance (and see `overlap_min_share`).")
    # Distance alone does not tell a class confusable with two groups from a plain one; its share of
    # the confusions does (benchmarks/specialists.md, jobs/specialists_overlap.yaml).
    overlap_min_share: UnitFloat = Field(
        0.0, description="A further subset's classes must also hold at least this share of the class's positive "
                         "covariance with other classes (its confusions); 0: distance alone.")
    batch_size: PositiveInt = Field(8, description="Online k-means: columns per update.")
    epochs: PositiveInt = Field(20, description="Online k-means: passes over the columns.")
    # Fewer restarts can merge two planted groups into one subset (benchmarks/specialists.md).
    restarts: PositiveInt = Field(64, description="Online k-means: seeds tried; the least inertia is kept.")
    seed: int = Field(0, description="Seed of the k-means restarts.")

    @model_validator(mode="after")
    def _sizes_ordered(self) -> ClusteringConfig:
        if self.max_size is not None and self.max_size < self.min_size:
            raise ValueError(f"max_size ({self.max_size}) must be at least min_size ({self.min_size})")
        return self


class SpecialistsConfig(Section):
    """One specialist per subset: the generalist's body with a head over the subset plus a dustbin
    class, trained on a stream half from its own classes."""

    train: TrainConfig = Field(TrainConfig(epochs=4), description="Each specialist's training.")
    subset_fraction: Annotated[float, Field(gt=0, lt=1)] = Field(
        0.5, description="Share of each specialist's stream from its own classes; the rest is a new sample of "
                         "the other classes each epoch.")
    soft_target_weight: UnitFloat = Field(
        0.0, description="Weight of the generalist's soft targets, as a regulariser; 0: hard labels only.")
    temperature: PositiveFloat = Field(
        2.0, description="Temperature of those soft targets, and of `distill_back`'s.")
    top_n: PositiveInt = Field(
        1, description="At inference the generalist's top-n classes select the active specialists.")
    distill_back: bool = Field(
        False, description="Distil generalist + specialists into one net of the generalist's architecture.")
    distill_train: TrainConfig = Field(TrainConfig(epochs=4), description="That net's training.")
    distill_hard_weight: UnitFloat = Field(0.1, description="That net's weight on the hard labels.")
    max_concurrent: PositiveInt | None = Field(
        None, description="Specialists training at once; null: as many as the cluster's resources allow.")


class SweepConfig(Section):
    """A Ray Tune sweep of the student over the cached transfer set, ASHA stopping trials that fall
    behind."""

    enabled: bool = Field(False, description="Run the sweep in `kdray run` too (`kdray sweep` always does).")
    search: Literal["grid", "random"] = Field(
        "grid", description="`grid`: every combination; `random`: `num_samples` draws from the same lists.")
    temperatures: Annotated[list[PositiveFloat], Field(min_length=1)] = Field(
        [1.0, 2.0, 4.0, 8.0, 20.0], description="Values of `distill.temperature` tried.")
    hard_weights: Annotated[list[UnitFloat], Field(min_length=1)] = Field(
        [0.0, 0.1, 0.5], description="Values of `distill.hard_weight` tried.")
    widths: list[PositiveInt] = Field(
        [], description="Hidden widths of a 2-layer `mlp` student tried; []: `distill.student` as it is.")
    num_samples: PositiveInt = Field(
        1, description="`grid`: times the grid is run; `random`: trials drawn.")
    max_epochs: PositiveInt = Field(10, description="Epochs of a trial ASHA does not stop.")
    grace_period: PositiveInt = Field(
        2, description="Epochs every trial gets before ASHA may stop it (its first rung).")
    metric: Literal["val_error", "val_nll"] = Field(
        "val_error", description="Validation metric ASHA and the choice of the best trial minimise.")
    seed: int = Field(0, description="Seed of random search's draws.")

    @model_validator(mode="after")
    def _grace_within_budget(self) -> SweepConfig:
        if self.grace_period > self.max_epochs:
            raise ValueError(f"grace_period ({self.grace_period}) must not exceed max_epochs ({self.max_epochs})")
        return self


# ------------------------------------------------------------------------------------ runtime
class ResourcesConfig(Section):
    """What the stages ask Ray for."""

    num_workers: PositiveInt = Field(1, description="Ray Train workers per training run (data-parallel).")
    use_gpu: bool | Literal["auto"] = Field(
        "auto", description="`true`: train on GPUs (an autoscaler adds GPU nodes); `false`: CPUs; `auto`: GPUs "
                            "if the cluster has them now.")
    cpus_per_worker: PositiveFloat = Field(1.0, description="CPUs each Ray Train worker reserves.")
    gpus_per_worker: NonNegativeFloat = Field(1.0, description="GPUs each Ray Train worker reserves, when GPUs "
                                                               "are used.")
    # Fewer start where the cluster's CPUs could not also serve their Ray Data reads: a read
    # waits forever for a CPU that training runs hold (kdray.runtime.train.concurrent_fits).
    concurrent_members: PositiveInt = Field(
        2, description="Training runs at once: ensemble members, or the student and its baseline.")
    specialist_cpus: PositiveFloat = Field(0.25, description="CPUs each specialist actor reserves.")
    specialist_gpus: NonNegativeFloat = Field(
        0.25, description="GPUs each specialist actor reserves, when GPUs are used.")
    max_concurrent_trials: PositiveInt = Field(2, description="Sweep trials at once.")
    max_failures: NonNegativeInt = Field(
        2, description="Restarts of a failed Ray Train worker group from its latest checkpoint.")
    epoch_cache_mb: NonNegativeInt = Field(
        1024, description="A training worker keeps its share of the training split (rank 0 also the "
                          "validation split) in memory after the first epoch when it fits in this many MiB on "
                          "its device, and replays it; 0: stream every epoch.")
    local_num_cpus: PositiveInt | None = Field(
        None, description="Logical CPUs of an in-process local Ray; null: Ray's count of the machine's.")


_RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class StorageConfig(Section):
    """Where runs are written: STORAGE_PATH/RUN_NAME/STAGE/."""

    storage_path: str = Field(
        "~/kdray-runs", description="Local path or URI (`s3://`, `gs://`, `file://`) holding the runs.")
    run_name: str = Field(
        "default", description="The run's directory under `storage_path`; running a finished or interrupted "
                               "run again resumes it.")

    @field_validator("run_name")
    @classmethod
    def _plain_name(cls, name: str) -> str:
        if not _RUN_NAME.fullmatch(name):
            raise ValueError(f"run_name {name!r} must be letters, digits, '.', '_' or '-'")
        return name


class Config(Section):
    """A whole run: one section per part of the pipeline."""

    data: DataConfig = Field(DataConfig(), description="The dataset.")
    teacher: TeacherConfig = Field(TeacherConfig(), description="The teacher, or the generalist with specialists.")
    distill: DistillConfig = Field(DistillConfig(), description="The student and its soft targets.")
    clustering: ClusteringConfig = Field(ClusteringConfig(), description="The specialists' class subsets.")
    specialists: SpecialistsConfig = Field(SpecialistsConfig(), description="The specialists.")
    sweep: SweepConfig = Field(SweepConfig(), description="The Ray Tune sweep of the student.")
    resources: ResourcesConfig = Field(ResourcesConfig(), description="What the stages ask Ray for.")
    storage: StorageConfig = Field(StorageConfig(), description="Where runs are written.")

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


# ------------------------------------------------------------------------------------ reference
_BOUNDS = {"gt": ("(", ">"), "ge": ("[", "≥"), "lt": (")", "<"), "le": ("]", "≤")}


def _constraints(metadata: list) -> str:
    """` > 0`, ` in [0, 1]`, ` (at least 1)` from pydantic's annotated-types metadata."""
    bounds = {name: getattr(item, name) for item in metadata for name in _BOUNDS if hasattr(item, name)}
    lower = next(((name, value) for name, value in bounds.items() if name in ("gt", "ge")), None)
    upper = next(((name, value) for name, value in bounds.items() if name in ("lt", "le")), None)
    text = ""
    if lower and upper:
        text = f" in {_BOUNDS[lower[0]][0]}{lower[1]:g}, {upper[1]:g}{_BOUNDS[upper[0]][0]}"
    elif lower or upper:
        name, value = lower or upper
        text = f" {_BOUNDS[name][1]} {value:g}"
    lengths = [item.min_length for item in metadata if getattr(item, "min_length", None)]
    return text + (f" (at least {lengths[0]})" if lengths else "")


def _type_text(annotation: Any, metadata: list = ()) -> str:
    """A field's type as a reader writes it in YAML: `int > 0`, `list of float in [0, 1]`, `null`."""
    import types
    import typing

    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Annotated:
        inner = [item for extra in args[1:] for item in getattr(extra, "metadata", [extra])]
        return _type_text(args[0], [*inner, *metadata])
    if origin is Literal:
        return " or ".join(f'"{value}"' for value in args)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_text(arg) for arg in args) + _constraints(list(metadata))
    if origin is list:
        return f"list of {_type_text(args[0])}" + _constraints(list(metadata))
    if annotation is type(None):
        return "null"
    return getattr(annotation, "__name__", str(annotation)) + _constraints(list(metadata))


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _value_text(value: Any) -> str:
    import json

    return "`" + json.dumps(value, ensure_ascii=False) + "`"


def _section_reference(model: BaseModel, path: str, description: str, level: int, out: list[str]) -> None:
    """Append `path`'s heading, `description` and a table of every field of `model` with its value
    in the default `model`; then one such part per nested section, depth first."""
    fields = type(model).model_fields
    nested = [name for name, field in fields.items() if isinstance(getattr(model, name), BaseModel)]
    out += ["#" * level + f" `{path}`", "", _cell(description), ""]
    rows = []
    for name, field in fields.items():
        if name in nested:
            continue
        rows.append(f"| `{path}.{name}` | {_cell(_type_text(field.annotation, field.metadata))} | "
                    f"{_cell(_value_text(getattr(model, name)))} | {_cell(field.description or '')} |")
    for name, value in (model.model_extra or {}).items():  # a ModelConfig default's arguments
        rows.append(f"| `{path}.{name}` | model argument | {_cell(_value_text(value))} | "
                    f"An argument of the model `{model.name}` (see the model arguments above). |")
    if type(model).model_config.get("extra") == "allow":
        rows.append(f"| `{path}.*` | model argument | | Any other argument the model takes. |")
    if rows:
        out += ["| key | type | default | description |", "|---|---|---|---|", *rows, ""]
    for name in nested:
        _section_reference(getattr(model, name), f"{path}.{name}", fields[name].description or "", 3, out)


def config_reference() -> str:
    """Markdown for docs/configuration.md: per section of `Config`, a table of every key (dotted
    path), its type, its default and its description, nested sections after their parent."""
    out: list[str] = []
    defaults = Config()
    for name in Config.model_fields:
        section = getattr(defaults, name)
        doc = " ".join(line.strip() for line in (type(section).__doc__ or "").splitlines() if line.strip())
        _section_reference(section, name, doc, 2, out)
    return "\n".join(out).rstrip() + "\n"
