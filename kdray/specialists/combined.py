"""A generalist and its specialists at inference (paper, section 5.3), as a Ray Data batch job.

`SpecialistCombiner` is the callable class an actor pool runs: it holds the generalist (one net or
an ensemble) and every specialist, and for each batch of rows

1. takes the generalist's distribution p_g [B, C] and its top-n classes (specialists.top_n);
2. finds the active specialists, those whose subset meets them (`kdray.specialists.combine.select_active_specialists`),
   and runs each specialist only on the rows where it is active;
3. packs the active specialists' outputs, each (row, specialist) pair's probabilities over its subset
   and its dustbin (`kdray.specialists.combine.pack_specialist_outputs`: memory proportional to the
   active subsets' sizes, never rows x specialists x classes), and solves for the q minimising
   KL(p_g || q) + sum_m KL(p_m || q) (`kdray.specialists.combine.combine_active`, in float64);
4. appends log q as the "logits" column (rows without an active specialist get log p_g exactly).

`combined_logits` is the specialists stage's entry in `kdray.evaluation.evaluate.COMBINERS`, so `kdray evaluate`
and `kdray predict` score and predict "generalist+specialists" through it. The same job writes the
stage's results tables (`write_tables`: the paper's Tables 3 and 4 analogs, on the test split) and
labels the training split for distilling the combination back into one net (`distill_back`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from kdray.data import read_split
from kdray.distill.losses import ensemble_logits
from kdray.evaluation.inference import LogitsPredictor, ModelRef, features, fixed_size_list, map_logits
from kdray.runtime.artifacts import ModelSpec, load_bundle, load_spec, save_bundle
from kdray.runtime.stage import StageContext
from kdray.runtime.storage import Storage
from kdray.specialists.combine import (
    combine_active,
    membership_matrix,
    pack_specialist_outputs,
    select_active_specialists,
)

COMBINED, DISTILLED = "generalist+specialists", "specialists-distilled"
TRANSFER_DIR, TRANSFER_DONE = "transfer", "transfer.json"
GENERALIST_COLUMN, ACTIVE_COLUMN, DISTILLED_COLUMN = "generalist_logits", "active_specialists", "distilled_logits"


@dataclass(frozen=True)
class CombinedModel:
    generalist: ModelRef
    specialists: ModelRef
    top_n: int

    @classmethod
    def from_entry(cls, entry: dict[str, Any], trusted: tuple[str, ...] = ()) -> CombinedModel:
        """From the specialists stage's outputs["models"]["generalist+specialists"] entry; its
        bundles may name the factories in `trusted`."""
        generalist = entry["generalist"]
        return cls(ModelRef(generalist["location"], tuple(generalist["bundles"]), trusted),
                   ModelRef(entry["location"], tuple(entry["bundles"]), trusted), int(entry["top_n"]))


class SpecialistCombiner:
    """Ray Data actor: appends `output_column` = log q [B, C] (and, with diagnostics, the
    generalist's log-probabilities and the number of active specialists per row; with `extra`,
    more models' logits: column -> ModelRef, so one actor pool serves them all and leaves the
    CPUs its reads need)."""

    def __init__(self, model: CombinedModel, output_column: str = "logits", diagnostics: bool = False,
                 extra: dict[str, ModelRef] | None = None):
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        generalist = Storage(model.generalist.location)
        trusted = model.generalist.trusted
        self.generalists = [load_bundle(generalist, b, self.device, trusted)[0] for b in model.generalist.bundles]
        storage = Storage(model.specialists.location)
        self.specialists, self.classes = [], []
        for bundle in model.specialists.bundles:
            net, spec = load_bundle(storage, bundle, self.device, model.specialists.trusted)
            self.specialists.append(net)
            self.classes.append(torch.tensor(spec.extra["classes"], dtype=torch.int64, device=self.device))
        num_classes = load_spec(generalist, model.generalist.bundles[0]).num_outputs
        self.membership = membership_matrix(self.classes, num_classes, self.device)
        self.top_n, self.output_column, self.diagnostics = model.top_n, output_column, diagnostics
        self.extra = {column: LogitsPredictor(ref, column) for column, ref in (extra or {}).items()}

    @torch.no_grad()
    def combined(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, D] -> (log q [B, C], log p_g [B, C], active specialists per row [B])."""
        outputs = torch.stack([net(x) for net in self.generalists]).float()
        log_generalist = torch.log_softmax(outputs[0], -1) if len(outputs) == 1 else ensemble_logits(outputs)
        p_g = log_generalist.double().exp()
        active = select_active_specialists(p_g, self.membership, self.top_n)
        used = active.any(0).nonzero().flatten()
        if used.numel() == 0:
            return log_generalist, log_generalist, active.sum(1)
        rows, classes, subset_probs, dustbins = [], [], [], []
        for m in used.tolist():
            rows.append(active[:, m].nonzero().flatten())
            probs = torch.softmax(self.specialists[m](x[rows[-1]]).double(), -1)
            classes.append(self.classes[m])
            subset_probs.append(probs[:, :-1])
            dustbins.append(probs[:, -1])
        q = combine_active(p_g, pack_specialist_outputs(rows, classes, subset_probs, dustbins))
        # q underflowing to 0 gets the log of the smallest normal float32: finite, and exp() gives 0 back.
        return q.clamp(min=np.finfo(np.float32).tiny).log().float(), log_generalist, active.sum(1)

    def __call__(self, batch: pa.Table) -> pa.Table:
        x = torch.from_numpy(features(batch)).to(self.device)
        log_q, log_generalist, active = self.combined(x)
        batch = batch.append_column(self.output_column, fixed_size_list(log_q.cpu().numpy()))
        if self.diagnostics:
            batch = batch.append_column(GENERALIST_COLUMN, fixed_size_list(log_generalist.float().cpu().numpy()))
            batch = batch.append_column(ACTIVE_COLUMN, pa.array(active.cpu().numpy().astype(np.int64)))
        for column, predictor in self.extra.items():
            batch = batch.append_column(column, fixed_size_list(predictor.logits(x.cpu().numpy())))
        return batch


def map_combined(dataset, model: CombinedModel, output_column: str = "logits", diagnostics: bool = False,
                 extra: dict[str, ModelRef] | None = None, batch_size: int = 2048, concurrency: int = 1,
                 num_gpus: float = 0):
    """`dataset` (with an "x" column) plus the combined log-probabilities, lazily, by an actor pool."""
    import ray.data

    return dataset.map_batches(
        SpecialistCombiner, fn_constructor_kwargs={"model": model, "output_column": output_column,
                                                   "diagnostics": diagnostics, "extra": extra},
        batch_size=batch_size, batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=concurrency),
        num_gpus=num_gpus)


def combined_logits(dataset, run: Storage, manifest: dict, model: str, batch_size: int = 2048,
                    trusted: tuple[str, ...] = ()):
    """kdray.evaluation.evaluate.COMBINERS["specialists"]: the lazy `dataset` plus "logits" for one of the
    specialists stage's models (the combination, or the plain distilled net)."""
    entry = manifest["outputs"]["models"][model]
    if "generalist" not in entry:
        return map_logits(dataset, ModelRef(entry["location"], tuple(entry["bundles"]), trusted), batch_size=batch_size)
    return map_combined(dataset, CombinedModel.from_entry(entry, trusted), batch_size=batch_size)


# ------------------------------------------------------------------------------------ distil back
def distill_back(context: StageContext, combined_entry: dict, dataset: str) -> dict:
    """Train one net of the generalist's architecture (from its weights) on the combination's
    distribution over the training split; returns its outputs["models"] entry."""
    from kdray.distill.transfer import read_transfer
    from kdray.runtime.train import FitSpec, LossSpec, fit

    config, output = context.config.specialists, context.output
    if not output.exists(DISTILLED, "model.json"):
        combined = CombinedModel.from_entry(combined_entry, context.config.model_factories())
        transfer = _combined_transfer(output, combined, dataset)
        generalist, spec = load_bundle(Storage(combined.generalist.location), combined.generalist.bundles[0],
                                       trusted=combined.generalist.trusted)
        model = ModelSpec(spec.name, spec.options, spec.input_shape, spec.num_outputs)
        fit_spec = FitSpec(model, config.distill_train, LossSpec("distill", config.temperature, config.distill_hard_weight),
                           init_weights=generalist.state_dict())
        validation = read_split(Storage(dataset), "validation")
        result = fit(fit_spec, {"train": read_transfer(transfer), "validation": validation}, context.config.resources,
                     context.work.uri(), DISTILLED)
        output.write_json(result.history, DISTILLED, "history.json")
        save_bundle(output, DISTILLED, model, result.state_dict)
    return {"location": output.location, "bundles": [DISTILLED]}


def _combined_transfer(output: Storage, combined: CombinedModel, dataset: str) -> str:
    """The training split with column "t" = log q, cached under output/transfer (reused on resume)."""
    from kdray.distill.transfer import count_rows
    from kdray.runtime.train import TEACHER_LOGITS

    if not output.exists(TRANSFER_DONE):
        output.delete(TRANSFER_DIR)  # a partial write would otherwise add duplicate rows
        rows = read_split(Storage(dataset), "train").select_columns(["id", "x", "y"])
        map_combined(rows, combined, output_column=TEACHER_LOGITS).write_parquet(
            output.path(TRANSFER_DIR), filesystem=output.filesystem)
        output.write_json({"rows": count_rows(output, TRANSFER_DIR)}, TRANSFER_DONE)
    return output.uri(TRANSFER_DIR)
