"""Sensors: keep the layer partitions in step with the active profile."""

import dagster as dg

from dagster_project.config import load_profile
from dagster_project.partitions import LAYER_PARTITIONS_NAME, layer_partitions


@dg.sensor(minimum_interval_seconds=60, default_status=dg.DefaultSensorStatus.RUNNING)
def profile_layers(context: dg.SensorEvaluationContext) -> dg.SensorResult | dg.SkipReason:
    """Register every layer the active profile lists as a `layer` partition (then backfill it from the UI)."""
    wanted = [str(x) for x in load_profile().layers]
    existing = set(context.instance.get_dynamic_partitions(LAYER_PARTITIONS_NAME))
    new = [x for x in wanted if x not in existing]
    if not new:
        return dg.SkipReason(f"every profile layer {wanted} is registered")
    context.log.info(f"registering layers {new} from the profile")
    return dg.SensorResult(dynamic_partitions_requests=[layer_partitions.build_add_request(new)])
