"""Corpus: the labelled samples of every registered dataset, one partition per dataset."""


import dagster as dg

from dagster_project.lib.datasets import get_spec, load_dataset, parse_registry
from dagster_project.partitions import dataset_partitions
from dagster_project.resources import LakeResource
from dagster_project.table_metadata import table_asset


@table_asset(
    "samples",
    partitions_def=dataset_partitions,
    group_name="corpus",
    kinds={"parquet"},
    description=__doc__,
)
def samples(context: dg.AssetExecutionContext, lake: LakeResource) -> dg.MaterializeResult:
    """Read one dataset through the registry: validate every row, map raw labels to positive/negative,
    drop exact duplicate texts (counted), and write ``samples/dataset=D`` to the lake."""
    specs = parse_registry()
    spec = get_spec(context.partition_key, specs)
    ds = load_dataset(spec, specs)
    path = lake.lake.write("samples", ds.table, dataset=spec.name, meta={"fingerprint": spec.fingerprint()})
    context.log.info(
        f"{spec.name}: {ds.table.num_rows} samples ({ds.n_duplicates} duplicates dropped, "
        f"{ds.n_excluded_overlap} overlapping another dataset dropped)"
    )
    preview = ds.table.slice(0, 5).select(["sample_id", "label", "is_positive", "n_chars"]).to_pandas()
    return dg.MaterializeResult(
        metadata={
            "dataset": spec.name,
            "role": spec.role,
            "source": spec.source,
            "rows": ds.table.num_rows,
            "rows_read": ds.n_read,
            "duplicates_dropped": ds.n_duplicates,
            "overlap_dropped": ds.n_excluded_overlap,
            "positives": ds.n_positive,
            "negatives": ds.n_negative,
            "label_counts": dg.MetadataValue.json(ds.label_counts),
            "path": dg.MetadataValue.path(str(path)),
            "preview": dg.MetadataValue.md(preview.to_markdown(index=False)),
        }
    )
