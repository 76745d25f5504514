"""SAE: one per layer. Trained here with sae-lens when the profile asks for it, else loaded and checked."""


import time

import dagster as dg

from dagster_project.lib.datasets import parse_registry
from dagster_project.lib.extraction import collect_layer_vectors, tokenize
from dagster_project.lib.lake import staged_dir
from dagster_project.lib.sae import FINISHED_MARKER, train_topk
from dagster_project.partitions import layer_partitions
from dagster_project.resources import LakeResource, ModelResource, SAEResource, TrainedSAE


def train_texts(lake: LakeResource) -> tuple[list[str], list[int]]:
    """The texts of every ``train``-role dataset, read from the lake."""
    texts: list[str] = []
    for name, spec in parse_registry().items():
        if spec.role == "train":
            texts += lake.lake.read("samples", dataset=name, columns=["text"]).column("text").to_pylist()
    if not texts:
        raise dg.Failure("no train-role dataset in the registry: the SAE is trained on train-role texts")
    return texts, list(range(len(texts)))


@dg.asset(
    partitions_def=layer_partitions,
    group_name="sae",
    deps=[dg.AssetDep("samples", partition_mapping=dg.AllPartitionMapping())],
    backfill_policy=dg.BackfillPolicy.single_run(),
    kinds={"pytorch"},
    pool="model",
)
def sae(context: dg.AssetExecutionContext, lake: LakeResource, model: ModelResource,
        sae: SAEResource) -> dg.MaterializeResult:
    """The SAE of each layer of the run. Profile ``default`` trains a TopK SAE (sae-lens) on the residual
    stream (``resid_post``) of the train-role texts, decoder bias started at the data mean, and reports the
    variance explained on held-out vectors; other profiles load a release or a folder and check its
    ``d_in`` against the model. A run over several layers collects every layer's training vectors in one
    forward pass (up to the deepest), then trains the layers one after another."""
    layers = sorted(int(k) for k in context.partition_keys)
    lm = model.load()
    for layer in layers:
        lm.check_layer(layer)
    per: dict[str, dict[str, int | float | str]] = {}
    if not isinstance(sae, TrainedSAE):  # loaded, not trained here: check that it reads the model
        for layer in layers:
            loaded = sae.load(layer, lake.lake, device=str(lm.device), d_model=lm.d_model)
            per[str(layer)] = {"sae_id": loaded.sae_id, "d_in": loaded.d_in, "d_sae": loaded.d_sae}
        return dg.MaterializeResult(metadata=_metadata(per))
    t0 = time.time()
    texts, ids = train_texts(lake)
    items = tokenize(lm.tokenizer, texts, ids, model.max_tokens)
    by_layer = collect_layer_vectors(lm, layers, items, model.batch_tokens, sae.train_tokens, seed=sae.seed)
    context.log.info(f"collected {next(iter(by_layer.values())).shape[0]} activation vectors at layers {layers} "
                     f"in {time.time() - t0:.1f}s (one forward pass)")
    for layer in layers:
        vectors = by_layer.pop(layer)

        def progress(step: int, total: int, layer: int = layer) -> None:
            if step % 500 == 0 or step == total:
                context.log.info(f"SAE layer {layer} training step {step}/{total}")

        dest = lake.lake.sae_dir(layer)
        with staged_dir(dest, FINISHED_MARKER) as out_dir:  # an S3 lake: built locally, uploaded marker last
            res = train_topk(
                vectors, out_dir, width=sae.width, k=sae.k, epochs=sae.epochs,
                batch_size=sae.batch_size, lr=sae.lr, seed=sae.seed, progress=progress, location=str(dest),
            )
        del vectors
        context.log.info(f"SAE layer {layer}: variance explained {res.variance_explained:.3f}, L0 {res.l0:.1f}")
        per[str(layer)] = {
            "sae_id": res.sae_id,
            "variance_explained_heldout": float(res.variance_explained),
            "l0": float(res.l0),
            "dead_fraction": float(res.dead_fraction),
            "train_vectors": res.n_train,
            "heldout_vectors": res.n_heldout,
            "train_seconds": float(res.seconds),
            "path": str(dest),
        }
    return dg.MaterializeResult(metadata=_metadata(per))


def _metadata(per: dict[str, dict[str, int | float | str]]) -> dict[str, dg.MetadataValue | int | float | str]:
    """One layer: its fields as they are (a path as a path). Several: each field suffixed ``_layer{L}``,
    and the whole as JSON under ``layers``."""
    out: dict[str, dg.MetadataValue | int | float | str] = {}
    for layer, fields in per.items():
        suffix = "" if len(per) == 1 else f"_layer{layer}"
        for k, v in fields.items():
            out[k + suffix] = dg.MetadataValue.path(str(v)) if k == "path" else v
    if len(per) > 1:
        out["layers"] = dg.MetadataValue.json(per)
    return out
