"""The one hook for injecting a failure, so recovery can be proven on a real cluster and in tests.

Set ``KDRAY_FAIL_AT_EPOCH=E`` (an integer, 1 or more) in the driver's environment, or in a submitted
job's ``runtime_env``. Then every training process that starts from scratch, Ray Train's rank 0 and
each specialist actor, exits abruptly (``os._exit``, as a preempted or OOM-killed process would) at
the second batch of its epoch E (counted from 0), after epoch E - 1 has been checkpointed. A process
that resumed from a checkpoint never fails again, so each run dies once and must recover.

The variable is read here only. The driver hands it to the workers and actors it starts through
their ``runtime_env`` (`forwarded_env`), because a Ray that is already running does not see the
driver's later environment.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

FAULT_ENV = "KDRAY_FAIL_AT_EPOCH"
EXIT_CODE = 17
Batch = TypeVar("Batch")


def fault_epoch() -> int | None:
    """The epoch in which first attempts die, or None when no failure is asked for."""
    value = os.environ.get(FAULT_ENV, "").strip()
    if not value:
        return None
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"{FAULT_ENV}={value!r}: expected an epoch number of 1 or more (epoch 0 has no "
                         "checkpoint to resume from)")
    return int(value)


def forwarded_env() -> dict[str, Any]:
    """runtime_env options that pass the driver's fault setting on to a worker or actor (empty when
    unset, so workers share Ray's default worker pool)."""
    epoch = fault_epoch()
    return {"env_vars": {FAULT_ENV: str(epoch)}} if epoch is not None else {}


def dying_at_fault(batches: Iterable[Batch], epoch: int, first_attempt: bool,
                   settle_s: float = 0.0) -> Iterator[Batch]:
    """`batches`, unless this is the fault epoch of a first attempt: then the process exits at the
    second batch, `settle_s` seconds after it is reached (time for the last checkpoint to be taken
    up by whoever commits it)."""
    die = first_attempt and fault_epoch() == epoch
    for index, batch in enumerate(batches):
        if die and index == 1:
            time.sleep(settle_s)
            os._exit(EXIT_CODE)
        yield batch
