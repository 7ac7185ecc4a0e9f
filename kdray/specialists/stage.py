"""The specialists stage: train one specialist per subset the clustering stage found (Ray actors),
then score the combination on the test split and, if asked, distil it back into one net."""

from __future__ import annotations

from kdray.runtime.stage import REPORT_TABLES, StageContext, StageResult
from kdray.runtime.storage import Storage
from kdray.specialists.actors import specialist_jobs, train_specialists
from kdray.specialists.clustering import CLASS_INDEX, INDEX_MANIFEST, SUBSETS
from kdray.specialists.combined import COMBINED, DISTILLED, distill_back
from kdray.specialists.tables import TABLES, TABLES_CSV, table_summary, write_tables


def run_specialists(context: StageContext) -> StageResult:
    config, output = context.config, context.output
    clustering = Storage(context.input_output("clustering", "clustering"))
    subsets = clustering.read_json(SUBSETS)
    class_index = clustering.child(CLASS_INDEX)
    class_rows = class_index.read_json(INDEX_MANIFEST)["rows"]
    generalist = context.model_ref("teacher", "teacher")
    dataset = context.input_output("data", "dataset")
    jobs = specialist_jobs(config, subsets["subsets"], class_rows, class_index.location, generalist, dataset,
                           output, context.work)
    results = train_specialists(jobs, config.resources, config.specialists.max_concurrent, context.progress)
    combined = {"location": output.location, "bundles": [job.name for job in jobs],
                "generalist": {"location": generalist.location, "bundles": list(generalist.bundles)},
                "top_n": config.specialists.top_n}
    models = {COMBINED: combined}
    summary = {"trained": sorted(n for n, r in results.items() if not r.get("reused")),
               "reused": sorted(n for n, r in results.items() if r.get("reused"))}
    if config.specialists.distill_back:
        models[DISTILLED] = distill_back(context, combined, dataset)
    tables = write_tables(context, models, dataset, subsets["subsets"])
    summary.update(table_summary(tables))
    return StageResult(outputs={"models": models, "tables": output.uri(TABLES),
                                REPORT_TABLES: {"Specialists": output.uri(TABLES_CSV)}}, summary=summary)
