"""Asset checks: the record cache is self-consistent; every record of a shard has features or a
reported failure, and every payload the run wrote is finite and of the frontend's width. A check
verifies what its run wrote (new parts, counts from part footers), never the whole cache again.

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

from asr_assets.extraction import plan_shard_tasks
from asr_assets.feature_cache import ShardedParquetFeatureCache
from asr_assets.frontends import Frontend
from asr_assets.pipeline import verify_feature_shard
from asr_assets.record_cache import RecordStore, read_commit, record_store_is_valid
from asr_assets.storage import basename, is_url, list_files

from .assets import record_cache
from .partitions import feature_partition_key, parse_feature_partition_key
from .resources import AsrAssetsConfig

RECORD_CACHE_CONSISTENT = "sidecars_match_jsonl"
FEATURES_COMPLETE = "features_complete_and_finite"


def _partition_keys(context: dg.AssetCheckExecutionContext) -> list[str]:
    """The partitions of the run this check evaluates (empty outside a partitioned run)."""
    op = context.op_execution_context
    return list(op.partition_keys) if op.has_partition_key or op.has_partition_key_range else []


def _run_materializations(context: dg.AssetCheckExecutionContext, asset_key: dg.AssetKey) -> dict[str, dict]:
    """``{partition: metadata}`` of the materializations of ``asset_key`` in this check's run
    (one event-log query; empty when the run only executes the check)."""
    records = context.instance.get_records_for_run(
        context.op_execution_context.run_id, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION).records
    found = {}
    for record in records:
        materialization = record.event_log_entry.asset_materialization
        if materialization is not None and materialization.asset_key == asset_key:
            found[materialization.partition] = materialization.metadata
    return found


@dg.asset_check(asset=record_cache, name=RECORD_CACHE_CONSISTENT, blocking=True,
                description="Every sidecar has one entry per JSONL line; offsets point at line starts; blobs exist.")
def record_cache_consistent(context: dg.AssetCheckExecutionContext, asr_config: AsrAssetsConfig) -> dg.AssetCheckResult:
    """A split this run rebuilt is read in full (lines, offsets, blobs); one its run found up to
    date (nothing written) only gets the cheap sidecar-size and last-offset checks."""
    settings = asr_config.settings()
    written = _run_materializations(context, record_cache.key)
    problems: list[str] = []
    counts = {}
    unchanged = []
    for split in _partition_keys(context):
        path = settings.record_cache_path(split)
        remote = is_url(path)  # an object store: the files its commit object names (local copies)
        if not remote and not path.exists():
            problems.append(f"{split}: {path} missing")
            continue
        # an empty split is valid as an empty JSONL (local) or a commit naming one (object store),
        # which the upstream reuse rule (non-empty JSONL) does not cover
        commit = read_commit(str(path)) if remote else None
        empty = (commit is not None and commit.get("jsonl", {}).get("size") == 0) if remote \
            else path.stat().st_size == 0
        if not empty and not record_store_is_valid(path):
            problems.append(f"{split}: no commit object or sidecar sizes disagree with the offsets" if remote
                            else f"{split}: sidecar sizes disagree with the offsets")
            continue
        store = RecordStore(path)
        up_to_date = written.get(split, {}).get("up_to_date")
        if up_to_date is not None and up_to_date.value:
            unchanged.append(split)
            counts[split] = len(store)
            continue
        data = store.path.read_bytes()
        lines = data.count(b"\n")
        if lines != len(store):
            problems.append(f"{split}: {lines} JSONL lines but {len(store)} offsets")
        bad = [int(o) for o in store.offsets if o and data[o - 1:o] != b"\n"]
        if bad:
            problems.append(f"{split}: {len(bad)} offsets not at a line start")
        present = ({b.name for b in list_files(str(path.parent / f"{split}_audio_blobs"))} if remote else None)
        missing = [r["utterance_id"] for r in store if r["audio_blob_abspath"] and not (
            basename(r["audio_blob_abspath"]) in present if remote else os.path.isfile(r["audio_blob_abspath"]))]
        if missing:
            problems.append(f"{split}: {len(missing)} audio blobs missing, e.g. {missing[0]!r}")
        counts[split] = len(store)
    return dg.AssetCheckResult(passed=not problems, severity=dg.AssetCheckSeverity.ERROR,
                               metadata={"splits": dg.MetadataValue.json(_partition_keys(context)),
                                         "records": dg.MetadataValue.json(counts),
                                         "up_to_date_not_reread": dg.MetadataValue.json(unchanged),
                                         "problems": dg.MetadataValue.json(problems[:20])})


def build_feature_check(frontend: Frontend, asset: dg.AssetsDefinition) -> dg.AssetChecksDefinition:
    """Check of ``<frontend>_features`` that verifies what the run wrote, never the whole cache:

    * counts from the shard index (part footers, no payload): each record of the shard has a
      live key or a line in the shard's failure report;
    * payloads of the parts this run wrote (the ``new_parts`` of the partition's materialization
      in this run) only: finite, ``[frames>0, feature_dim]``. A payload that cannot be decoded
      or holds invalid features fails the check and is tombstoned, so the next run of the
      partition computes it again.

    Parts written by earlier runs were verified by the check of the run that wrote them and are
    not read again (:func:`asr_assets.pipeline.verify_feature_shard`)."""
    frontend_name = frontend.name
    asset_key = asset.key

    @dg.asset_check(asset=asset, name=FEATURES_COMPLETE, blocking=True,
                    description=(f"Every record of the shard has {frontend_name} features in the shard index, or a "
                                 "reported failure; every payload this run wrote is finite and of the right width."))
    def _check(context: dg.AssetCheckExecutionContext, asr_config: AsrAssetsConfig) -> dg.AssetCheckResult:
        settings = asr_config.settings(frontends=(frontend_name,))
        written = _run_materializations(context, asset_key)
        by_split: dict[str, list[int]] = defaultdict(list)
        for key in _partition_keys(context):
            split, shard = parse_feature_partition_key(key)
            by_split[split].append(shard)
        checked, unaccounted, bad = 0, [], []
        parts_read = payloads_read = tombstoned = 0
        for split, shards in by_split.items():
            store = RecordStore(settings.record_cache_path(split))
            plan = plan_shard_tasks(store, frontend.frontend_hash(), shards, settings.num_shards)
            cache = ShardedParquetFeatureCache(settings.feature_split_root(split), settings.num_shards)
            cache.prefetch(plan)  # the shard indexes, several at once (one listing on an object store)
            for shard, tasks in plan.items():
                meta = written.get(feature_partition_key(split, shard), {})
                new_parts = meta["new_parts"].value if "new_parts" in meta else []
                result = verify_feature_shard(settings, frontend, split, shard, new_parts, tasks, cache=cache)
                checked += result.records
                unaccounted += result.unaccounted
                bad += result.invalid
                parts_read += result.parts_read
                payloads_read += result.payloads_read
                tombstoned += result.tombstoned
        return dg.AssetCheckResult(
            passed=not unaccounted and not bad, severity=dg.AssetCheckSeverity.ERROR,
            metadata={"partitions": dg.MetadataValue.json(_partition_keys(context)), "records_checked": checked,
                      "missing_without_report": dg.MetadataValue.json(unaccounted[:20]),
                      "new_parts_read": parts_read, "payloads_verified": payloads_read,
                      "invalid_features": dg.MetadataValue.json(bad[:20]),
                      "tombstoned_for_recompute": tombstoned},
        )

    return _check
