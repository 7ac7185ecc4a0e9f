"""What kdray changes in Ray Data's streaming executor, for every Dataset it reads.

Ray Data 2.60 derives an execution's resource limits from the answer of its autoscaling
coordinator actor, which a new execution's client asks for asynchronously: the first refresh of
the limits sees no answer yet and sets them to zero, and the next refresh comes only
`ResourceManager.GLOBAL_LIMITS_UPDATE_INTERVAL_S` (1 s) later. Every pass over a Dataset, so every
training epoch, is a new execution: for its first second each operator's output budget is zero,
blocks are let through one at a time by the executor's stall guard, and its scheduling loop spins,
taking CPU from the training loop (measured in benchmarks/performance.md). Refreshing every 50 ms lets the limits arrive with the coordinator's first answer; a
refresh only reads the cached answer and sends one asynchronous request.

Ray has no setting for the interval. `prompt_resource_limits` registers an execution callback in
a Dataset's own DataContext, which travels with the Dataset to wherever it executes (the driver,
or the split coordinator actor behind Ray Train's `get_dataset_shard`), and the callback sets the
interval on each new execution's resource manager. On a Ray whose executor lacks it, nothing changes.
"""

from __future__ import annotations

from ray.data._internal.execution.execution_callback import ExecutionCallback

LIMITS_REFRESH_SECONDS = 0.05


class PromptResourceLimits(ExecutionCallback):
    """Before an execution starts, make its resource manager refresh the limits every
    LIMITS_REFRESH_SECONDS (the module docstring says why)."""

    def before_execution_starts(self, executor) -> None:
        manager = getattr(executor, "_resource_manager", None)
        interval = getattr(manager, "GLOBAL_LIMITS_UPDATE_INTERVAL_S", None)
        if isinstance(interval, (int, float)) and interval > LIMITS_REFRESH_SECONDS:
            manager.GLOBAL_LIMITS_UPDATE_INTERVAL_S = LIMITS_REFRESH_SECONDS


def prompt_resource_limits(dataset):
    """`dataset` (and what derives from it), its executions refreshing their limits promptly."""
    callbacks = dataset.context.custom_execution_callback_classes
    if PromptResourceLimits not in callbacks:
        callbacks.append(PromptResourceLimits)
    return dataset
