"""The one composition root: every asset, check, resource, job and sensor of featurelake."""

from __future__ import annotations

import dagster as dg

from assets import activations, catalog, corpus, probes, sae, statistics
from dagster_project.config import load_profile
from dagster_project.resources import resources_for


def build_defs(lake_root: str | None = None, profile_name: str | None = None) -> dg.Definitions:
    profile = load_profile(profile_name)
    modules = [corpus, sae, activations, catalog, statistics, probes]
    return dg.Definitions(
        assets=dg.load_assets_from_modules(modules),
        asset_checks=dg.load_asset_checks_from_modules(modules),
        resources=resources_for(profile, lake_root),
    )


defs = build_defs()
