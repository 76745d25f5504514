"""Activations: SAE features of every sample, stored sparse per (layer, dataset)."""


import time

import dagster as dg

from dagster_project.config import ExtractionConfig, load_profile
from dagster_project.lib.datasets import parse_registry
from dagster_project.lib.extraction import extract_to_lake, tokenize
from dagster_project.lib.lake import Lake
from dagster_project.lib.tables import ACTIVATION_TABLES
from dagster_project.partitions import layer_dataset_partitions, split_keys
from dagster_project.provenance import activation_record
from dagster_project.resources import LakeResource, ModelResource, SAEResource
from dagster_project.table_metadata import table_asset


def provenance(model: ModelResource, sae_id: str, hook: str) -> dict[str, object]:
    """The record every file of a partition carries; readers check it (``dagster_project.provenance``)."""
    return activation_record(model, sae_id, hook, load_profile().config_hash())


def extract_dataset(
    context: dg.AssetExecutionContext,
    lake: Lake,
    model: ModelResource,
    sae: SAEResource,
    dataset: str,
    layers: list[int],
    cfg: ExtractionConfig,
) -> dict[str, float]:
    """One forward pass over ``dataset`` for all ``layers``; writes each (layer, dataset) partition atomically."""
    lm = model.load()
    for layer in layers:
        lm.check_layer(layer)
    spec = parse_registry()[dataset]
    samples = lake.read("samples", dataset=dataset, columns=["sample_id", "text"])
    texts = dict(zip(samples.column("sample_id").to_pylist(), samples.column("text").to_pylist(), strict=True))
    import torch

    saes = {layer: sae.load(layer, lake, device=str(lm.device), d_model=lm.d_model)
            .to(lm.device, getattr(torch, model.sae_dtype)) for layer in layers}
    items = tokenize(lm.tokenizer, list(texts.values()), list(texts), model.max_tokens)
    metas = {layer: {**provenance(model, saes[layer].sae_id, sae.hook), "layer": layer, "dataset": dataset,
                     "role": spec.role} for layer in layers}
    last_log = [0.0]

    def progress(done: int, total: int) -> None:
        if time.time() - last_log[0] > 10 or done == total:
            last_log[0] = time.time()
            context.log.info(f"{dataset} layers {layers}: {done}/{total} samples")

    return extract_to_lake(lm, saes, items, texts, lake, dataset, metas, model.batch_tokens,
                           cfg.write_token_activations, cfg.write_residuals, progress, pack=model.pack,
                           with_token_residuals=cfg.token_residuals(load_profile()))


@table_asset(
    "activations",
    partitions_def=layer_dataset_partitions,
    group_name="activations",
    deps=["samples", "sae"],
    backfill_policy=dg.BackfillPolicy.single_run(),
    kinds={"parquet", "pytorch"},
    pool="model",
)
def activations(context: dg.AssetExecutionContext, config: ExtractionConfig, lake: LakeResource,
                model: ModelResource, sae: SAEResource) -> dg.MaterializeResult:
    """SAE activations of every sample at one layer, stored sparse: pooled rows per active feature
    (max, mean over tokens, argmax token, active-token count), per-token rows, the tokens themselves,
    pooled residual vectors for the dense baseline and, where ``write_token_residuals`` (by default the
    profile's ``token_residuals``) says so, every token's residual vector in float16. Texts of similar
    length share a batch; the model runs only up to the deepest layer asked for; a run over several layers
    of one dataset does one forward pass. Each file records the model, SAE, hook, dtype and config hash it
    was made with."""
    by_dataset = split_keys(context.partition_keys)
    lk = lake.lake
    # leftovers of a killed run, only in the partitions this run writes: another extraction running beside
    # this one (one per GPU) keeps its writes in flight
    lk.clean_temp([lk.partition_dir(t, layer, d) for d, layers in by_dataset.items() for layer in layers
                   for t in ACTIVATION_TABLES]
                  + [lk.partition_dir("tokens", None, d) for d in by_dataset])
    summary: dict[str, float] = {}
    for dataset, layers in by_dataset.items():
        m = extract_dataset(context, lk, model, sae, dataset, layers, config)
        context.log.info(f"{dataset} layers {layers}: {m['tokens']} tokens at {m['tokens_per_s']:.0f} tok/s, "
                         f"{m['truncated_texts']} truncated")
        for k, v in m.items():
            summed = k in ("samples", "tokens", "truncated_texts", "seconds") or k.startswith("writer_")
            summary[k] = summary.get(k, 0) + v if summed else v
    summary["tokens_per_s"] = summary["tokens"] / max(summary["seconds"], 1e-9)
    return dg.MaterializeResult(
        metadata={
            **{k: v if isinstance(v, bool) else float(v) if isinstance(v, float) else int(v)
               for k, v in summary.items()},
            "partitions": dg.MetadataValue.json({d: v for d, v in by_dataset.items()}),
            "model_id": model.model_id,
            "sae_source": sae.source,
        }
    )
