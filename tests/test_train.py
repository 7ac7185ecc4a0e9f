"""The shared training loop under a real Ray Train TorchTrainer: DDP, checkpoints, worker faults."""

import json
import os

import pytest
import torch
from fault_harness import failing_at_epoch, read_events, train_event_recorder
from tiny_data import write_blobs

from kdray.config import ResourcesConfig, TrainConfig
from kdray.data.shards import read_split
from kdray.runtime.artifacts import ModelSpec
from kdray.runtime.storage import Storage
from kdray.runtime.train import (
    BATCH_LOSSES,
    SHUFFLE_WINDOW_BATCHES,
    SHUFFLE_WINDOW_BYTES,
    TRAIN_POLL_ENV,
    TRAIN_POLL_S,
    EpochCache,
    FitSpec,
    LossSpec,
    batch_loss,
    fit,
    poll_workers_often,
    row_bytes,
    shuffle_window,
    window_rows,
)

SPEC = FitSpec(ModelSpec("mlp", {"hidden": [16], "dropout": 0.2}, (6,), 4),
               TrainConfig(epochs=3, batch_size=64, lr=0.01), LossSpec("hard"))


@pytest.fixture(scope="module")
def blobs(tmp_path_factory):
    location = str(tmp_path_factory.mktemp("blobs"))
    write_blobs(location)
    return Storage(location)


def _fit(blobs, spec, workers, storage, name, callbacks=None):
    datasets = {"train": read_split(blobs, "train"), "validation": read_split(blobs, "validation")}
    return fit(spec, datasets, ResourcesConfig(num_workers=workers, cpus_per_worker=0.5), storage, name,
               callbacks=callbacks)


def test_ddp_two_workers_survive_a_killed_worker(ray_local, blobs, tmp_path):
    events = str(tmp_path / "events.jsonl")
    with failing_at_epoch(1):  # rank 0 dies in the middle of epoch 2
        result = _fit(blobs, SPEC, 2, str(tmp_path), "ddp", callbacks=[train_event_recorder(events)])
    failures = [event["ranks"] for event in read_events(events) if event["event"] == "failure"]
    assert len(failures) == 1 and 0 in failures[0]  # one failure: rank 0 died (rank 1 lost its peer)
    assert [h["epoch"] for h in result.history] == [1, 2, 3]  # epoch 2 re-ran after the kill, once
    assert result.history[-1]["val_error"] < 0.25  # 4 separable blobs: far below chance (0.75)
    assert result.history[-1]["rows"] == 400  # each of 2 DDP workers sees half of the 800 rows
    checkpoints = [p for p in (tmp_path / "ddp").iterdir() if p.is_dir() and p.name.startswith("checkpoint_")]
    assert 1 <= len(checkpoints) <= 2  # CheckpointConfig(num_to_keep=2)


def _controller_poll_recorder(path: str):
    """A Ray Train callback that writes, from the run's controller actor, the poll interval that
    process sees (what Ray Train's controller reads when the run starts)."""
    from ray.train import UserCallback

    class RecordPoll(UserCallback):
        def after_report(self, run_context, metrics, checkpoint) -> None:
            with open(path, "w") as out:
                json.dump(os.environ.get(TRAIN_POLL_ENV), out)

    return RecordPoll()


@pytest.fixture(scope="module")
def clean(ray_local, blobs, tmp_path_factory):
    """One uninterrupted single-worker run, started with the poll variable unset (the session's Ray
    was started without it, so only kdray can set it); its controller records the poll it saw."""
    storage = tmp_path_factory.mktemp("clean")
    seen = storage / "poll.json"
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv(TRAIN_POLL_ENV, raising=False)
        result = _fit(blobs, SPEC, 1, str(storage), "clean", callbacks=[_controller_poll_recorder(str(seen))])
    return result, storage, seen


def test_resumed_run_equals_uninterrupted_run(clean, blobs, tmp_path):
    # One worker: Ray Data's streaming split hands blocks to DDP workers as they ask, so only a
    # single worker's batch order (preserve_order + seeded local shuffle) is exactly repeatable.
    clean, storage, _ = clean
    events = str(tmp_path / "events.jsonl")
    with failing_at_epoch(1):
        faulty = _fit(blobs, SPEC, 1, str(tmp_path), "faulty", callbacks=[train_event_recorder(events)])
    assert [event["event"] for event in read_events(events)] == ["report", "failure", "report", "report"]
    assert [h["val_error"] for h in faulty.history] == [h["val_error"] for h in clean.history]
    for name, tensor in clean.state_dict.items():
        assert torch.equal(tensor, faulty.state_dict[name]), name
    # Re-running a finished run (the driver died after training, say) restores, not retrains.
    again = _fit(blobs, SPEC, 1, str(storage), "clean")
    assert again.history == clean.history
    for name, tensor in clean.state_dict.items():
        assert torch.equal(tensor, again.state_dict[name]), name


def test_runs_poll_their_workers_every_train_poll_s_unless_the_environment_says(clean, monkeypatch):
    _, _, seen = clean
    with open(seen) as recorded:
        assert json.load(recorded) == str(TRAIN_POLL_S)
    monkeypatch.setenv(TRAIN_POLL_ENV, "1.5")  # a user's own setting wins
    poll_workers_often()
    assert os.environ[TRAIN_POLL_ENV] == "1.5"


def test_shuffle_window_permutes_within_windows_reproducibly():
    windows = [{"x": torch.arange(0, 8), "y": torch.arange(0, 8) * 10},
               {"x": torch.arange(8, 16), "y": torch.arange(8, 16) * 10},
               {"x": torch.arange(16, 20), "y": torch.arange(16, 20) * 10}]  # the stream's short tail
    first = list(shuffle_window(iter(windows), 4, torch.Generator().manual_seed(3)))
    again = list(shuffle_window(iter(windows), 4, torch.Generator().manual_seed(3)))
    assert [len(b["x"]) for b in first] == [4, 4, 4, 4, 4]
    assert all(torch.equal(a["x"], b["x"]) for a, b in zip(first, again))
    assert sorted(torch.cat([b["x"] for b in first[:2]]).tolist()) == list(range(8))  # window 1: rows 0-7
    assert sorted(first[4]["x"].tolist()) == [16, 17, 18, 19]
    assert all(torch.equal(b["y"], b["x"] * 10) for b in first)  # columns stay aligned
    assert torch.cat([b["x"] for b in first]).tolist() != list(range(20))


def _counted_stream(calls: list[int], rows: int = 4):
    def stream():
        calls.append(1)
        return iter([{"x": torch.arange(i * rows, i * rows + rows, dtype=torch.float32)} for i in range(3)])
    return stream


def test_epoch_cache_replays_a_whole_pass_that_fits_and_streams_otherwise():
    calls: list[int] = []
    cache = EpochCache(budget=3 * 4 * 4)  # exactly three batches of four float32
    first = [b["x"].tolist() for b in cache.epoch(_counted_stream(calls))]
    second = [b["x"].tolist() for b in cache.epoch(_counted_stream(calls))]
    assert first == second and len(calls) == 1  # replayed, not streamed again

    calls.clear()
    too_small = EpochCache(budget=3 * 4 * 4 - 1)
    for _ in range(2):
        assert len(list(too_small.epoch(_counted_stream(calls)))) == 3
    assert len(calls) == 2 and too_small.batches is None

    calls.clear()
    interrupted = EpochCache(budget=10**6)
    next(iter(interrupted.epoch(_counted_stream(calls))))  # a pass that stops early keeps nothing
    assert interrupted.batches is None
    assert len(list(interrupted.epoch(_counted_stream(calls)))) == 3 and interrupted.batches is not None
    assert len(list(EpochCache(budget=0).epoch(_counted_stream(calls)))) == 3  # 0: always stream


def test_shuffle_windows_hold_32_batches_up_to_their_byte_budget_and_never_less_than_one():
    assert window_rows(256, 260) == 256 * SHUFFLE_WINDOW_BATCHES  # small rows: the batch count binds
    big_row = 3 * 224 * 224 * 4  # an ImageNet-sized float image: 64 MiB holds 111 of them
    assert window_rows(8, big_row) == 8 * (SHUFFLE_WINDOW_BYTES // (8 * big_row))
    assert window_rows(256, big_row) == 256  # a batch over budget is still one batch
    assert row_bytes(ModelSpec("mlp", {}, (1, 28, 28), 10)) == 4 * (784 + 10) + 8


def test_an_unknown_loss_kind_is_refused_listing_the_registered_ones():
    with pytest.raises(ValueError, match=r"unknown loss kind 'soft'; registered: \['distill', 'hard'\]"):
        LossSpec("soft")


@pytest.mark.parametrize("kind", sorted(BATCH_LOSSES))
def test_every_registered_loss_trains_through_the_batch_loop(kind):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    batch = {"x": torch.randn(8, 4), "y": torch.randint(0, 3, (8,)), "t": torch.randn(8, 3)}
    spec = LossSpec(kind, temperature=2.0, hard_weight=0.5)
    total, logits, terms = batch_loss(model, batch, spec, 3)
    total.backward()
    assert logits.shape == (8, 3) and torch.isfinite(total) and model.weight.grad.abs().sum() > 0
    assert set(spec.columns()) == {"x", "y", *(["t"] if BATCH_LOSSES[kind].needs_teacher else [])}
    assert "hard" in terms and ("soft" in terms) == BATCH_LOSSES[kind].needs_teacher
