"""Assets: ``record_cache`` (per split), one ``<frontend>_features`` asset per enabled frontend
(per split x shard, depending on ``record_cache[split]``) and ``split_summary`` (per split,
depending on the record cache and every shard of the split's features).

Both iterate ``context.partition_keys``, so one run may cover one partition (CLI, UI) or a range
(backfills with the multi-run policy, ``asr-assets materialize``); metadata is attached per
partition either way.
"""

import time
from collections import Counter, defaultdict
from typing import Sequence

import dagster as dg

from asr_assets.frontends import Frontend
from asr_assets.pipeline import build_feature_shards, build_record_caches
from asr_assets.record_cache import DURATION_EDGES_S
from asr_assets.settings import SPLITS

from .partitions import feature_partition_key, feature_partitions, parse_feature_partition_key, split_partitions
from .resources import AsrAssetsConfig

MANIFESTS_KEY = dg.AssetKey("manifests")
RECORD_CACHE_VERSION = "1"
FEATURES_CODE_VERSION = "1"
SUMMARY_CODE_VERSION = "1"
SPLIT_SUMMARY = "split_summary"

manifests = dg.AssetSpec(
    MANIFESTS_KEY,
    group_name="record_cache",
    kinds={"tsv", "parquet"},
    description="The manifest roots (external: observed by manifest_sensor, whose digest is its data version).",
)


def feature_asset_name(frontend: str) -> str:
    """``w2v-bert`` -> ``w2v_bert_features`` (asset names are identifiers)."""
    return frontend.replace("-", "_") + "_features"


def _duration_histogram(counts: list[int]) -> str:
    """Markdown table of :attr:`WriteSummary.duration_counts <asr_assets.record_cache.WriteSummary>`."""
    if not any(counts):
        return "no utterances"
    edges = DURATION_EDGES_S
    rows = ["| duration (s) | utterances |", "|---|---|"]
    for lo, hi, n in zip(edges[:-1], edges[1:], counts):
        if n:
            rows.append(f"| {lo:g}–{hi:g} | {n} {'█' * max(1, round(30 * n / max(counts)))} |")
    return "\n".join(rows)


@dg.asset(
    partitions_def=split_partitions,
    deps=[manifests],
    group_name="record_cache",
    kinds={"python", "jsonl"},
    code_version=RECORD_CACHE_VERSION,
    description=(
        "Per split: `record_cache/<split>.jsonl`, its little-endian sidecars "
        "(`.offsets.u64`, `.estimated_frames.u32`, ...) and `<split>_audio_blobs/`, from every manifest."
    ),
)
def record_cache(context: dg.AssetExecutionContext, asr_config: AsrAssetsConfig) -> dg.MaterializeResult:
    """A single-split run (the default backfill policy: UI backfills, sensors) gives the split
    the data version sha256[:16] of its JSONL. A range run (``asr-assets materialize`` over the
    splits that are stale, built in one pass over the manifests) attaches each split's metadata,
    ``sha256`` included, to its own partition; Dagster then derives the data version from the
    code version and the inputs."""
    settings = asr_config.settings()
    keys = list(context.partition_keys)
    # one call, every stale split in one pass: none it builds is logged "up to date" afterwards
    results = build_record_caches(settings, keys, also=SPLITS, log=context.log.info)
    for split in keys:
        result = results[split]
        reasons = Counter(r.stage for r in result.rejections)
        metadata = {
            "dagster/row_count": result.summary.utterances,
            "audio_hours": round(result.summary.audio_seconds / 3600, 4),
            "rows_not_cached": len(result.rejections),
            "rows_not_cached_by_stage": dg.MetadataValue.json(dict(reasons)),
            "audio_blobs": result.summary.blobs,
            "path": dg.MetadataValue.path(result.summary.path),
            "report": dg.MetadataValue.path(result.report_path),
            "duration_histogram": dg.MetadataValue.md(_duration_histogram(result.summary.duration_counts)),
            "manifests": dg.MetadataValue.json(list(settings.manifests)),
            "seconds": round(result.seconds, 2),
            "up_to_date": result.up_to_date,
            "sha256": result.summary.sha256,
        }
        if len(context.partition_keys) == 1:
            return dg.MaterializeResult(metadata=metadata, data_version=dg.DataVersion(result.summary.sha256[:16]))
        context.add_asset_metadata(metadata, partition_key=split)
    return dg.MaterializeResult()


def build_feature_asset(frontend: Frontend) -> dg.AssetsDefinition:
    """The ``<frontend>_features`` asset: one partition = one shard of one split.

    The frontend (with any overrides) is fixed when the definitions load; its hash12 is part of
    the code version, so changing its config marks the asset's partitions stale.
    """
    frontend_name = frontend.name

    @dg.asset(
        name=feature_asset_name(frontend_name),
        partitions_def=feature_partitions,
        deps=[dg.AssetDep(record_cache, partition_mapping=dg.MultiToSingleDimensionPartitionMapping(partition_dimension_name="split"))],
        group_name="feature_cache",
        kinds={"python", "parquet"},
        code_version=f"{FEATURES_CODE_VERSION}-{frontend.frontend_hash()}",
        backfill_policy=dg.BackfillPolicy.multi_run(max_partitions_per_run=64),
        pool="feature_extraction",
        automation_condition=dg.AutomationCondition.eager(),
        tags={"asr/frontend": frontend_name},
        description=(f"`{frontend_name}` features (float32 `[frames, {frontend.feature_dim}]`, cache hash "
                     f"`{frontend.frontend_hash()}`) in `feature-cache/<split>/feature_shards/features_NN/part_*.parquet`."),
    )
    def _features(context: dg.AssetExecutionContext, asr_config: AsrAssetsConfig) -> None:
        settings = asr_config.settings(frontends=(frontend_name,))
        by_split: dict[str, list[int]] = defaultdict(list)
        for key in context.partition_keys:
            split, shard = parse_feature_partition_key(key)
            by_split[split].append(shard)
        for split, shards in by_split.items():
            start = time.perf_counter()
            stats = build_feature_shards(settings, frontend, split, shards, log=context.log.info)
            elapsed = time.perf_counter() - start
            total_audio = sum(s.audio_seconds for s in stats.values())
            context.log.info(
                f"{frontend_name}[{split}]: {len(shards)} shards, {sum(s.computed for s in stats.values())} computed, "
                f"{sum(s.skipped for s in stats.values())} already cached, {sum(s.failed for s in stats.values())} failed, "
                f"{total_audio / max(elapsed, 1e-9):.0f}x real time (wall, all workers); writing parts "
                f"{sum(s.write_seconds for s in stats.values()):.2f} s, decoding + featurizing "
                f"{sum(s.worker_seconds for s in stats.values()):.2f} s of worker time"
            )
            for shard, s in stats.items():
                report = settings.features_report_path(frontend_name, split, shard)
                context.add_asset_metadata(
                    {
                        "dagster/row_count": s.computed + s.skipped,
                        "records": s.records,
                        "computed": s.computed,
                        "skipped_already_cached": s.skipped,
                        "failures": s.failed,
                        "tombstoned": s.tombstoned,
                        "audio_seconds": round(s.audio_seconds, 2),
                        "audio_hours": round(s.audio_seconds / 3600, 5),
                        "xrt_per_core": round(s.xrt_per_core, 1),
                        "worker_seconds": round(s.worker_seconds, 3),
                        "write_seconds": round(s.write_seconds, 3),
                        "worker_peak_rss_mib": round(s.worker_peak_rss_mib, 1),
                        "frames": s.frames,
                        "parts_written": s.parts_written,
                        # read by the check: it verifies the payloads of these parts only
                        "new_parts": dg.MetadataValue.json(s.part_names),
                        "empty_shard": s.records == 0,
                        "frontend_hash": frontend.frontend_hash(),
                        "path": dg.MetadataValue.path(str(settings.feature_split_root(split) / "feature_shards" / f"features_{shard:02d}")),
                        **({"failure_report": dg.MetadataValue.path(str(report))} if s.failed else {}),
                    },
                    partition_key=feature_partition_key(split, shard),
                )

    return _features


def _summary_metadata(summary, markdown: str) -> dict:
    """Dagster metadata of one split's :class:`~asr_assets.summary.SplitSummary`: the numbers
    (plotted over time on the asset's page) and its ``markdown`` report with the plots."""
    metadata = {
        "summary": dg.MetadataValue.md(markdown),
        "dagster/row_count": summary.utterances,
        "audio_hours": round(summary.audio_hours, 4),
        "speakers": summary.speakers,
        "rows_not_cached": sum(summary.rows_not_cached_by_stage.values()),
        "rows_not_cached_by_stage": dg.MetadataValue.json(summary.rows_not_cached_by_stage),
    }
    for f in summary.features:
        prefix = f.frontend.replace("-", "_")
        metadata.update({
            f"{prefix}_with_features": f.with_features,
            f"{prefix}_failures": f.failures,
            f"{prefix}_failures_by_stage": dg.MetadataValue.json(f.failures_by_stage),
            f"{prefix}_computed": f.computed,
            f"{prefix}_already_cached": f.already_cached,
            f"{prefix}_xrt_per_core": round(f.xrt_per_core, 1),
            f"{prefix}_xrt_wall": round(f.xrt_wall, 1),
        })
    return metadata


def build_summary_asset(frontends: Sequence[Frontend], feature_assets: Sequence[dg.AssetsDefinition]) -> dg.AssetsDefinition:
    """``split_summary``: per split, what the caches hold and what the latest runs did, as
    Markdown with plots (duration and frames histograms, per-bin feature mean/std) and numbers.

    Depends on ``record_cache[split]`` and on every ``<frontend>_features[NN|split]``; reads no
    feature payload (:func:`asr_assets.summary.summarize_split`)."""
    to_split = dg.MultiToSingleDimensionPartitionMapping(partition_dimension_name="split")
    names = tuple(f.name for f in frontends)

    @dg.asset(
        name=SPLIT_SUMMARY,
        partitions_def=split_partitions,
        deps=[record_cache, *(dg.AssetDep(a, partition_mapping=to_split) for a in feature_assets)],
        group_name="summary",
        kinds={"python", "markdown"},
        code_version=SUMMARY_CODE_VERSION,
        automation_condition=dg.AutomationCondition.eager(),
        description=("Per split: utterances, hours, speakers, failures by stage, computed vs already cached and "
                     "× real time of the latest feature runs, with the duration and frames-per-utterance "
                     "histograms and each frontend's per-bin feature mean ± std (open the `summary` metadata)."),
    )
    def _split_summary(context: dg.AssetExecutionContext, asr_config: AsrAssetsConfig) -> dg.MaterializeResult:
        from asr_assets.summary import summaries_markdown, summarize_split

        settings = asr_config.settings(frontends=names)
        summaries = [summarize_split(settings, split, frontends) for split in context.partition_keys]
        markdowns = summaries_markdown(summaries, workers=settings.effective_workers)  # the splits' plots at once
        for split, summary, markdown in zip(context.partition_keys, summaries, markdowns):
            metadata = _summary_metadata(summary, markdown)
            if len(context.partition_keys) == 1:
                return dg.MaterializeResult(metadata=metadata)
            context.add_asset_metadata(metadata, partition_key=split)
        return dg.MaterializeResult()

    return _split_summary
