"""The composition root loads, validates and shows the groups a user expects in the UI."""

import dagster as dg

from dagster_project.definitions import build_defs


def test_definitions_load_and_validate() -> None:
    defs = build_defs()
    dg.Definitions.validate_loadable(defs)
    graph = defs.resolve_asset_graph()
    groups = {graph.get(k).group_name for k in graph.materializable_asset_keys}
    assert {"corpus", "sae", "activations", "probes", "report"} <= groups
    for key in graph.materializable_asset_keys:
        assert graph.get(key).description, f"asset {key.to_user_string()} has no description for the UI"


def test_activations_are_a_layer_by_dataset_grid() -> None:
    graph = build_defs().resolve_asset_graph()
    pdef = graph.get(dg.AssetKey("activations")).partitions_def
    assert isinstance(pdef, dg.MultiPartitionsDefinition)
    assert {d.name for d in pdef.partitions_defs} == {"layer", "dataset"}


def test_profile_layers_sensor_registers_missing_layers() -> None:
    from dagster_project.config import load_profile
    from dagster_project.sensors import profile_layers

    with dg.instance_for_test() as instance:
        ctx = dg.build_sensor_context(instance=instance)
        result = profile_layers(ctx)
        assert isinstance(result, dg.SensorResult)
        (req,) = result.dynamic_partitions_requests
        assert list(req.partition_keys) == [str(x) for x in load_profile().layers]
        instance.add_dynamic_partitions("layer", list(req.partition_keys))
        assert isinstance(profile_layers(dg.build_sensor_context(instance=instance)), dg.SkipReason)


def test_the_stage_jobs_hold_every_asset_once() -> None:
    """The jobs ``featurelake demo`` launches (dagster_project/jobs.py) materialize every asset, each in one."""
    from dagster_project.jobs import STAGE_JOBS

    defs = build_defs()
    jobs: list[dg.JobDefinition] = [defs.resolve_job_def(name) for name in STAGE_JOBS]
    keys = [k for job in jobs for k in job.asset_layer.selected_asset_keys]
    assert sorted(keys) == sorted(defs.resolve_asset_graph().materializable_asset_keys)


def test_resources_for_picks_the_class_of_the_sae_source_and_the_describer_backend() -> None:
    from dagster_project.config import PROFILES
    from dagster_project.describer_resource import (
        AnthropicDescriberResource,
        DescriberResource,
        OfflineDescriberResource,
        OpenAIDescriberResource,
    )
    from dagster_project.resources import GemmaScopeSAE, ReleaseSAE, SAEResource, TrainedSAE, resources_for

    default = resources_for(PROFILES["default"], "/tmp/unused")
    assert isinstance(default["sae"], TrainedSAE) and isinstance(default["describer"], OfflineDescriberResource)
    big = resources_for(PROFILES["gemma-3-27b"], "/tmp/unused")
    assert isinstance(big["sae"], ReleaseSAE) and isinstance(big["describer"], AnthropicDescriberResource)
    # the interface named with its source / backend builds that class
    assert type(SAEResource(source="gemmascope", path="saes/{layer}")) is GemmaScopeSAE
    assert type(DescriberResource(backend="openai", model="m")) is OpenAIDescriberResource
