"""Named asset jobs, so every run says what it built (the CLI's runs were ``__ephemeral_asset_job__``).

* ``record_cache_job`` — ``record_cache`` and its check, one split or a range of splits per run
  (the CLI runs the splits that are not up to date together: one pass over the manifests).
* ``features_job`` — every enabled ``<frontend>_features`` asset and its check, a range of
  ``shard|split`` partitions per run (the CLI runs one box of shards x splits per stretch of
  shards with work, :func:`asr_assets.cli.materialize.feature_ranges`).
* ``summary_job`` — ``split_summary`` of one split or a range of splits (a job of its own:
  Dagster runs only assets of one partitions definition together).

Runs started by ``asr-assets`` also carry the tags ``asr/asset`` and ``asr/split``
(:func:`run_tags`), filterable on the UI's Runs page.
"""

from typing import Sequence

import dagster as dg

RECORD_CACHE_JOB = "record_cache_job"
FEATURES_JOB = "features_job"
SUMMARY_JOB = "summary_job"


def build_jobs(record_cache: dg.AssetsDefinition, feature_assets: Sequence[dg.AssetsDefinition],
               summary: dg.AssetsDefinition) -> tuple:
    """``(record_cache_job, features_job, summary_job)`` over the given assets (checks included)."""
    names = ", ".join(a.key.to_user_string() for a in feature_assets)
    return (
        dg.define_asset_job(RECORD_CACHE_JOB, selection=dg.AssetSelection.assets(record_cache),
                            description="Build the record cache of one split or a range of splits (JSONL, sidecars, audio blobs) and check it."),
        dg.define_asset_job(FEATURES_JOB, selection=dg.AssetSelection.assets(*feature_assets),
                            description=f"Compute the missing features of a range of shards ({names}) and check them."),
        dg.define_asset_job(SUMMARY_JOB, selection=dg.AssetSelection.assets(summary),
                            description="Summarize splits: counts, failures, latest runs, histograms, per-bin feature stats."),
    )


def run_tags(asset: str, split: str, **extra: str) -> dict[str, str]:
    """Tags of a run started by ``asr-assets``: ``asr/asset``, ``asr/split`` and ``asr/<extra>``."""
    return {"asr/asset": asset, "asr/split": split, **{f"asr/{k}": v for k, v in extra.items()}}
