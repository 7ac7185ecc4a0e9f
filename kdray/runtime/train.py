"""The one training loop: every model trained on a dataset (teacher, ensemble member, student,
hard-label baseline, sweep trial) runs `train_worker` under a Ray Train `TorchTrainer`.

Stages differ only by `FitSpec`: the model, the optimiser settings, and the loss (hard labels, or
the distillation loss against cached teacher logits). Each epoch reports metrics and, from rank 0, a
checkpoint; a restarted worker group (FailureConfig) or a re-run of the same run name resumes from
the latest checkpoint. Epochs are reproducible from (seed, epoch, rank) alone, so a resumed run
follows the same trajectory as an uninterrupted one.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from kdray.config import ResourcesConfig, TrainConfig
from kdray.distill.losses import distillation_loss, expand_topk_logits, hard_target_loss
from kdray.models import apply_max_norm
from kdray.runtime.artifacts import ModelSpec, unwrap
from kdray.runtime.faults import dying_at_fault, forwarded_env

CHECKPOINT_FILE = "state.pt"
TEACHER_LOGITS = "t"  # full teacher logits [C]
TOPK_COLUMNS = ("t_values", "t_indices", "t_rest")  # top-k compressed teacher logits
# Training rows come from Ray Data in windows of up to SHUFFLE_WINDOW_BATCHES batches (at most
# SHUFFLE_WINDOW_BYTES), shuffled within the window. Each window handed over costs Ray Data's
# iterator and executor threads CPU beside the training loop, so windows are large and two are
# prefetched (the sizes measured in benchmarks/performance.md).
SHUFFLE_WINDOW_BATCHES = 32
SHUFFLE_WINDOW_BYTES = 64 << 20
PREFETCH_WINDOWS = 2
# Tensor types of the columns a training or evaluation stream may carry.
DTYPES = {"x": torch.float32, "y": torch.int64, TEACHER_LOGITS: torch.float32, TOPK_COLUMNS[0]: torch.float32,
          TOPK_COLUMNS[1]: torch.int64, TOPK_COLUMNS[2]: torch.float32}
# Ray Train's controller takes the workers' reports when it polls them, every
# RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (2 s by default), and a worker's `ray.train.report` waits for that
# poll (its result queue holds one report). So an epoch shorter than the interval waits out the rest
# of it, and a worker dying within it loses its last report's checkpoint. kdray's epochs on small
# data take well under a second, so its runs poll every TRAIN_POLL_S (what that saves:
# benchmarks/performance.md). The controller passes the setting on to the workers.
TRAIN_POLL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
TRAIN_POLL_S = 0.2


@dataclass(frozen=True)
class BatchLoss:
    """A training objective: `compute(logits, batch, loss, num_classes) -> (total, {term: value})`;
    `needs_teacher`: the batch carries the teacher's cached logits."""

    compute: Callable[..., tuple[torch.Tensor, dict[str, torch.Tensor]]]
    needs_teacher: bool


def _hard_loss(logits, batch, loss, num_classes):
    total = hard_target_loss(logits, batch["y"])
    return total, {"hard": total.detach()}


def _distill_loss(logits, batch, loss, num_classes):
    terms = distillation_loss(logits, teacher_logits(batch, loss, num_classes), batch["y"], loss.temperature,
                              loss.hard_weight)
    return terms.total, {"soft": terms.soft.detach(), "hard": terms.hard.detach()}


# The objectives a LossSpec names: looked up by name, so a new one is an entry here, not a branch in
# the batch loop.
BATCH_LOSSES: dict[str, BatchLoss] = {"hard": BatchLoss(_hard_loss, needs_teacher=False),
                                      "distill": BatchLoss(_distill_loss, needs_teacher=True)}


@dataclass(frozen=True)
class LossSpec:
    kind: str = "hard"  # a name in BATCH_LOSSES
    temperature: float = 1.0
    hard_weight: float = 1.0
    top_k: int | None = None  # teacher logits stored as top-k columns

    def __post_init__(self) -> None:
        if self.kind not in BATCH_LOSSES:
            raise ValueError(f"unknown loss kind {self.kind!r}; registered: {sorted(BATCH_LOSSES)}")

    def columns(self) -> list[str]:
        if not BATCH_LOSSES[self.kind].needs_teacher:
            return ["x", "y"]
        return ["x", "y", *(TOPK_COLUMNS if self.top_k else (TEACHER_LOGITS,))]


@dataclass(frozen=True)
class FitSpec:
    """Everything a worker needs, as plain values (pickled to the workers)."""

    model: ModelSpec
    train: TrainConfig
    loss: LossSpec = LossSpec()
    init_weights: dict[str, torch.Tensor] | None = field(default=None, repr=False)


# ------------------------------------------------------------------------------------ pieces
def make_optimizer(parameters: Iterable[nn.Parameter], config: TrainConfig) -> torch.optim.Optimizer:
    if config.optimizer == "sgd":
        return torch.optim.SGD(parameters, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    optimizer = torch.optim.AdamW if config.optimizer == "adamw" else torch.optim.Adam
    return optimizer(parameters, lr=config.lr, weight_decay=config.weight_decay)


def make_schedule(optimizer: torch.optim.Optimizer, config: TrainConfig) -> torch.optim.lr_scheduler.LRScheduler:
    """Stepped once per epoch."""
    if config.lr_schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs)
    if config.lr_schedule == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=max(1, config.epochs // 3), gamma=0.1)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: 1.0)


def teacher_logits(batch: dict[str, torch.Tensor], loss: LossSpec, num_classes: int) -> torch.Tensor:
    """The batch's cached teacher logits [B, C], expanded when stored as top-k columns."""
    if loss.top_k:
        values, indices, rest = (batch[name] for name in TOPK_COLUMNS)
        return expand_topk_logits(values, indices, rest, num_classes)
    return batch[TEACHER_LOGITS]


def batch_loss(model: nn.Module, batch: dict[str, torch.Tensor], loss: LossSpec, num_classes: int):
    """(total loss, logits, terms dict) for one batch."""
    logits = model(batch["x"])
    total, terms = BATCH_LOSSES[loss.kind].compute(logits, batch, loss, num_classes)
    return total, logits, terms


def train_epoch(model, optimizer, batches, loss: LossSpec, config: TrainConfig, num_classes: int) -> dict[str, float]:
    """One pass over `batches`; returns mean loss terms and the training error on labelled rows."""
    model.train()
    sums: dict[str, float] = {}
    rows = labelled = wrong = 0
    for batch in batches:
        total, logits, terms = batch_loss(model, batch, loss, num_classes)
        if not torch.isfinite(total):
            raise FloatingPointError(f"non-finite loss {total.item()} at batch {rows // max(1, len(logits))}")
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()
        if config.max_norm is not None:
            apply_max_norm(unwrap(model), config.max_norm)
        size = len(logits)
        rows += size
        for name, value in {"loss": total.detach(), **terms}.items():
            sums[name] = sums.get(name, 0.0) + float(value) * size
        mask = batch["y"] >= 0
        labelled += int(mask.sum())
        wrong += int((logits.argmax(1)[mask] != batch["y"][mask]).sum())
    metrics = {name: value / max(1, rows) for name, value in sums.items()}
    metrics.update(rows=rows, train_error=wrong / max(1, labelled))
    return metrics


@torch.no_grad()
def evaluate_batches(model: nn.Module, batches) -> torch.Tensor:
    """Sums over labelled rows: tensor [rows, errors, nll]."""
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64)
    for batch in batches:
        logits, labels = model(batch["x"]), batch["y"]
        mask = labels >= 0
        logits, labels = logits[mask], labels[mask]
        totals += torch.tensor([
            len(labels),
            float((logits.argmax(1) != labels).sum()),
            float(nn.functional.cross_entropy(logits.float(), labels, reduction="sum")),
        ], dtype=torch.float64)
    return totals


# Held-out datasets a fit may evaluate each epoch, and the prefix of their metrics.
EVALUATED = {"validation": "val", "test": "test"}


def evaluation_metrics(totals: torch.Tensor, prefix: str = "val") -> dict[str, float]:
    rows = max(1.0, float(totals[0]))
    return {f"{prefix}_error": float(totals[1]) / rows, f"{prefix}_nll": float(totals[2]) / rows}


def stream_tensors(rows, batch_size: int, device: torch.device | str = "cpu",
                   dtypes: dict[str, torch.dtype] | None = None) -> Iterable[dict[str, torch.Tensor]]:
    """One pass over `rows` (a Ray Dataset or a Train dataset shard) in batches of column tensors
    on `device`, converted without a per-row copy (kdray.data.tensors)."""
    from kdray.data.tensors import TensorColumns

    return rows.iter_torch_batches(batch_size=batch_size, device=device, collate_fn=TensorColumns(dtypes or DTYPES),
                                   prefetch_batches=PREFETCH_WINDOWS)


def window_rows(batch_size: int, row_bytes: int) -> int:
    """Rows per shuffle window: SHUFFLE_WINDOW_BATCHES batches, fewer if that exceeds
    SHUFFLE_WINDOW_BYTES, never less than one batch."""
    fitting = SHUFFLE_WINDOW_BYTES // max(1, batch_size * row_bytes)
    return batch_size * max(1, min(SHUFFLE_WINDOW_BATCHES, fitting))


def row_bytes(model: ModelSpec) -> int:
    """An upper bound on a training row's tensor bytes: float32 features and one float32 value per
    output (teacher logits), plus the label."""
    return 4 * (math.prod(model.input_shape) + model.num_outputs) + 8


def shuffle_window(windows, batch_size: int, generator: torch.Generator):
    """Split each window of rows (a dict of column tensors, `window_rows` long)
    into batches of `batch_size` rows drawn in a random order.

    Ray Data's own local shuffle buffer depends on how rows happen to be cut into blocks, which
    varies from run to run; this one depends only on the (ordered) row stream and the generator,
    so a resumed epoch sees exactly the batches the interrupted one would have. Fetching whole
    windows from Ray Data (rather than batches to be concatenated) also divides its per-batch
    overhead by the window length.
    """
    for window in windows:
        order = torch.randperm(len(window["x"]), generator=generator, device=generator.device)
        for start in range(0, len(order), batch_size):
            index = order[start:start + batch_size]
            yield {name: column[index] for name, column in window.items()}


class EpochCache:
    """An epoch's stream of tensor batches, kept after the first complete pass if it fits in
    `budget` bytes, and replayed instead of streaming the data again.

    kdray's shards stream in a fixed order (see kdray.data.shards.ordered), so the kept batches
    are exactly what streaming again would yield: cached and streamed epochs train identically
    (a resumed run still equals an uninterrupted one); only Ray Data's per-batch cost is gone,
    which dominates for small models. A pass that stops early (a fault) or outgrows the budget
    keeps nothing, and a dataset bigger than the budget streams every epoch.
    """

    def __init__(self, budget: int):
        self.budget = budget
        self.batches: list[dict[str, torch.Tensor]] | None = None

    def epoch(self, stream: Callable[[], Iterable[dict[str, torch.Tensor]]]) -> Iterable[dict[str, torch.Tensor]]:
        """The epoch's batches: replayed when cached, else `stream()` (recorded while it fits)."""
        if self.batches is not None:
            return iter(self.batches)
        return self._record(stream()) if self.budget > 0 else stream()

    def _record(self, batches: Iterable[dict[str, torch.Tensor]]):
        kept: list | None = []
        size = 0
        for batch in batches:
            if kept is not None:
                size += sum(tensor.numel() * tensor.element_size() for tensor in batch.values())
                if size <= self.budget:
                    kept.append(batch)
                else:
                    kept = None  # too big: this dataset streams every epoch
            yield batch
        if kept is not None:  # reached only when the whole pass was consumed
            self.batches = kept


# ------------------------------------------------------------------------------------ the worker
def _seed_epoch(seed: int, epoch: int, rank: int) -> None:
    # Reseeding from (seed, epoch, rank) instead of carrying RNG state makes a resumed epoch
    # identical to the one an uninterrupted run would have trained.
    torch.manual_seed(hash((seed, epoch, rank)) % (2**31))


def _restore(model: nn.Module, optimizer, schedule) -> tuple[int, list[dict]]:
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return 0, []
    with checkpoint.as_directory() as directory:
        state = torch.load(os.path.join(directory, CHECKPOINT_FILE), map_location="cpu", weights_only=True)
    unwrap(model).load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    schedule.load_state_dict(state["schedule"])
    return state["epoch"] + 1, state["history"]


def _report(metrics: dict, model, optimizer, schedule, epoch: int, history: list[dict]) -> None:
    import ray.train

    if ray.train.get_context().get_world_rank() != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as directory:
        torch.save({"epoch": epoch, "model": unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
                    "schedule": schedule.state_dict(), "history": history}, os.path.join(directory, CHECKPOINT_FILE))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))


def train_worker(loop_config: dict[str, Any]) -> None:
    """The per-worker function TorchTrainer runs.

    loop_config = {"spec": FitSpec, "evaluated": names of the held-out datasets (keys of EVALUATED),
    "cache_bytes": memory for keeping epochs' data (ResourcesConfig.epoch_cache_mb)}."""
    import ray.train
    from ray.train.torch import get_device, prepare_model

    spec: FitSpec = loop_config["spec"]
    context = ray.train.get_context()
    rank, device = context.get_world_rank(), get_device()
    torch.manual_seed(spec.train.seed)  # identical initial weights on every rank
    model = spec.model.build()
    if spec.init_weights is not None:
        model.load_state_dict(spec.init_weights)
    model = prepare_model(model)
    optimizer = make_optimizer(model.parameters(), spec.train)
    schedule = make_schedule(optimizer, spec.train)
    start, history = _restore(model, optimizer, schedule)
    resumed = start > 0
    train_shard = ray.train.get_dataset_shard("train")
    evaluated = {name: ray.train.get_dataset_shard(name) for name in loop_config["evaluated"]}
    # Training data gets half the cache budget, the held-out sets share the rest. DDP workers get
    # equal row counts (streaming_split(equal=True)), so all of them cache, or none: one still
    # streaming would wait at the split's epoch barrier for the others.
    cache_bytes = loop_config["cache_bytes"]
    train_cache = EpochCache(cache_bytes // 2)
    evaluated_caches = {name: EpochCache(cache_bytes // 2 // len(evaluated)) for name in evaluated}
    for epoch in range(start, spec.train.epochs):
        _seed_epoch(spec.train.seed, epoch, rank)
        started = time.perf_counter()
        window = window_rows(spec.train.batch_size, row_bytes(spec.model))
        windows = train_cache.epoch(lambda: stream_tensors(train_shard, window, device))
        generator = torch.Generator(device=device).manual_seed(spec.train.seed * 1000 + epoch)
        batches = shuffle_window(windows, spec.train.batch_size, generator)
        if rank == 0:
            batches = dying_at_fault(batches, epoch, first_attempt=not resumed, settle_s=_checkpoint_settle_s())
        metrics = train_epoch(model, optimizer, batches, spec.loss, spec.train, spec.model.num_outputs)
        schedule.step()
        seconds = time.perf_counter() - started
        if rank == 0:  # held-out sets are not split: rank 0 sees all of them
            for name, shard in evaluated.items():
                batches = evaluated_caches[name].epoch(lambda shard=shard: stream_tensors(shard, 1024, device))
                metrics.update(evaluation_metrics(evaluate_batches(model, batches), EVALUATED[name]))
        metrics.update(epoch=epoch + 1, seconds=seconds,
                       rows_per_second=metrics["rows"] / max(seconds, 1e-9), lr=schedule.get_last_lr()[0])
        history.append({k: float(v) for k, v in metrics.items()})
        _report(metrics, model, optimizer, schedule, epoch, history)


# ------------------------------------------------------------------------------------ the driver
@dataclass(frozen=True)
class FitResult:
    state_dict: dict[str, torch.Tensor]
    history: list[dict[str, float]]
    metrics: dict[str, Any]


def _checkpoint_settle_s() -> float:
    # The controller commits a checkpoint when it polls the workers (see TRAIN_POLL_ENV): a worker
    # dying sooner after its report loses it. Two polls make the resumed epoch deterministic.
    return 2 * float(os.environ.get(TRAIN_POLL_ENV, "2")) + 0.5


def poll_workers_often() -> None:
    """Have the training runs this process starts poll their workers every TRAIN_POLL_S seconds,
    unless the environment sets TRAIN_POLL_ENV itself (Ray Train reads it when a run starts)."""
    os.environ.setdefault(TRAIN_POLL_ENV, str(TRAIN_POLL_S))


def use_gpu(resources: ResourcesConfig) -> bool:
    if resources.use_gpu == "auto":
        import ray

        return ray.cluster_resources().get("GPU", 0) > 0
    return bool(resources.use_gpu)


def scaling_config(resources: ResourcesConfig, num_workers: int | None = None):
    from ray.train import ScalingConfig

    gpu = use_gpu(resources)
    per_worker = {"CPU": resources.cpus_per_worker}
    if gpu:
        per_worker["GPU"] = resources.gpus_per_worker
    return ScalingConfig(num_workers=num_workers or resources.num_workers, use_gpu=gpu,
                         resources_per_worker=per_worker)


def concurrent_fits(resources: ResourcesConfig) -> int:
    """How many training runs of `resources.num_workers` workers to start at once:
    `resources.concurrent_members`, or fewer where the cluster's CPUs (less a reserve for the runs' Ray Data reads) and GPUs hold
    fewer. Two 1-CPU runs on a 2-CPU machine would leave their reads no CPU and wait forever."""
    from kdray.runtime.session import runs_that_fit

    gpus = resources.gpus_per_worker * resources.num_workers if use_gpu(resources) else 0.0
    return min(resources.concurrent_members, runs_that_fit(resources.cpus_per_worker * resources.num_workers, gpus))


def fit(spec: FitSpec, datasets: dict[str, Any], resources: ResourcesConfig, storage_path: str, name: str,
        callbacks: list | None = None, num_workers: int | None = None) -> FitResult:
    """Train with TorchTrainer; checkpoints under `storage_path/name` (re-running resumes there).

    `datasets` holds Ray Datasets "train" (with the columns `spec.loss.columns()`) and
    "validation", and optionally "test": held-out sets evaluated after every epoch, their metrics
    reported as val_error/val_nll and test_error/test_nll (test is for analysis, e.g. a sweep's
    heatmaps; nothing selects on it).
    """
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig
    from ray.train.torch import TorchTrainer

    evaluated = [name for name in EVALUATED if name in datasets]
    selected = {"train": datasets["train"].select_columns(spec.loss.columns()),
                **{name: datasets[name].select_columns(["x", "y"]) for name in evaluated}}
    scaling = scaling_config(resources, num_workers)
    poll_workers_often()
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"spec": spec, "evaluated": evaluated, "cache_bytes": resources.epoch_cache_mb * 2**20},
        scaling_config=scaling,
        datasets=selected,
        # Only training data is split, and only between several workers: a split needs a
        # coordinator actor, whose start-up costs seconds per run on a small machine; the
        # held-out sets stream whole to rank 0. Train takes its ingest options from the
        # driver's global DataContext, not the dataset's own, so the dataset's order-keeping
        # options (see kdray.data.shards.ordered) are handed over explicitly.
        dataset_config=DataConfig(datasets_to_split=["train"] if scaling.num_workers > 1 else [],
                                  execution_options={name: ds.context.execution_options
                                                     for name, ds in selected.items()}),
        run_config=RunConfig(name=name, storage_path=storage_path,
                             failure_config=FailureConfig(max_failures=resources.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2),
                             callbacks=callbacks or [], worker_runtime_env=forwarded_env()),
    )
    result = _fit_keeping_sigint_handler(trainer)
    if result.checkpoint is None:
        raise RuntimeError(f"training run {name} finished without a checkpoint")
    with result.checkpoint.as_directory() as directory:
        state = torch.load(os.path.join(directory, CHECKPOINT_FILE), map_location="cpu", weights_only=True)
    return FitResult(state_dict=state["model"], history=state["history"], metrics=dict(result.metrics or {}))


def _fit_keeping_sigint_handler(trainer):
    # TrainController installs a SIGINT handler that holds its actor handle; left in place it
    # keeps every finished run's controller actor alive (hundreds of MB each) for the driver's
    # lifetime. Restoring the previous handler drops that handle, and the controller exits.
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return trainer.fit()
    previous = signal.getsignal(signal.SIGINT)
    try:
        return trainer.fit()
    finally:
        signal.signal(signal.SIGINT, previous)


def fit_and_save(spec: FitSpec, datasets: dict[str, Any], resources: ResourcesConfig, work: str, output,
                 name: str, callbacks: list | None = None) -> list[dict[str, float]]:
    """`fit` under the run name `name` (checkpoints in `work`), then the model's bundle and its
    history saved as `output/name/`; returns the history."""
    from kdray.runtime.artifacts import save_bundle

    result = fit(spec, datasets, resources, work, name, callbacks=callbacks)
    save_bundle(output, name, spec.model, result.state_dict)
    output.write_json(result.history, name, "history.json")
    return result.history


def final_metrics(history: list[dict[str, float]]) -> dict[str, float]:
    last = history[-1] if history else {}
    return {key: last[key] for key in ("val_error", "val_nll", "train_error", "loss") if key in last and math.isfinite(last[key])}
