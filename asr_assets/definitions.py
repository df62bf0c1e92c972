"""The Dagster code location: ``dagster dev -w workspace.yaml`` or ``-m asr_assets.definitions``.

Settings are read from the environment (``ASR_ASSETS_*``, see :mod:`asr_assets.settings`) when
Dagster loads the definitions, not at import time. One feature asset exists per enabled frontend.
"""

import warnings
from dataclasses import dataclass

import dagster as dg

from asr_assets.settings import Settings


@dataclass(frozen=True)
class Graph:
    """The pieces of the graph for one set of settings."""

    manifests: dg.AssetSpec
    record_cache: dg.AssetsDefinition
    feature_assets: tuple
    summary: dg.AssetsDefinition
    checks: tuple
    jobs: tuple
    sensors: tuple
    resources: dict


def build_graph(settings: Settings) -> Graph:
    # The graph uses two Beta features on purpose (BackfillPolicy.multi_run, and the
    # MultiToSingleDimensionPartitionMapping from a shard to its split); their warnings, once
    # per definition load, flooded `dagster asset materialize` and `dagster dev` output.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=dg.BetaWarning)
        warnings.filterwarnings("ignore", category=dg.PreviewWarning)
        from asr_assets.defs.assets import build_feature_asset, build_summary_asset, manifests, record_cache
        from asr_assets.defs.checks import build_feature_check, record_cache_consistent
        from asr_assets.defs.jobs import build_jobs
        from asr_assets.defs.resources import AsrAssetsConfig
        from asr_assets.defs.sensors import build_automation_sensor, manifest_sensor

        frontends = [settings.frontend(name) for name in settings.frontends]
        feature_assets = tuple(build_feature_asset(frontend) for frontend in frontends)
        summary = build_summary_asset(frontends, feature_assets)
        checks = (record_cache_consistent, *(build_feature_check(f, a) for f, a in zip(frontends, feature_assets)))
        sensors = (manifest_sensor, build_automation_sensor((*feature_assets, summary)))
        jobs = build_jobs(record_cache, feature_assets, summary)
    return Graph(manifests, record_cache, feature_assets, summary, checks, jobs, sensors,
                 {"asr_config": AsrAssetsConfig.from_settings(settings)})


def build_definitions(settings: Settings | None = None, executor: str = "in_process") -> dg.Definitions:
    """Assets, checks, sensors and resources for ``settings`` (default: from the environment).

    ``executor``: where the steps of every job run, one of
    :data:`asr_assets.defs.executors.EXECUTORS` (``in_process``, ``multiprocess``, ``celery``;
    ConfigError otherwise); configured per run by
    :func:`asr_assets.defs.executors.execution_run_config`."""
    from asr_assets.defs.executors import executor_def

    graph = build_graph(settings or Settings.from_env())
    return dg.Definitions(
        assets=[graph.manifests, graph.record_cache, *graph.feature_assets, graph.summary],
        asset_checks=list(graph.checks),
        jobs=list(graph.jobs),
        sensors=list(graph.sensors),
        resources=graph.resources,
        # By default steps run in the run's process: a feature step already fans out to its own
        # worker pool, and a step subprocess cost seconds of start-up per step.
        executor=executor_def(executor),
    )


@dg.definitions
def defs() -> dg.Definitions:
    return build_definitions()
