"""Epoch progress of a stage's Ray Train runs, drawn on the driver while it waits for them.

Ray Train calls a `UserCallback` in each run's controller actor after every `ray.train.report`,
not in the driver, and the runs of a stage train inside Ray tasks. So the callback forwards rank
0's metrics to a small board actor; the driver reads the board between waits and draws one bar:
epochs reported out of epochs planned over all the stage's runs (or, when the runs' epochs differ
in length, the rows those epochs hold), with the latest epoch's validation error. A run resumed
from a checkpoint starts at its checkpoint's epoch.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache, partial
from typing import Any

SHOWN = {"val_error": "val", "train_error": "train"}  # metric -> postfix label, shown as a percentage


class _Board:
    """Latest reported metrics per training run (a Ray actor holding no CPU)."""

    def __init__(self) -> None:
        self.latest: dict[str, dict[str, Any]] = {}
        self.last: str | None = None

    def post(self, run: str, metrics: dict[str, Any]) -> None:
        self.latest[run], self.last = metrics, run

    def read(self) -> tuple[dict[str, dict[str, Any]], str | None]:
        """(latest metrics per run, the run that reported last)."""
        return self.latest, self.last


@cache  # one class, so that ray.train is imported only once a bar is drawn
def _report_callback_class():
    from ray.train import UserCallback

    class ReportEpochs(UserCallback):
        """Forwards each report of a run (rank 0's metrics) to the board, named by the run."""

        def __init__(self, board) -> None:
            self.board = board

        def after_report(self, run_context, metrics, checkpoint) -> None:
            import ray

            if not metrics:
                return
            try:  # waited for: a controller exiting right after its last report would drop it
                ray.get(self.board.post.remote(run_context.run_config.name, metrics[0]))
            except ray.exceptions.RayActorError:
                pass  # the driver stopped drawing (it gave up on the stage); training goes on

    return ReportEpochs


def postfix(run: str, metrics: dict[str, Any], epochs: int) -> str:
    """'member-00 3/15 val 9.81%': the run, its epoch and its shown metrics."""
    shown = [f"{label} {100 * float(metrics[key]):.2f}%" for key, label in SHOWN.items() if key in metrics]
    return " ".join([run, f"{int(metrics.get('epoch', 0))}/{epochs}", *shown])


class EpochProgress:
    """A bar of epochs trained by the runs named in `epochs` (run name -> planned epochs).

    With `rows` (run name -> rows per epoch) the bar counts rows instead: when one run's epochs
    are longer than another's (a student on 4 jittered copies of each row beside its baseline on
    the plain rows), counting epochs would make the ETA far too short once the short run is done.
    Pass `callbacks()` to each run's `fit` and call `refresh()` while waiting (run_bounded's
    `on_wait`). Disabled, it starts no actor and draws nothing."""

    def __init__(self, desc: str, epochs: dict[str, int], enabled: bool = True, rows: dict[str, int] | None = None):
        from tqdm.auto import tqdm

        self.epochs = dict(epochs)
        self.weights = {run: 1 for run in self.epochs} if rows is None else {run: rows[run] for run in self.epochs}
        self.board = None
        if enabled and self.epochs:
            import ray

            self.board = ray.remote(num_cpus=0)(_Board).remote()
        self.bar = tqdm(total=sum(self.epochs[run] * self.weights[run] for run in self.epochs), desc=desc,
                        unit="epoch" if rows is None else "row", unit_scale=rows is not None,
                        disable=self.board is None)

    def callbacks(self) -> list:
        return [] if self.board is None else [_report_callback_class()(self.board)]

    def refresh(self) -> None:
        if self.board is None:
            return
        import ray

        latest, last = ray.get(self.board.read.remote())
        done = sum(int(metrics.get("epoch", 0)) * self.weights[run] for run, metrics in latest.items()
                   if run in self.epochs)
        if last in self.epochs:
            self.bar.set_postfix_str(postfix(last, latest[last], self.epochs[last]), refresh=False)
        self.bar.n = done
        self.bar.refresh()

    def close(self) -> None:
        if self.board is not None:
            import ray

            self.refresh()
            ray.kill(self.board)
            self.board = None
        self.bar.close()

    def __enter__(self) -> EpochProgress:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def train_in_tasks(train: Callable[..., Any], arguments: dict[str, tuple], max_in_flight: int,
                   bar: EpochProgress) -> list[Any]:
    """`train(*arguments[run], callbacks)` for each run as a Ray task, at most `max_in_flight` at
    once, drawn on `bar`: `train` calls `fit` with run name `run` and `callbacks`. Results come back
    in the order of `arguments` (see kdray.runtime.session.run_bounded)."""
    import ray

    from kdray.runtime.faults import forwarded_env
    from kdray.runtime.session import run_bounded

    # A launching task only waits on its trainer: it holds no CPU the workers need.
    launch = ray.remote(num_cpus=0, runtime_env=forwarded_env())(train).remote
    callbacks = bar.callbacks()
    return run_bounded([partial(launch, *args, callbacks) for args in arguments.values()], max_in_flight,
                       on_wait=bar.refresh)
