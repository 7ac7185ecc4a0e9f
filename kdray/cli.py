"""The `kdray` command line. Each command validates its inputs, then hands over to a stage module."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from kdray import __version__

EXIT_USAGE = 2


class CommandError(Exception):
    """A user-facing failure: printed as `kdray: error: ...` with exit status 2."""


def _user_errors() -> tuple[type[BaseException], ...]:
    from kdray.config import ConfigError
    from kdray.data.shards import DatasetError
    from kdray.evaluation.evaluate import RunError
    from kdray.runtime.artifacts import BundleError
    from kdray.runtime.session import ClusterError
    from kdray.runtime.storage import StorageError
    from kdray.submit import SubmitError

    return (CommandError, BundleError, ClusterError, ConfigError, DatasetError, RunError, StorageError, SubmitError)


# ------------------------------------------------------------------------------------ helpers
def _load(args: argparse.Namespace):
    from kdray.config import load_config, parse_overrides

    overrides = parse_overrides(getattr(args, "set", None) or [])
    # Only options given become overrides (as strings, not YAML): an empty `storage` section
    # would replace the file's.
    for option in ("storage_path", "run_name"):
        if getattr(args, option, None):
            overrides.setdefault("storage", {})[option] = getattr(args, option)
    return load_config(args.config, overrides)


def _add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", help="YAML config (default: the embedded default run)")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE",
                        help="override a config value, e.g. --set distill.temperature=8 (repeatable)")


def _run_storage(config):
    from kdray.runtime.stage import check_run_directory
    from kdray.runtime.storage import Storage

    run = Storage(config.storage.storage_path).child(config.storage.run_name)
    inputs = {"data.path": config.data.path, "distill.transfer.dataset": config.distill.transfer.dataset}
    check_run_directory(run, {key: Storage(value) for key, value in inputs.items() if value})
    run.check_writable()
    return run


# ------------------------------------------------------------------------------------ commands
def cmd_run(args: argparse.Namespace) -> int:
    from kdray.pipeline import pipeline_stages, run_pipeline
    from kdray.preflight import check_config
    from kdray.runtime.session import ray_session

    config = _load(args)
    check_config(config)
    run = _run_storage(config)
    print(f"[kdray] run directory: {run.location}")
    with ray_session(args.address, config.resources.local_num_cpus, progress=not args.no_progress):
        outcomes = run_pipeline(pipeline_stages(), config, run, progress=not args.no_progress)
    _print_outcomes(outcomes)
    _print_sweep(run)
    _print_results(run)
    _print_report(run)
    print(f"[kdray] finished: {run.location}")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from kdray.pipeline import run_pipeline, stages_for
    from kdray.preflight import check_config
    from kdray.runtime.session import ray_session

    config = _load(args)
    config = config.model_copy(update={"sweep": config.sweep.model_copy(update={"enabled": True})})
    check_config(config)
    run = _run_storage(config)
    print(f"[kdray] run directory: {run.location}")
    with ray_session(args.address, config.resources.local_num_cpus, progress=not args.no_progress):
        outcomes = run_pipeline(stages_for("sweep"), config, run, progress=not args.no_progress)
    _print_outcomes(outcomes)
    _print_sweep(run)
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    from kdray.preflight import check_config
    from kdray.submit import (
        check_job_config,
        config_in_working_dir,
        follow,
        job_runtime_env,
        run_entrypoint,
        submit_run,
    )

    config = _load(args)  # a bad config fails here, before anything is uploaded
    check_config(config)
    check_job_config(config)
    options = [*(f"--set={pair}" for pair in args.set or []),
               *([f"--storage-path={args.storage_path}"] if args.storage_path else []),
               *([f"--run-name={args.run_name}"] if args.run_name else [])]
    entrypoint = run_entrypoint(args.config and config_in_working_dir(args.config, args.working_dir), options)
    job = submit_run(args.address, entrypoint, job_runtime_env(args.working_dir, args.pip or []),
                     config.storage.run_name)
    print(f"[kdray] submitted job {job.job_id}: {entrypoint}")
    print(f"[kdray] dashboard: {job.link}")
    if args.no_wait:
        print(f"[kdray] follow it with: ray job logs --follow --address {job.dashboard} {job.job_id}")
        return 0
    try:
        info = follow(job)
    except KeyboardInterrupt:
        print(f"\n[kdray] stopped following; the job keeps running (ray job stop --address {job.dashboard} "
              f"{job.job_id} stops it)", file=sys.stderr)
        return 130
    print(f"[kdray] job {job.job_id} {info.status}" + (f": {info.message}" if info.message else ""))
    return 0 if info.status == "SUCCEEDED" else 1


def cmd_report(args: argparse.Namespace) -> int:
    from kdray.evaluation.report import write_report
    from kdray.runtime.storage import Storage

    page = write_report(Storage(args.run_dir))
    print(f"[kdray] wrote {page}")
    return 0


def _print_outcomes(outcomes) -> None:
    print(f"\n{'stage':<14}{'status':<10}{'seconds':>9}  summary")
    for outcome in outcomes:
        summary = (outcome.manifest or {}).get("summary", {})
        text = ", ".join(f"{k}={v}" for k, v in summary.items() if not isinstance(v, (dict, list)) or k == "rows")
        print(f"{outcome.name:<14}{outcome.status:<10}{outcome.seconds:>9.1f}  {text}")


def _print_sweep(run) -> None:
    from kdray.runtime.storage import Storage
    from kdray.sweep import EXPERIMENT, TRIALS_JSON, format_trials_table, tensorboard_command

    if run.exists("sweep", TRIALS_JSON):
        table = run.read_json("sweep", TRIALS_JSON)
        print(f"\nsweep trials (* best, by {table['metric']})")
        print(format_trials_table(table["trials"], table["metric"], table["best"]))
        print(f"[kdray] TensorBoard: {tensorboard_command(Storage(run.uri('sweep', EXPERIMENT)))}")


def _print_report(run) -> None:
    from kdray.evaluation.report import PAGE, REPORT_DIR

    if run.exists(REPORT_DIR, PAGE):
        print(f"[kdray] report: {run.uri(REPORT_DIR, PAGE)}")


def _print_results(run) -> None:
    from kdray.evaluation.evaluate import RESULTS, format_results_table

    if run.exists(RESULTS):
        print("\n" + format_results_table(run.read_json(RESULTS)))


def cmd_config_show(args: argparse.Namespace) -> int:
    from kdray.config import config_to_yaml

    print(config_to_yaml(_load(args)), end="")
    return 0


# SynthConfig fields `kdray data synth` takes as --options (the dashed spelling of each).
SYNTH_OPTIONS = ("rows", "validation_rows", "test_rows", "classes", "groups", "bridges", "dim", "seed", "shards")


def cmd_data_synth(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from kdray.config import SynthConfig
    from kdray.data.synth import write_synthetic_dataset
    from kdray.runtime.session import ray_session

    values = {name: getattr(args, name) for name in SYNTH_OPTIONS if getattr(args, name) is not None}
    try:
        synth = SynthConfig(**values)
    except ValidationError as error:
        problems = "; ".join(f"--{'.'.join(map(str, e['loc'])).replace('_', '-') or 'options'}: "
                             f"{e['msg'].removeprefix('Value error, ')}" for e in error.errors())
        raise CommandError(problems) from None
    output = _dataset_output(args.out, args.overwrite)
    with ray_session(args.address), _staged_dataset(output) as staging:
        manifest = write_synthetic_dataset(staging, synth, progress=True)
    print(f"wrote {manifest.rows()} rows in {len(manifest.shards)} shards to {output.location}")
    return 0


def _dataset_output(location: str, overwrite: bool, source: str | None = None):
    """The dataset directory a command writes, checked before any work: an empty or new one, or a
    kdray dataset with --overwrite, and never the source it reads."""
    from kdray.data.shards import FORMAT, MANIFEST
    from kdray.runtime.storage import Storage, check_replaceable

    output = Storage(location)
    def is_dataset(manifest) -> bool:
        return isinstance(manifest, dict) and manifest.get("format") == FORMAT

    check_replaceable(output, "dataset", MANIFEST, is_dataset, overwrite, {"source": Storage(source)} if source else None)
    return output


def _staged_dataset(output):
    """A new directory beside `output` that replaces it once the dataset written there is complete."""
    from kdray.data.shards import MANIFEST
    from kdray.runtime.storage import staged_output

    return staged_output(output, MANIFEST)


def cmd_data_import_idx(args: argparse.Namespace) -> int:
    from kdray.data.idx import check_idx_source, import_idx

    output = _dataset_output(args.out, args.overwrite, args.src)
    check_idx_source(args.src, validation_fraction=args.validation_fraction, rows_per_shard=args.rows_per_shard,
                     seed=args.seed, name=args.name)  # every file read through before anything is written
    with _staged_dataset(output) as staging:
        manifest = import_idx(args.src, staging, validation_fraction=args.validation_fraction,
                              rows_per_shard=args.rows_per_shard, seed=args.seed, name=args.name)
    print(f"imported {manifest.rows()} rows in {len(manifest.shards)} shards to {output.location}")
    return 0


def cmd_data_fetch(args: argparse.Namespace) -> int:
    from kdray.data.idx import check_idx_options, fetch

    check_idx_options(validation_fraction=args.validation_fraction, rows_per_shard=args.rows_per_shard, seed=args.seed)
    output = _dataset_output(args.out, args.overwrite, args.source)
    with _staged_dataset(output) as staging:
        manifest = fetch(args.name, staging, source=args.source, validation_fraction=args.validation_fraction,
                         rows_per_shard=args.rows_per_shard, seed=args.seed)
    print(f"fetched {args.name}: {manifest.rows()} rows in {len(manifest.shards)} shards at {output.location}")
    return 0


def cmd_data_inspect(args: argparse.Namespace) -> int:
    from kdray.data.shards import read_manifest
    from kdray.data.validate import inspect_dataset
    from kdray.runtime.session import ray_session
    from kdray.runtime.storage import Storage

    read_manifest(Storage(args.dir))  # a missing or malformed manifest fails before Ray starts
    with ray_session(args.address):
        report = inspect_dataset(Storage(args.dir), progress=True)
    manifest = report.manifest
    print(f"dataset        {report.location}")
    print(f"rows           {manifest.rows()}  ({', '.join(f'{s}: {manifest.rows(s)}' for s in manifest.split_names())})")
    print(f"shards         {len(manifest.shards)}")
    print(f"feature shape  {tuple(manifest.feature_shape)}")
    print(f"classes        {manifest.num_classes}")
    _print_histogram(report.class_histogram(), manifest)
    print("all shards OK")
    return 0


def _print_histogram(counts, manifest) -> None:
    names = manifest.class_names or tuple(str(c) for c in range(manifest.num_classes))
    width, peak = 40, max(1, int(max(counts)))
    print("class histogram (all splits)")
    for index, count in enumerate(counts[: manifest.num_classes]):
        print(f"  {names[index]:>14} {int(count):>9} {'#' * round(width * count / peak)}")
    if counts[manifest.num_classes]:
        print(f"  {'(unlabeled)':>14} {int(counts[manifest.num_classes]):>9}")


def cmd_evaluate(args: argparse.Namespace) -> int:
    from kdray.evaluation.evaluate import RESULTS, check_run_models, evaluate_run, format_results_table, run_manifests
    from kdray.runtime.session import ray_session
    from kdray.runtime.storage import Storage

    run = Storage(args.run_dir)  # a wrong directory or a bad bundle fails before Ray starts
    trusted = check_run_models(run, run_manifests(run), args.trust_code)
    with ray_session(args.address):
        results = evaluate_run(args.run_dir, trusted=trusted)
    print(format_results_table(results))
    print(f"\n[kdray] wrote {Storage(args.run_dir).uri(RESULTS)}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from kdray.evaluation.evaluate import check_run_models, run_manifests
    from kdray.evaluation.predict import PREDICTIONS, check_output, find_model, predict
    from kdray.runtime.session import ray_session
    from kdray.runtime.storage import Storage

    # An unknown model, a bad bundle or an output that would replace something fails before Ray starts.
    run, manifests = Storage(args.run_dir), run_manifests(Storage(args.run_dir))
    check_output(run, Storage(args.data), Storage(args.out))
    find_model(run, manifests, args.model)
    trusted = check_run_models(run, manifests, args.trust_code, models=[args.model])
    with ray_session(args.address):
        rows = predict(args.run_dir, args.data, args.out, model=args.model, trusted=trusted, top_k=args.top_k)
    print(f"wrote {rows} predictions of {args.model} to {args.out} (see {PREDICTIONS})")
    return 0


# ------------------------------------------------------------------------------------ parser
def _command(subparsers, name: str, handler: Callable, help_text: str) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(name, help=help_text, description=help_text)
    parser.set_defaults(handler=handler)
    return parser


def _top_k(text: str) -> int | str | None:
    """--top-k: a number of classes, `all` (None: every class) or `auto`."""
    if text in ("all", "auto"):
        return None if text == "all" else text
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a number of classes (1 or more), 'all' or 'auto', got {text!r}")
    return int(text)


def _add_trust_code(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--trust-code", action="store_true",
                        help="let the run's models import the 'package.module:factory' paths their model.json "
                        "files name (that runs their code: only for runs you trust)")


def _add_dataset_output(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--overwrite", action="store_true", help="replace an existing dataset at OUT")


def _add_split_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--validation-fraction", type=float, default=1 / 12,
                        help="share of the training file held out as the validation split")
    parser.add_argument("--rows-per-shard", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0, help="seed of the train/validation split")


def _add_pipeline_arguments(parser: argparse.ArgumentParser) -> None:
    """Where the run is stored and which Ray runs it: shared by `run` and `sweep`."""
    parser.add_argument("--storage-path", help="where runs are stored: a path or URI (s3://, gs://, file://)")
    parser.add_argument("--run-name", help="the run's directory under the storage path")
    parser.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local in-process Ray)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    from kdray.config import AUTO_TOP_K, DENSE_CLASSES

    parser = argparse.ArgumentParser(prog="kdray", description="Knowledge distillation (Hinton et al. 2015) on Ray.")
    parser.add_argument("--version", action="version", version=f"kdray {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = _command(commands, "run", cmd_run, "run the pipeline's stages (skipping those already done)")
    _add_config_arguments(run)
    _add_pipeline_arguments(run)

    sweep = _command(commands, "sweep", cmd_sweep, "tune the student's temperature and hard-target weight "
                     "(and width) with Ray Tune on the cached transfer set; the stages it needs run first")
    _add_config_arguments(sweep)
    _add_pipeline_arguments(sweep)

    submit = _command(commands, "submit", cmd_submit, "run the pipeline on a Ray cluster as a Ray job: validate the "
                      "config here, upload the working directory, print the job's dashboard link, follow its logs")
    _add_config_arguments(submit)
    submit.add_argument("--address", help="the cluster's dashboard, e.g. http://127.0.0.1:8265 (default: "
                        "RAY_API_SERVER_ADDRESS, then RAY_ADDRESS, then a Ray started on this machine)")
    submit.add_argument("--storage-path", help="where the job stores runs: an absolute path on the cluster or a URI")
    submit.add_argument("--run-name", help="the run's directory under the storage path")
    submit.add_argument("--working-dir", default=".", help="directory uploaded with the job; CONFIG must be in it "
                        "(default: the current directory)")
    submit.add_argument("--pip", action="append", metavar="REQUIREMENT",
                        help="a requirement Ray pip-installs for the job on each node it uses (repeatable); "
                        "'${RAY_RUNTIME_ENV_CREATE_WORKING_DIR}' installs the uploaded project with its dependencies, "
                        "for a cluster whose image lacks them")
    submit.add_argument("--no-wait", action="store_true", help="return once submitted instead of following the logs")

    config = _command(commands, "config", None, "inspect configs")
    config_commands = config.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    show = _command(config_commands, "show", cmd_config_show, "print the resolved config with all defaults")
    _add_config_arguments(show)

    data = _command(commands, "data", None, "create, import and check datasets")
    data_commands = data.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    synth = _command(data_commands, "synth", cmd_data_synth,
                     "generate the synthetic many-class dataset with planted confusable groups")
    synth.add_argument("out", help="output dataset directory (path or URI)")
    for name in SYNTH_OPTIONS:
        synth.add_argument(f"--{name.replace('_', '-')}", type=int, dest=name)
    synth.add_argument("--address", help="Ray cluster address")
    _add_dataset_output(synth)

    idx = _command(data_commands, "import-idx", cmd_data_import_idx, "import MNIST-style IDX files")
    idx.add_argument("src", help="folder with the four IDX files (gzipped or raw)")
    idx.add_argument("out", help="output dataset directory")
    idx.add_argument("--name", default="fashion-mnist", choices=["fashion-mnist", "mnist"])
    _add_split_options(idx)
    _add_dataset_output(idx)

    fetch = _command(data_commands, "fetch", cmd_data_fetch,
                     "get Fashion-MNIST or MNIST: a local copy if there is one, else download and verify")
    fetch.add_argument("name", choices=["fashion-mnist", "mnist"])
    fetch.add_argument("out", help="output dataset directory")
    fetch.add_argument("--source", help="folder with the IDX files (looked at first)")
    _add_split_options(fetch)
    _add_dataset_output(fetch)

    inspect = _command(data_commands, "inspect", cmd_data_inspect, "check every shard and summarise a dataset")
    inspect.add_argument("dir", help="dataset directory (path or URI)")
    inspect.add_argument("--address", help="Ray cluster address")

    evaluate = _command(commands, "evaluate", cmd_evaluate,
                        "evaluate a run's models on its test split; write RUN_DIR/results.json and print the table")
    evaluate.add_argument("run_dir", help="the run directory, STORAGE_PATH/RUN_NAME (path or URI)")
    evaluate.add_argument("--address", help="Ray cluster address")
    _add_trust_code(evaluate)

    report = _command(commands, "report", cmd_report,
                      "write RUN_DIR/report/index.html: results, learning curves, confusion matrices, sweep heatmaps")
    report.add_argument("run_dir", help="the run directory, STORAGE_PATH/RUN_NAME (path or URI)")

    predict = _command(commands, "predict", cmd_predict, "write a run model's predictions for a dataset as Parquet")
    predict.add_argument("run_dir", help="the run directory, STORAGE_PATH/RUN_NAME (path or URI)")
    predict.add_argument("data", help="a kdray dataset (all splits) or a Parquet directory with 'id' and 'x' columns")
    predict.add_argument("out", help="output directory: shards/*.parquet and predictions.json")
    predict.add_argument("--model", default="student", help="which of the run's models (default: student)")
    predict.add_argument("--top-k", type=_top_k, default="auto", metavar="K|all|auto",
                         help="write each row's K most probable classes and their probabilities; all: every "
                              f"class's; auto (default): every class's up to {DENSE_CLASSES:,} classes, the top "
                              f"{AUTO_TOP_K} above")
    predict.add_argument("--address", help="Ray cluster address")
    _add_trust_code(predict)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except _user_errors() as error:
        print(f"kdray: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("kdray: interrupted; run the same command again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
