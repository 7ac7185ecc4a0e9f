"""Specialists: data -> teacher (the generalist) -> clustering -> specialists through the real runner
on tiny grouped data (the teacher trained in-process, see `_quick_teacher`), the combiner as a Ray Data batch job, the dustbin correction, a specialist
actor killed mid-training, and a re-run that trains only the unfinished specialists."""

import dataclasses
import io
import math

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pytest
import torch
from fault_harness import failing_at_epoch

from kdray.config import TrainConfig, config_from_dict
from kdray.data.shards import DatasetManifest, shard_name, shard_table, write_manifest, write_shard
from kdray.evaluation.evaluate import combiner, evaluate_manifests
from kdray.evaluation.inference import ModelRef, features
from kdray.models import create_model
from kdray.pipeline import Stage, pipeline_stages, run_pipeline
from kdray.runtime.artifacts import ModelSpec, load_bundle, save_bundle
from kdray.runtime.stage import StageResult
from kdray.runtime.storage import Storage
from kdray.runtime.train import LossSpec, make_optimizer, train_epoch
from kdray.specialists.actors import (
    CHECKPOINT,
    SHUFFLE_BYTES,
    SpecialistJob,
    coarsen_log_probs,
    dustbin_log_factor,
    epoch_rows,
    init_specialist,
    local_labels,
    rest_sample_fraction,
    shuffle_buffer_rows,
    specialist_jobs,
    train_specialists,
)
from kdray.specialists.clustering import COVARIANCE, INDEX_MANIFEST, SUBSETS
from kdray.specialists.combine import combine, select_active_specialists
from kdray.specialists.combined import COMBINED, CombinedModel, SpecialistCombiner
from kdray.specialists.tables import TABLES

CLASSES, GROUPS, DIM = 8, 4, 6
STAGES = ("data", "teacher", "clustering", "specialists")


def write_grouped_blobs(location, rows=(1600, 400, 400), seed=0):
    """Blobs whose class means cluster in GROUPS well-separated groups (class c in group c % GROUPS):
    classes of a group are confused with each other, hardly ever with the others."""
    rng = np.random.default_rng(seed)
    groups = np.arange(CLASSES) % GROUPS
    means = rng.normal(scale=4.0, size=(GROUPS, DIM))[groups] + rng.normal(scale=0.8, size=(CLASSES, DIM))
    storage, infos, next_id = Storage(location), [], 0
    for split, count in zip(("train", "validation", "test"), rows):
        for index, part in enumerate(np.array_split(np.arange(count), 2)):
            labels = rng.integers(0, CLASSES, size=len(part))
            x = (means[labels] + rng.normal(size=(len(part), DIM))).astype(np.float32)
            table = shard_table(np.arange(next_id, next_id + len(part)), x, labels)
            infos.append(write_shard(storage, shard_name(split, index), split, table))
            next_id += len(part)
    write_manifest(storage, DatasetManifest(CLASSES, (DIM,), tuple(infos), class_groups=tuple(int(g) for g in groups)))


def _config(data, storage):
    return config_from_dict({
        "data": {"source": "parquet", "path": data},
        "teacher": {"model": {"name": "mlp", "hidden": [32]}, "train": {"epochs": 3, "batch_size": 64, "lr": 0.01}},
        "clustering": {"enabled": True, "num_specialists": 4, "min_size": 2, "max_size": 2},
        # distill_back is left out: its TorchTrainer run would double this module's time (the
        # benchmark's smoke run exercises it).
        "specialists": {"train": {"epochs": 1, "batch_size": 64, "lr": 0.003}, "soft_target_weight": 0.3},
        "resources": {"cpus_per_worker": 0.5},
        "storage": {"storage_path": storage, "run_name": "tiny"},
    })


def _quick_teacher(context):
    """The teacher stage's contract (a bundle published as outputs["teacher"]) with the generalist
    trained in-process by the shared `train_epoch` rather than a TorchTrainer run, which would
    cost this module most of its time budget; the real teacher stage is tested in test_distill_pipeline."""
    dataset = Storage(context.input_output("data", "dataset"))
    table = pads.dataset([dataset.path(shard_name("train", i)) for i in range(2)], format="parquet").to_table()
    x, y = torch.from_numpy(features(table).copy()), torch.from_numpy(table.column("y").to_numpy().copy())
    train = context.config.teacher.train
    torch.manual_seed(train.seed)
    spec = ModelSpec("mlp", {"hidden": [32]}, (DIM,), CLASSES)
    model = spec.build()
    optimizer = make_optimizer(model.parameters(), train)
    for epoch in range(train.epochs):
        order = torch.randperm(len(y))
        batches = ({"x": x[i], "y": y[i]} for i in order.split(train.batch_size))
        train_epoch(model, optimizer, batches, LossSpec("hard"), train, CLASSES)
    save_bundle(context.output, "member-00", spec, model.state_dict())
    teacher = {"location": context.output.location, "bundles": ["member-00"]}
    return StageResult(outputs={"models": {"teacher": teacher}, "teacher": teacher})


def _stages():
    stages = [stage for stage in pipeline_stages() if stage.name in STAGES]
    return [dataclasses.replace(stage, run=_quick_teacher) if stage.name == "teacher" else stage for stage in stages]


@pytest.fixture(scope="module")
def tiny_run(ray_local, tmp_path_factory):
    data = str(tmp_path_factory.mktemp("data"))
    write_grouped_blobs(data)
    config = _config(data, str(tmp_path_factory.mktemp("runs")))
    run = Storage(config.storage.storage_path).child("tiny")
    outcomes = run_pipeline(_stages(), config, run, progress=False, log=lambda _: None)
    return config, run, {o.name: o.manifest for o in outcomes}


# ------------------------------------------------------------------------------------ pure pieces
def test_dustbin_correction_is_the_log_of_the_oversampling_factor():
    # 100 rows of the subset, 900 of the rest, half-and-half stream: 100 of the 900 are sampled.
    r = rest_sample_fraction(100, 900, 0.5)
    assert r == pytest.approx(1 / 9)
    assert dustbin_log_factor(r) == pytest.approx(math.log(9))
    assert rest_sample_fraction(100, 900, 0.25) == pytest.approx(1 / 3)  # 300 rest rows per 100 own
    assert rest_sample_fraction(500, 100, 0.5) == 1.0  # the rest is small: all of it, no correction
    # The correction maps the stream's class prior back to the natural one (Bayes): a specialist
    # whose logits are the log stream prior, plus the bias, gives the natural prior.
    own, rest = np.array([60.0, 40.0]), 900.0
    stream = np.append(own, r * rest) / (own.sum() + r * rest)
    corrected = np.log(stream) + np.array([0.0, 0.0, dustbin_log_factor(r)])
    natural = np.exp(corrected) / np.exp(corrected).sum()
    np.testing.assert_allclose(natural, np.append(own, rest) / (own.sum() + rest), rtol=1e-12)


def test_the_shuffle_buffer_holds_the_whole_epoch_when_it_fits():
    # jobs/specialists.yaml: 10 classes of 3000 rows among 200, half the stream from the subset.
    job = SpecialistJob(name="s", seed_index=0, classes=tuple(range(10)), class_rows=(3000,) * 200,
                        class_index="", generalist=ModelRef("", ("g",)), dataset="", train=TrainConfig(),
                        subset_fraction=0.5, soft_target_weight=0.0, temperature=1.0, output="", work="")
    assert job.epoch_rows == 60_000  # 30,000 own rows and as many of the other 570,000
    # 32 float32 features + an int64 label: the whole epoch (8 MB) fits, every batch mixes all classes.
    assert shuffle_buffer_rows(job.epoch_rows, 4 * 32 + 8, 64) == 60_000
    # 28 x 28 images: as many rows as fit in SHUFFLE_BYTES; never fewer than 4 batches.
    assert shuffle_buffer_rows(job.epoch_rows, 4 * 784 + 8, 64) == SHUFFLE_BYTES // (4 * 784 + 8)
    assert shuffle_buffer_rows(100, 136, 64) == 256


def test_labels_and_soft_targets_map_to_the_specialists_classes():
    assert local_labels((4, 1), 6).tolist() == [2, 1, 2, 2, 0, 2]
    log_p = torch.log_softmax(torch.randn(3, 6, dtype=torch.float64), -1)
    coarse = coarsen_log_probs(log_p, (4, 1))
    p = log_p.exp()
    torch.testing.assert_close(coarse.exp(), torch.stack([p[:, 4], p[:, 1], p[:, [0, 2, 3, 5]].sum(1)], 1))


def test_a_specialist_starts_as_the_generalist_coarsened_to_its_classes():
    torch.manual_seed(0)
    generalist = create_model("mlp", (DIM,), 5, hidden=[8])
    with torch.no_grad():  # equal logits for the rest, so the dustbin's start is exact
        generalist.head.weight[[0, 2, 4]] = generalist.head.weight[0].clone()
        generalist.head.bias[[0, 2, 4]] = generalist.head.bias[0].clone()
    specialist = init_specialist(generalist, (3, 1), rest_fraction=0.25)
    x = torch.randn(4, DIM)
    with torch.no_grad():
        full, own = generalist(x), specialist(x)
    torch.testing.assert_close(own[:, :2], full[:, [3, 1]])
    torch.testing.assert_close(own[:, 2], torch.logsumexp(full[:, [0, 2, 4]], 1) + math.log(0.25))


# ------------------------------------------------------------------------------------ the stages
def test_clustering_finds_the_planted_groups_and_streams_the_covariance(tiny_run):
    _, run, manifests = tiny_run
    assert manifests["clustering"]["summary"]["ari"] == 1.0
    subsets = run.read_json("clustering", SUBSETS)
    assert sorted(map(sorted, subsets["subsets"])) == [[c, c + GROUPS] for c in range(GROUPS)]
    # The streamed covariance is that of the generalist's probabilities on all validation rows at once.
    teacher, _ = load_bundle(run.child("teacher"), "member-00")
    dataset = Storage(manifests["data"]["outputs"]["dataset"])
    validation = pads.dataset([dataset.path(shard_name("validation", i)) for i in range(2)], format="parquet").to_table()
    with torch.no_grad():
        p = torch.softmax(teacher(torch.from_numpy(features(validation))), -1).double().numpy()
    saved = np.load(io.BytesIO(run.read_bytes("clustering", COVARIANCE)))
    np.testing.assert_allclose(saved, np.cov(p, rowvar=False), rtol=1e-4, atol=1e-7)
    assert run.read_bytes("clustering", "covariance.png").startswith(b"\x89PNG")


def test_a_specialist_reads_its_classes_and_a_window_of_the_rest(tiny_run):
    config, run, _ = tiny_run
    index = run.child("clustering", "class_index")
    counts = index.read_json(INDEX_MANIFEST)["rows"]
    job = specialist_jobs(config, [[0, 4]], counts, index.location, None, None, run, run)[0]
    r = job.rest_fraction
    assert r == pytest.approx(job.subset_rows / (sum(counts) - job.subset_rows))
    table = pa.concat_tables(epoch_rows(job, epoch=1).iter_batches(batch_format="pyarrow"))
    labels = table.column("y").to_numpy()
    assert np.isin(labels, [0, 4]).sum() == job.subset_rows  # every row of its own classes
    files = pads.dataset([index.path(f"class-{c:05d}.parquet") for c in (1, 2, 3, 5, 6, 7)], format="parquet")
    u = files.to_table(columns=["u"]).column("u").to_numpy()
    assert (~np.isin(labels, [0, 4])).sum() == ((u >= r) & (u < 2 * r)).sum() > 0  # epoch 1's window of the rest


def test_specialist_bundles_carry_their_classes_and_dustbin_correction(tiny_run):
    _, run, manifests = tiny_run
    subsets = run.read_json("clustering", SUBSETS)["subsets"]
    counts = np.array(run.read_json("clustering", "class_index", INDEX_MANIFEST)["rows"])
    entry = manifests["specialists"]["outputs"]["models"][COMBINED]
    for name, classes in zip(entry["bundles"], subsets):
        _, spec = load_bundle(run.child("specialists"), name)
        own = counts[classes].sum()
        assert spec.extra["classes"] == classes and spec.num_outputs == len(classes) + 1
        assert spec.logit_bias[:-1] == (0.0,) * len(classes)
        assert spec.logit_bias[-1] == pytest.approx(math.log((counts.sum() - own) / own))  # log(1 / r), f = 1/2


def test_evaluate_scores_the_combination_through_its_batch_job(tiny_run):
    _, run, manifests = tiny_run
    results = evaluate_manifests(run, {name: manifests[name] for name in ("data", "teacher", "specialists")})
    models = results["models"]
    assert {"teacher", COMBINED} <= set(models)
    tables = run.read_json("specialists", TABLES)
    assert models[COMBINED]["test"]["rows"] == tables["overall"]["rows"] == 400
    assert models[COMBINED]["test"]["accuracy"] == pytest.approx(tables["overall"]["combined_accuracy"])
    assert models["teacher"]["test"]["accuracy"] == pytest.approx(tables["overall"]["generalist_accuracy"])
    assert sum(row["rows"] for row in tables["by_covering"]) == 400
    assert sum(row["rows"] for row in tables["by_subset"]) == 400  # a partition: each class in one subset
    assert run.exists("specialists", "specialists.md") and run.exists("specialists", "specialists.csv")


def _bundle(storage, name, outputs, bias=None, classes=None):
    torch.manual_seed(len(name) + outputs)
    model = create_model("mlp", (DIM,), outputs, hidden=[8])
    spec = ModelSpec("mlp", {"hidden": [8]}, (DIM,), outputs, logit_bias=bias,
                     extra={} if classes is None else {"classes": classes})
    save_bundle(storage, name, spec, model.state_dict())
    return load_bundle(storage, name)[0]


def _entry(storage, bundles):
    return {"location": storage.location, "bundles": bundles, "top_n": 1,
            "generalist": {"location": storage.location, "bundles": ["generalist"]}}


def test_combiner_limits_through_the_batch_job(ray_local, tmp_path):
    import ray.data

    storage = Storage(str(tmp_path))
    generalist = _bundle(storage, "generalist", 5)
    # Covers every class, and its dustbin logit is pushed to -1e4: probability exactly 0.
    everything = _bundle(storage, "everything", 6, bias=(0.0,) * 5 + (-1e4,), classes=[0, 1, 2, 3, 4])
    _bundle(storage, "only-0", 2, classes=[0])
    x = torch.randn(64, DIM) * 3
    rows = ray.data.from_arrow(pa.table({"id": np.arange(64), "x": pa.FixedSizeListArray.from_arrays(
        pa.array(x.numpy().reshape(-1)), DIM)}))
    manifest = {"outputs": {"models": {COMBINED: _entry(storage, ["everything"])}}}
    out = pa.concat_tables(combiner("specialists")(rows, storage, manifest, COMBINED, 16).iter_batches(batch_format="pyarrow"))
    order = np.argsort(out.column("id").to_numpy())
    with torch.no_grad():
        p_g, p_m = torch.softmax(generalist(x), -1), torch.softmax(everything(x), -1)[:, :5]
    np.testing.assert_allclose(np.exp(features(out, "logits")[order]), ((p_g + p_m) / 2).numpy(), atol=1e-5)
    # A specialist of class 0 alone: rows whose generalist top class is not 0 keep p_g exactly.
    log_q, log_g, active = SpecialistCombiner(CombinedModel.from_entry(_entry(storage, ["only-0"]))).combined(x)
    inactive = p_g.argmax(1) != 0
    assert inactive.any() and (~inactive).any()
    assert torch.equal(active, (~inactive).long())
    torch.testing.assert_close(log_q[inactive].exp(), p_g[inactive], atol=1e-6, rtol=1e-5)
    assert not torch.allclose(log_q[~inactive].exp(), p_g[~inactive], atol=1e-4)


def test_combiner_gives_the_dense_combination_with_overlapping_specialists(tmp_path):
    """top_n = 2 over overlapping subsets: rows with two and three active specialists, each run on
    its active rows alone and packed, give the q of the dense [B, M, C] inputs."""
    storage = Storage(str(tmp_path))
    _bundle(storage, "generalist", 6)
    subsets = {"low": [0, 1, 2, 3], "high": [3, 4, 5], "ends": [5, 0]}
    for name, classes in subsets.items():
        _bundle(storage, name, len(classes) + 1, classes=classes)
    combiner = SpecialistCombiner(CombinedModel.from_entry({**_entry(storage, list(subsets)), "top_n": 2}))
    x = torch.randn(256, DIM) * 3
    log_q, log_g, active = combiner.combined(x)
    p_g = log_g.double().exp()
    dense_active = select_active_specialists(p_g, combiner.membership, 2)
    with torch.no_grad():
        probs = [torch.softmax(net(x).double(), -1) for net in combiner.specialists]
    specialist_in = torch.zeros(len(x), len(subsets), 6, dtype=torch.float64)
    for m, classes in enumerate(subsets.values()):
        specialist_in[:, m, classes] = probs[m][:, :-1]
    dustbin = torch.stack([p[:, -1] for p in probs], 1)
    q = combine(p_g, specialist_in, dustbin, combiner.membership, dense_active)
    assert torch.equal(active, dense_active.sum(1)) and {2, 3} <= set(active.tolist())
    torch.testing.assert_close(log_q.double().exp(), q, atol=1e-6, rtol=0)


def test_a_killed_specialist_resumes_from_its_checkpoint(tiny_run, tmp_path):
    config, run, manifests = tiny_run
    index = run.child("clustering", "class_index")
    generalist = ModelRef(**manifests["teacher"]["outputs"]["teacher"])
    job = specialist_jobs(config, [[1, 5]], index.read_json(INDEX_MANIFEST)["rows"], index.location, generalist,
                          manifests["data"]["outputs"]["dataset"], Storage(str(tmp_path / "out")),
                          Storage(str(tmp_path / "work")))[0]
    job = dataclasses.replace(job, train=TrainConfig(epochs=2, batch_size=64, lr=0.003))
    # Dies (os._exit) in the middle of its second epoch; Ray restarts the actor and retries train().
    with failing_at_epoch(1):
        results = train_specialists([job], config.resources, max_concurrent=1)
    work = Storage(job.work).child(job.name)
    # A first attempt starts at epoch 0: resuming after epoch 1 means it died there and restarted.
    assert results[job.name]["resumed_from_epoch"] == 1
    state = torch.load(io.BytesIO(work.read_bytes(CHECKPOINT)), weights_only=True)
    assert state["epoch"] == 1 and len(state["history"]) == 2
    _, spec = load_bundle(Storage(job.output), job.name)
    assert spec.extra["classes"] == [1, 5]


def test_evaluate_reads_the_specialists_stage_when_it_is_enabled(tmp_path):
    evaluate = next(stage for stage in pipeline_stages() if stage.name == "evaluate")
    assert "specialists" in evaluate.optional_inputs
    seen = {}

    def record(context):
        seen["inputs"] = set(context.inputs)
        return StageResult()

    stages = [Stage("specialists", lambda context: StageResult(), (), enabled=lambda c: c.clustering.enabled),
              Stage("evaluate", record, (), optional_inputs=("specialists",))]
    for enabled in (False, True):
        config = config_from_dict({"clustering": {"enabled": enabled}})
        run_pipeline(stages, config, Storage(str(tmp_path / str(enabled))), progress=False, log=lambda _: None)
        assert seen["inputs"] == ({"specialists"} if enabled else set())


def test_a_rerun_trains_only_the_unfinished_specialists(tiny_run):
    config, run, _ = tiny_run  # last: it re-runs the shared run's specialists stage
    run.delete("specialists", "manifest.json")  # as if the stage had been interrupted...
    run.delete("specialists", "specialist-02", "model.json")  # ...before specialist-02 finished
    outcomes = {o.name: o for o in run_pipeline(_stages(), config, run, progress=False, log=lambda _: None)}
    assert [outcomes[name].status for name in STAGES] == ["skipped", "skipped", "skipped", "ran"]
    summary = outcomes["specialists"].manifest["summary"]
    assert summary["trained"] == ["specialist-02"]
    assert summary["reused"] == ["specialist-00", "specialist-01", "specialist-03"]
    assert run.exists("specialists", "specialist-02", "model.json")
