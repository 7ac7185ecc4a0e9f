"""Specialists: one Ray actor per class subset, trained independently (paper, section 5.2).

A specialist over the classes S (|S| = K) is the generalist's body with a new head of K + 1 outputs:
S in order, then one **dustbin** for every other class. Its head starts from the generalist's: the
rows of S are copied, the dustbin row is the mean of the other classes' rows with bias
mean(b_rest) + log(C - K) + log(r) (the rest's total logit if their logits were equal, lowered by
the stream's under-sampling r below), so the untrained specialist is the generalist coarsened to
S + dustbin under its training stream's class prior.

**Its stream.** Each epoch reads, with Ray Data, the per-class files the clustering stage wrote
(`kdray.specialists.clustering.write_class_index`): every row of S (n_S rows) and a uniform sample of the
n_rest other rows at the fraction

    r = min(1, n_S (1 - f) / (f n_rest)),    f = specialists.subset_fraction (1/2: half and half),

namely the rows whose hash u lies in the window [e r, e r + r) mod 1 at epoch e, a different sample
each epoch. Class files are sorted by u, so the window is a run of row groups that Parquet's
statistics select without decoding the others (no full scan per specialist per epoch).

**The dustbin correction.** Within S the stream keeps natural proportions; the rest is thinned by
r. Relative to the special classes, the dustbin's prior is therefore r times its natural one, and a
classifier trained on the stream has log-odds (dustbin vs any c in S) lower by exactly log r than
one trained on natural data (Bayes' rule: the likelihoods are unchanged, only the priors moved).
The oversampling factor of the special classes is the odds ratio

    factor = (n_S / (r n_rest)) / (n_S / n_rest) = 1 / r,

and after training the dustbin logit is raised by log(factor) = -log r, stored as the bundle's
`logit_bias` (0 for every class of S), so every consumer applies it (`dustbin_log_factor`).

**Fault tolerance.** Each actor checkpoints model, optimiser, schedule and history after every epoch
to RUN/_work/specialists-FP/NAME/state.pt (a plain state dict, loaded with weights_only=True). An
actor that dies is restarted by Ray (max_restarts) and its `train` call retried (max_task_retries);
it resumes from the checkpoint. A finished specialist's bundle is in RUN/specialists/NAME/, and a
re-run of the stage trains only the specialists without one.
"""

from __future__ import annotations

import io
import math
import time
from dataclasses import dataclass

import torch
from torch import nn

from kdray.config import Config, ResourcesConfig, TrainConfig
from kdray.data.sampling import model_seed
from kdray.data.shards import read_parquet
from kdray.distill.losses import MIN_LOG_MASS, ensemble_logits
from kdray.evaluation.inference import ModelRef
from kdray.models import replace_head
from kdray.runtime.artifacts import BiasedLogits, ModelSpec, load_bundle, load_spec, save_bundle
from kdray.runtime.faults import dying_at_fault, forwarded_env
from kdray.runtime.session import runs_that_fit, unwrap_remote_error
from kdray.runtime.storage import Storage
from kdray.runtime.train import (
    LossSpec,
    evaluate_batches,
    evaluation_metrics,
    make_optimizer,
    make_schedule,
    train_epoch,
)
from kdray.specialists.clustering import INDEX_MANIFEST

CHECKPOINT, HISTORY = "state.pt", "history.json"
MAX_RESTARTS = 3
READ_CPUS = 0.25  # each Ray Data read task inside a specialist
SHUFFLE_BYTES = 64 * 2**20  # a specialist's local shuffle buffer, at most


def shuffle_buffer_rows(epoch_rows: int, row_bytes: int, batch_size: int) -> int:
    """Rows in a specialist's local shuffle buffer.

    Its stream arrives class file by class file (each file one class), so a buffer of a few
    thousand rows holds one or two classes at a time and so does every batch drawn from it: SGD
    then drifts towards whichever classes were read last. The buffer holds the whole epoch when
    that fits in SHUFFLE_BYTES (so every batch mixes all of the specialist's classes and the rest),
    else as much of it as fits, and always a few batches.
    """
    return max(4 * batch_size, min(epoch_rows, SHUFFLE_BYTES // max(1, row_bytes)))


def specialist_name(index: int) -> str:
    return f"specialist-{index:02d}"


# ------------------------------------------------------------------------------------ pure pieces
def rest_sample_fraction(subset_rows: int, rest_rows: int, subset_fraction: float) -> float:
    """r: the fraction of the other classes' rows a specialist sees per epoch, so that its own
    classes make up `subset_fraction` of the stream (1 when the rest is too small for that)."""
    if not 0 < subset_fraction < 1:
        raise ValueError(f"subset_fraction must lie in (0, 1), got {subset_fraction!r}")
    if rest_rows <= 0:
        return 1.0
    return min(1.0, subset_rows * (1 - subset_fraction) / (subset_fraction * rest_rows))


def dustbin_log_factor(rest_fraction: float) -> float:
    """log of the special classes' oversampling factor 1 / r: what the dustbin logit is raised by."""
    if not 0 < rest_fraction <= 1:
        raise ValueError(f"rest_fraction must lie in (0, 1], got {rest_fraction!r}")
    return -math.log(rest_fraction)


def local_labels(classes: tuple[int, ...], num_classes: int) -> torch.Tensor:
    """[C] int64: class c -> its position in `classes`, or K (the dustbin) when c is not in it."""
    lookup = torch.full((num_classes,), len(classes), dtype=torch.int64)
    lookup[list(classes)] = torch.arange(len(classes))
    return lookup


def coarsen_log_probs(log_probs: torch.Tensor, classes: tuple[int, ...]) -> torch.Tensor:
    """[B, C] log-probabilities -> [B, K + 1]: those of `classes`, then the log of the rest's total
    (MIN_LOG_MASS when there is no rest). The generalist's soft targets in a specialist's classes."""
    inside = torch.zeros(log_probs.shape[1], dtype=torch.bool, device=log_probs.device)
    inside[list(classes)] = True
    rest = torch.logsumexp(log_probs[:, ~inside], dim=1, keepdim=True) if (~inside).any() \
        else torch.full_like(log_probs[:, :1], MIN_LOG_MASS)
    return torch.cat([log_probs[:, list(classes)], rest.clamp(min=MIN_LOG_MASS)], dim=1)


def init_specialist(generalist: nn.Module, classes: tuple[int, ...], rest_fraction: float) -> nn.Module:
    """The generalist with a K + 1 head initialised as the module docstring says."""
    bias = None
    if isinstance(generalist, BiasedLogits):  # a bias-corrected generalist: fold its bias into the head
        generalist, bias = generalist.model, generalist.bias
    model = replace_head(generalist, len(classes) + 1)
    weight, head_bias = generalist.head.weight.detach(), generalist.head.bias
    head_bias = torch.zeros(weight.shape[0]) if head_bias is None else head_bias.detach()
    if bias is not None:
        head_bias = head_bias + bias
    rest = [c for c in range(weight.shape[0]) if c not in set(classes)]
    with torch.no_grad():
        model.head.weight[:-1] = weight[list(classes)]
        if rest:
            model.head.weight[-1] = weight[rest].mean(0)
        else:
            model.head.weight[-1] = 0.0
        if model.head.bias is not None:
            model.head.bias[:-1] = head_bias[list(classes)]
            model.head.bias[-1] = (head_bias[rest].mean() + math.log(len(rest)) + math.log(rest_fraction)
                                   if rest else MIN_LOG_MASS)
    return model


# ------------------------------------------------------------------------------------ one specialist
@dataclass(frozen=True)
class SpecialistJob:
    """Everything one specialist actor needs, as plain values."""

    name: str
    seed_index: int
    classes: tuple[int, ...]
    class_rows: tuple[int, ...]  # training rows of every class [C]
    class_index: str  # location of the per-class files
    generalist: ModelRef
    dataset: str  # its validation split scores the specialist each epoch
    train: TrainConfig
    subset_fraction: float
    soft_target_weight: float
    temperature: float
    output: str  # bundles go to output/NAME
    work: str  # checkpoints go to work/NAME

    @property
    def num_classes(self) -> int:
        return len(self.class_rows)

    @property
    def subset_rows(self) -> int:
        return sum(self.class_rows[c] for c in self.classes)

    @property
    def rest_fraction(self) -> float:
        return rest_sample_fraction(self.subset_rows, sum(self.class_rows) - self.subset_rows, self.subset_fraction)

    @property
    def epoch_rows(self) -> int:
        """Rows one epoch streams: all of the subset's and a rest_fraction of the others'."""
        return self.subset_rows + math.ceil(self.rest_fraction * (sum(self.class_rows) - self.subset_rows))

    def loss(self) -> LossSpec:
        if self.soft_target_weight > 0:
            return LossSpec("distill", self.temperature, 1.0 - self.soft_target_weight)
        return LossSpec("hard")


def epoch_rows(job: SpecialistJob, epoch: int, seed: int = 0):
    """A specialist's stream for one epoch, as a lazy Ray Dataset of x, y (global labels): every row
    of its classes and the other classes' rows whose hash u lies in [epoch r, epoch r + r) mod 1."""
    import ray.data
    from ray.data.expressions import col

    index = Storage(job.class_index)
    files = index.read_json(INDEX_MANIFEST)["files"]
    r = job.rest_fraction
    rows = read_parquet([index.path(name) for name in files.values()], index.filesystem,
                                 shuffle=ray.data.FileShuffleConfig(seed=seed), num_cpus=READ_CPUS)
    if r < 1:
        # Pushed down into the Parquet scan: row groups whose u range misses the window are skipped.
        low = (epoch * r) % 1.0
        high = low + r
        window = (col("u") >= low) & (col("u") < high) if high <= 1 else (col("u") >= low) | (col("u") < high - 1)
        rows = rows.filter(expr=col("y").is_in(list(job.classes)) | window)
    return rows.select_columns(["x", "y"])


class SpecialistTrainer:
    """The body of a specialist actor: `train()` runs (or resumes) its epochs and saves its bundle.

    Runs without Ray too (tests, benchmarks): only the data stream uses Ray Data.
    """

    def __init__(self, job: SpecialistJob):
        import ray
        import ray.data

        ray.data.DataContext.get_current().enable_progress_bars = False
        self.job = job
        self.device = torch.device("cuda" if ray.is_initialized() and ray.get_gpu_ids() else "cpu")
        generalist_storage = Storage(job.generalist.location)
        # An ensemble generalist: soft targets from all members, weights from the first.
        trusted = job.generalist.trusted
        self.generalists = [load_bundle(generalist_storage, b, self.device, trusted)[0] for b in job.generalist.bundles]
        input_shape = load_spec(generalist_storage, job.generalist.bundles[0]).input_shape
        self.shuffle_rows = shuffle_buffer_rows(job.epoch_rows, 4 * math.prod(input_shape) + 8, job.train.batch_size)
        self.labels = local_labels(job.classes, job.num_classes).to(self.device)
        self.dustbin_bias = dustbin_log_factor(job.rest_fraction)
        self.validation = self._validation_rows()

    # -------------------------------------------------------------- data
    def batches(self, epoch: int):
        """Training batches for `train_epoch`: x, local labels y and, with soft targets, t."""
        rows = epoch_rows(self.job, epoch, self._seed(epoch))
        for batch in rows.iter_torch_batches(batch_size=self.job.train.batch_size, device=self.device,
                                             dtypes={"x": torch.float32, "y": torch.int64},
                                             local_shuffle_buffer_size=self.shuffle_rows,
                                             local_shuffle_seed=self._seed(epoch)):
            out = {"x": batch["x"], "y": self.labels[batch["y"]]}
            if self.job.soft_target_weight > 0:
                out["t"] = self.soft_targets(batch["x"])
            yield out

    @torch.no_grad()
    def soft_targets(self, x: torch.Tensor) -> torch.Tensor:
        outputs = torch.stack([net(x) for net in self.generalists])
        log_probs = torch.log_softmax(outputs[0], -1) if len(outputs) == 1 else ensemble_logits(outputs)
        return coarsen_log_probs(log_probs, self.job.classes)

    def _validation_rows(self) -> dict[str, torch.Tensor] | None:
        """The validation rows of the specialist's own classes, held (a small share of a small split)."""
        from ray.data.expressions import col

        from kdray.data import read_split

        rows = read_split(Storage(self.job.dataset), "validation").filter(expr=col("y").is_in(list(self.job.classes)))
        xs, ys = [], []
        for batch in rows.select_columns(["x", "y"]).iter_torch_batches(
                batch_size=4096, dtypes={"x": torch.float32, "y": torch.int64}, device=self.device):
            xs.append(batch["x"])
            ys.append(self.labels[batch["y"]])
        return {"x": torch.cat(xs), "y": torch.cat(ys)} if xs else None

    def _seed(self, epoch: int) -> int:
        return model_seed(self.job.train.seed, self.job.seed_index) + epoch

    # -------------------------------------------------------------- training
    def train(self) -> dict:
        """Train the remaining epochs (resuming from the last checkpoint) and save the bundle."""
        job, work = self.job, Storage(self.job.work).child(self.job.name)
        torch.manual_seed(self._seed(0))
        model = init_specialist(self.generalists[0], job.classes, job.rest_fraction).to(self.device)
        optimizer = make_optimizer(model.parameters(), job.train)
        schedule = make_schedule(optimizer, job.train)
        start, history = 0, []
        if work.exists(CHECKPOINT):
            state = torch.load(io.BytesIO(work.read_bytes(CHECKPOINT)), map_location=self.device, weights_only=True)
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            schedule.load_state_dict(state["schedule"])
            start, history = state["epoch"] + 1, state["history"]
        num_outputs = len(job.classes) + 1
        for epoch in range(start, job.train.epochs):
            torch.manual_seed(self._seed(epoch))
            started = time.perf_counter()
            metrics = train_epoch(model, optimizer, dying_at_fault(self.batches(epoch), epoch, first_attempt=start == 0),
                                  job.loss(), job.train, num_outputs)
            schedule.step()
            metrics.update(self._validate(model), epoch=epoch + 1, seconds=time.perf_counter() - started)
            history.append({key: float(value) for key, value in metrics.items()})
            buffer = io.BytesIO()
            torch.save({"epoch": epoch, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                        "schedule": schedule.state_dict(), "history": history}, buffer)
            work.write_bytes(buffer.getvalue(), CHECKPOINT)
        return self._save(model, history, start)

    def _validate(self, model: nn.Module) -> dict[str, float]:
        """Error on its own classes' validation rows, dustbin correction applied (a dustbin answer is wrong)."""
        if self.validation is None:
            return {}
        corrected = BiasedLogits(model, tuple([0.0] * len(self.job.classes) + [self.dustbin_bias])).to(self.device)
        return evaluation_metrics(evaluate_batches(corrected, [self.validation]))

    def _save(self, model: nn.Module, history: list[dict], start: int) -> dict:
        job, output = self.job, Storage(self.job.output)
        spec = load_spec(Storage(job.generalist.location), job.generalist.bundles[0])
        bias = [0.0] * len(job.classes) + [self.dustbin_bias]
        extra = {"classes": list(job.classes), "dustbin": len(job.classes), "rest_fraction": job.rest_fraction,
                 "oversampling_factor": 1.0 / job.rest_fraction, "subset_rows": job.subset_rows}
        specialist = ModelSpec(spec.name, spec.options, spec.input_shape, len(job.classes) + 1,
                               logit_bias=tuple(bias), extra=extra)
        output.write_json(history, job.name, HISTORY)
        save_bundle(output, job.name, specialist, model.state_dict())  # its model.json marks it finished
        last = history[-1] if history else {}
        return {"name": job.name, "classes": len(job.classes), "resumed_from_epoch": start,
                "dustbin_bias": round(self.dustbin_bias, 4),
                **{k: round(last[k], 4) for k in ("loss", "train_error", "val_error") if k in last}}


# ------------------------------------------------------------------------------------ many at once
def specialist_jobs(config: Config, subsets: list[list[int]], class_rows: list[int], class_index: str,
                    generalist: ModelRef, dataset: str, output: Storage, work: Storage) -> list[SpecialistJob]:
    spec = config.specialists
    return [SpecialistJob(specialist_name(i), i, tuple(int(c) for c in classes), tuple(int(n) for n in class_rows),
                          class_index, generalist, dataset, spec.train, spec.subset_fraction,
                          spec.soft_target_weight, spec.temperature, output.location, work.location)
            for i, classes in enumerate(subsets)]


def finished(job: SpecialistJob) -> bool:
    return Storage(job.output).exists(job.name, "model.json")


def concurrent_specialists(resources: ResourcesConfig, gpus_per_specialist: float, limit: int | None) -> int:
    """How many specialist actors to run at once: `limit`, else what the cluster's CPUs (less a
    reserve for their Ray Data reads) and GPUs hold."""
    if limit is not None:
        return limit
    return runs_that_fit(resources.specialist_cpus, gpus_per_specialist)


def train_specialists(jobs: list[SpecialistJob], resources: ResourcesConfig, max_concurrent: int | None = None,
                      progress: bool = False) -> dict[str, dict]:
    """Train every job without a finished bundle, one actor each, as many at once as fit; returns
    name -> summary ({"reused": True} for those already finished). Re-raises a specialist's own
    exception; an actor that died more than MAX_RESTARTS times raises RuntimeError naming it."""
    import ray
    from tqdm.auto import tqdm

    from kdray.runtime.train import use_gpu

    results = {job.name: {"name": job.name, "reused": True} for job in jobs if finished(job)}
    todo = [job for job in jobs if job.name not in results]
    gpus = resources.specialist_gpus if use_gpu(resources) else 0
    actor_class = ray.remote(num_cpus=resources.specialist_cpus, num_gpus=gpus, max_restarts=MAX_RESTARTS,
                             max_task_retries=MAX_RESTARTS, runtime_env=forwarded_env())(SpecialistTrainer)
    width = concurrent_specialists(resources, gpus, max_concurrent)
    pending: dict = {}
    with tqdm(total=len(jobs), initial=len(results), desc="specialists", unit="specialist", disable=not progress) as bar:
        try:
            while todo or pending:
                while todo and len(pending) < width:
                    job = todo.pop(0)
                    actor = actor_class.remote(job)
                    pending[actor.train.remote()] = (job, actor)
                (done,), _ = ray.wait(list(pending), num_returns=1)
                job, actor = pending.pop(done)
                try:
                    results[job.name] = ray.get(done)
                except ray.exceptions.RayTaskError as error:
                    raise unwrap_remote_error(error) from None
                except ray.exceptions.RayActorError as error:
                    raise RuntimeError(f"specialist {job.name} (classes {list(job.classes)}) died more than "
                                       f"{MAX_RESTARTS} times; see its actor's log: {error}") from None
                finally:
                    ray.kill(actor)  # finished or failed: free its resources for the next one
                bar.set_postfix({k: v for k, v in results[job.name].items() if k in ("name", "val_error", "loss")})
                bar.update(1)
        finally:
            for _, actor in pending.values():
                ray.kill(actor)
    return results
