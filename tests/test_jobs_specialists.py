"""jobs/specialists*.yaml: the generalist + specialists job configs validate, are sized as the
paper's experiment needs, say how to run them, and shrink through the benchmark's flags."""

import re

import pytest
from benchmark_scripts import REPO, load_benchmark

from kdray.config import load_config
from kdray.preflight import check_config

JOBS = ["jobs/specialists.yaml", "jobs/specialists_fashion_mnist.yaml", "jobs/specialists_overlap.yaml"]


@pytest.mark.parametrize("job", JOBS)
def test_job_validates_and_runs_the_specialists_stages(job):
    config = load_config(str(REPO / job))
    assert config.clustering.enabled  # turns on the clustering and specialists stages
    check_config(config)  # every model builds for the dataset's input shape; the subset bounds can be met
    assert config.specialists.subset_fraction == 0.5  # the paper's half-own-subset stream
    assert config.specialists.distill_back


@pytest.mark.parametrize("job", JOBS)
def test_job_header_names_its_commands_hardware_and_time(job):
    header = [line for line in (REPO / job).read_text().splitlines() if line.startswith("#")]
    text = "\n".join(header)
    assert f"kdray run {job}" in text and "ray job submit" in text and f"-- kdray run {job}" in text
    assert "python benchmarks/specialists.py" in text
    assert "CPU cores" in text and re.search(r"\d+ (min|hour)", text)


def test_synthetic_job_is_the_papers_many_class_setting():
    config = load_config(str(REPO / JOBS[0]))
    synth, clustering = config.data.synth, config.clustering
    assert config.data.source == "synth"
    assert synth.classes >= 100 and clustering.num_specialists >= 20
    assert clustering.num_specialists == synth.groups  # one specialist per planted group
    assert synth.classes % synth.groups == 0 and synth.classes // synth.groups >= clustering.min_size
    # The covariance is estimated on the validation split: enough rows per class to be stable.
    assert synth.validation_rows >= 50 * synth.classes


def test_fashion_mnist_job_has_a_few_overlapping_specialists():
    config = load_config(str(REPO / JOBS[1]))
    assert config.data.source == "fashion-mnist"
    assert 3 <= config.clustering.num_specialists <= 4 and config.clustering.memberships == 2


def test_overlap_job_plants_classes_two_specialists_should_share():
    config = load_config(str(REPO / JOBS[2]))
    synth, clustering = config.data.synth, config.clustering
    assert synth.bridges > 0 and clustering.memberships == 2 and clustering.num_specialists == synth.groups
    assert synth.validation_rows >= 50 * synth.classes
    assert clustering.overlap_min_share > 0  # by distance alone, easy plain classes join second subsets too


def test_benchmark_flags_shrink_the_synthetic_job_to_a_valid_config():
    benchmark = load_benchmark("specialists")
    args = benchmark.parse_args([str(REPO / JOBS[0]), "--rows", "3000", "--classes", "16", "--specialists", "4",
                                 "--epochs", "1", "--set", "specialists.top_n=2"])
    config = benchmark.benchmark_config(args)
    synth = config.data.synth
    assert (synth.rows, synth.classes, synth.groups, config.clustering.num_specialists) == (3000, 16, 4, 4)
    assert synth.test_rows == 100 and synth.validation_rows == 100  # in proportion to the rows
    epochs = (config.teacher.train, config.specialists.train, config.specialists.distill_train)
    assert [train.epochs for train in epochs] == [1, 1, 1]
    assert config.specialists.top_n == 2
    check_config(config)  # the shrunk job still meets the subset bounds


def test_benchmark_flags_keep_the_overlap_jobs_bridges_per_group():
    benchmark = load_benchmark("specialists")
    args = benchmark.parse_args([str(REPO / JOBS[2]), "--rows", "3000", "--classes", "16", "--specialists", "4"])
    synth = benchmark.benchmark_config(args).data.synth
    assert (synth.classes, synth.groups, synth.bridges) == (16, 4, 4)  # one bridge per group, as in the job
    args = benchmark.parse_args([str(REPO / JOBS[2]), "--classes", "12", "--specialists", "10"])
    assert benchmark.benchmark_config(args).data.synth.bridges == 2  # every group keeps a class of its own


def test_benchmark_refuses_synthetic_sizes_for_fashion_mnist():
    benchmark = load_benchmark("specialists")
    with pytest.raises(SystemExit, match="synthetic"):
        benchmark.benchmark_config(benchmark.parse_args([str(REPO / JOBS[1]), "--rows", "1000"]))
