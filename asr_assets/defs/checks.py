"""Asset checks: the record cache is self-consistent; every record of a shard has finite features of
the frontend's width or a reported failure.

Blocking: a failed check stops downstream steps of the same run, so a broken record cache is
never featurized and a broken shard is never handed on.

The checks are not partitioned: each evaluates the partitions of the run it is part of
(``context.partition_keys``) and names them in its metadata. A partitioned check (Preview in
Dagster 1.13) records a multi-partition run's evaluation under no partition, so the UI showed
"Skipped" and "0/1 passed" beside a passed execution; an unpartitioned check's status is its
latest evaluation.
"""


import os
from collections import defaultdict

import dagster as dg
import numpy as np

from asr_assets.extraction import plan_shard_tasks
from asr_assets.feature_cache import CacheCorruptError, ShardedParquetFeatureCache, tombstone_keys
from asr_assets.frontends import Frontend
from asr_assets.pipeline import reported_failures
from asr_assets.record_cache import RecordStore, record_store_is_valid

from .assets import record_cache
from .partitions import parse_feature_partition_key
from .resources import AsrAssetsConfig

RECORD_CACHE_CONSISTENT = "sidecars_match_jsonl"
FEATURES_COMPLETE = "features_complete_and_finite"


def _partition_keys(context: dg.AssetCheckExecutionContext) -> list[str]:
    """The partitions of the run this check evaluates (empty outside a partitioned run)."""
    op = context.op_execution_context
    return list(op.partition_keys) if op.has_partition_key or op.has_partition_key_range else []


@dg.asset_check(asset=record_cache, name=RECORD_CACHE_CONSISTENT, blocking=True,
                description="Every sidecar has one entry per JSONL line; offsets point at line starts; blobs exist.")
def record_cache_consistent(context: dg.AssetCheckExecutionContext, asr_config: AsrAssetsConfig) -> dg.AssetCheckResult:
    settings = asr_config.settings()
    problems: list[str] = []
    counts = {}
    for split in _partition_keys(context):
        path = settings.record_cache_path(split)
        if not path.exists():
            problems.append(f"{split}: {path} missing")
            continue
        if path.stat().st_size and not record_store_is_valid(path):
            problems.append(f"{split}: sidecar sizes disagree with the offsets")
            continue
        store = RecordStore(path)
        data = path.read_bytes()
        lines = data.count(b"\n")
        if lines != len(store):
            problems.append(f"{split}: {lines} JSONL lines but {len(store)} offsets")
        bad = [int(o) for o in store.offsets if o and data[o - 1:o] != b"\n"]
        if bad:
            problems.append(f"{split}: {len(bad)} offsets not at a line start")
        missing = [r["utterance_id"] for r in store if r["audio_blob_abspath"] and not os.path.isfile(r["audio_blob_abspath"])]
        if missing:
            problems.append(f"{split}: {len(missing)} audio blobs missing, e.g. {missing[0]!r}")
        counts[split] = len(store)
    return dg.AssetCheckResult(passed=not problems, severity=dg.AssetCheckSeverity.ERROR,
                               metadata={"splits": dg.MetadataValue.json(_partition_keys(context)),
                                         "records": dg.MetadataValue.json(counts), "problems": dg.MetadataValue.json(problems[:20])})


def build_feature_check(frontend: Frontend, asset: dg.AssetsDefinition) -> dg.AssetChecksDefinition:
    """Check of ``<frontend>_features``: each record of the shard has features (finite,
    ``[frames>0, feature_dim]``) or a line in the shard's failure report. A payload that
    cannot be decoded or holds invalid features fails the check and is tombstoned, so the next
    run of the partition computes it again."""
    frontend_name = frontend.name

    @dg.asset_check(asset=asset, name=FEATURES_COMPLETE, blocking=True,
                    description=f"Every record of the shard has finite {frontend_name} features of the right width, or a reported failure.")
    def _check(context: dg.AssetCheckExecutionContext, asr_config: AsrAssetsConfig) -> dg.AssetCheckResult:
        settings = asr_config.settings(frontends=(frontend_name,))
        by_split: dict[str, list[int]] = defaultdict(list)
        for key in _partition_keys(context):
            split, shard = parse_feature_partition_key(key)
            by_split[split].append(shard)
        checked, unaccounted, bad, tombstoned = 0, [], [], 0
        for split, shards in by_split.items():
            store = RecordStore(settings.record_cache_path(split))
            cache = ShardedParquetFeatureCache(settings.feature_split_root(split))
            plan = plan_shard_tasks(store, frontend.frontend_hash(), shards, settings.num_shards)
            for shard, tasks in plan.items():
                failed = reported_failures(settings, frontend_name, split, shard)
                invalid_keys = []
                for task in tasks:
                    checked += 1
                    try:
                        feats = cache.load_key(task.key)
                    except CacheCorruptError as exc:
                        bad.append(f"{task.utterance_id}: {exc}")
                        invalid_keys.append(task.key)
                        continue
                    if feats is None:
                        if task.utterance_id not in failed:
                            unaccounted.append(task.utterance_id)
                    elif feats.shape[0] == 0 or feats.shape[1] != frontend.feature_dim or not np.isfinite(feats).all():
                        bad.append(f"{task.utterance_id}: shape {feats.shape}, finite={bool(np.isfinite(feats).all())}")
                        invalid_keys.append(task.key)
                # tombstoned, so the next run of this partition computes them again
                tombstone_keys(settings.feature_split_root(split), shard, frontend.frontend_hash(), invalid_keys,
                               metadata={"frontend": frontend_name, "reason": "invalid payload found by check"})
                tombstoned += len(invalid_keys)
        return dg.AssetCheckResult(
            passed=not unaccounted and not bad, severity=dg.AssetCheckSeverity.ERROR,
            metadata={"partitions": dg.MetadataValue.json(_partition_keys(context)), "records_checked": checked,
                      "missing_without_report": dg.MetadataValue.json(unaccounted[:20]),
                      "invalid_features": dg.MetadataValue.json(bad[:20]),
                      "tombstoned_for_recompute": tombstoned},
        )

    return _check

