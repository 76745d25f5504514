"""The one composition root: every asset, check, resource, job and sensor of featurelake."""

from __future__ import annotations

import dagster as dg

from assets import activations, catalog, corpus, describe, probes, sae, statistics
from dagster_project.config import load_profile
from dagster_project.jobs import stage_jobs
from dagster_project.resources import resources_for
from dagster_project.sensors import profile_layers


def build_defs(lake_root: str | None = None, profile_name: str | None = None) -> dg.Definitions:
    profile = load_profile(profile_name)
    modules = [corpus, sae, activations, catalog, statistics, describe, probes]
    assets = dg.load_assets_from_modules(modules)
    return dg.Definitions(
        assets=assets,
        asset_checks=dg.load_asset_checks_from_modules(modules),
        resources=resources_for(profile, lake_root),
        jobs=stage_jobs(assets),  # the stages the CLI runs (dagster_project/jobs.py)
        sensors=[profile_layers],
        # Runs launched from the UI or the daemon: steps in subprocesses, two at a time; the `model`
        # pool (dagster.yaml) keeps it to one model-running step. `featurelake demo` runs in process.
        executor=dg.multiprocess_executor.configured({"max_concurrent": 2}),
    )


defs = build_defs()
