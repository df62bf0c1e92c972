"""What the Dagster UI shows: descriptions, checks, job names and run tags.

Scope: asset descriptions keep ``<split>`` (rendered as Markdown code, not swallowed as an HTML
tag); the checks are unpartitioned, so their status is their latest evaluation, and name the
partitions they covered; the feature check verifies what its run wrote (a torn payload in a new
part is caught, tombstoned and recomputed; payloads of older parts are never read, counted
through the reader) and counts every record from the shard index; loading the definitions raises
no Beta/Preview warnings; runs started by ``asr-assets materialize`` are ``record_cache_job`` /
``features_job`` / ``summary_job`` runs tagged with the asset and split, as the Runs page lists
them, and a materialize with nothing to do starts none.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import dagster as dg
import numpy as np
import pytest

from asr_assets.cli import main as cli_main
from asr_assets.definitions import build_definitions, build_graph
from asr_assets.defs.partitions import feature_partition_key
from asr_assets.errors import CacheCorruptError
from asr_assets.extraction import plan_shard_tasks
from asr_assets.feature_cache import (ShardedParquetFeatureCache, ShardWriter, cache_key, list_parts, shard_dir,
                                      shard_index, tombstone_keys)
from asr_assets.pipeline import build_feature_shards, build_record_cache, verify_feature_shard
from asr_assets.record_cache import RecordStore
from asr_assets.settings import SPLITS, Settings, bundled_sample_manifests

SQUEEZEFORMER_HASH = "0a48384efcf3"


def test_descriptions_keep_angle_bracket_placeholders_as_code():
    graph = build_graph(Settings.from_env())
    record = graph.record_cache.specs_by_key[dg.AssetKey("record_cache")].description
    assert "`record_cache/<split>.jsonl`" in record and "`<split>_audio_blobs/`" in record
    features = graph.feature_assets[0].specs_by_key[dg.AssetKey("squeezeformer_features")].description
    assert "`feature-cache/<split>/feature_shards/features_NN/part_*.parquet`" in features
    assert "`0a48384efcf3`" in features and "[frames, 80]" in features


def test_definitions_load_without_beta_or_preview_warnings():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        defs = build_definitions(Settings.from_env())
        defs.resolve_all_job_defs()
    noisy = [w for w in caught if issubclass(w.category, (dg.BetaWarning, dg.PreviewWarning))]
    assert noisy == []
    assert {job.name for job in defs.resolve_all_job_defs()} >= {"record_cache_job", "features_job"}


def test_checks_are_unpartitioned_and_name_their_partitions(tmp_path):
    graph = build_graph(Settings.from_env(output=str(tmp_path / "out"), workers=1))
    for check in graph.checks:
        for spec in check.check_specs:
            assert spec.partitions_def is None, spec.key
    instance = dg.DagsterInstance.ephemeral()
    everything = [graph.manifests, graph.record_cache, *graph.feature_assets, *graph.checks]
    res = dg.materialize(everything, selection=[graph.record_cache], partition_key="train",
                         instance=instance, resources=graph.resources)
    (evaluation,) = res.get_asset_check_evaluations()
    assert evaluation.passed and evaluation.metadata["splits"].value == ["train"]
    assert evaluation.metadata["records"].value["train"] == 20  # the bundled sample's train split
    assert evaluation.metadata["up_to_date_not_reread"].value == []  # rebuilt: read in full
    (mat,) = res.asset_materializations_for_node("record_cache")
    table = mat.metadata["duration_histogram"].value.splitlines()[2:]  # | lo–hi | n ███ |
    shown = {row.split("|")[1].strip(): int(row.split("|")[2].split()[0]) for row in table}
    samples = RecordStore(tmp_path / "out" / "record_cache" / "train.jsonl").sidecars["num_samples"]
    edges = [0, 1, 2, 5, 10, 15, 20, 30, np.inf]
    counts, _ = np.histogram(np.asarray(samples) / 16000, bins=edges)
    assert shown == {f"{lo:g}–{hi:g}": int(n) for lo, hi, n in zip(edges, edges[1:], counts) if n}
    assert sum(shown.values()) == 20


def test_record_cache_check_does_not_reread_a_split_its_run_left_untouched(tmp_path, monkeypatch):
    graph = build_graph(Settings.from_env(output=str(tmp_path / "out"), workers=1))
    instance = dg.DagsterInstance.ephemeral()
    everything = [graph.manifests, graph.record_cache, *graph.feature_assets, *graph.checks]
    dg.materialize(everything, selection=[graph.record_cache], partition_key="train", instance=instance,
                   resources=graph.resources)
    jsonl = tmp_path / "out" / "record_cache" / "train.jsonl"
    original = Path.read_bytes

    def refuse(self):
        if self == jsonl:
            raise AssertionError("the check read the whole JSONL of an up-to-date split")
        return original(self)

    monkeypatch.setattr(Path, "read_bytes", refuse)
    res = dg.materialize(everything, selection=[graph.record_cache], partition_key="train", instance=instance,
                         resources=graph.resources)
    (mat,) = res.asset_materializations_for_node("record_cache")
    (evaluation,) = res.get_asset_check_evaluations()
    assert mat.metadata["up_to_date"].value and evaluation.passed
    assert evaluation.metadata["up_to_date_not_reread"].value == ["train"]
    assert evaluation.metadata["records"].value["train"] == 20


def test_cli_runs_are_named_jobs_tagged_with_asset_and_split(tmp_path):
    assert cli_main(["materialize", "--output", str(tmp_path / "out"), "--workers", "1"]) == 0
    instance = dg.DagsterInstance.get()  # DAGSTER_HOME is the test's own (conftest)
    runs = instance.get_runs()
    (record_run,) = [r for r in runs if r.job_name == "record_cache_job"]  # one pass builds every split
    assert record_run.tags["asr/asset"] == "record_cache" and record_run.tags["asr/split"] == ",".join(SPLITS)
    assert (record_run.tags["dagster/asset_partition_range_start"],
            record_run.tags["dagster/asset_partition_range_end"]) == (SPLITS[0], SPLITS[-1])
    feature_runs = sorted((r for r in runs if r.job_name == "features_job"),
                          key=lambda r: r.tags["dagster/asset_partition_range_start"])
    assert feature_runs and all(r.tags["asr/asset"] == "squeezeformer_features" for r in feature_runs)
    # the runs' boxes (shards x splits) cover every partition that had work, each once
    settings = Settings.from_env(output=str(tmp_path / "out"))
    covered = []
    for run in feature_runs:
        (lo, first), (hi, last) = (run.tags[f"dagster/asset_partition_range_{end}"].split("|") for end in ("start", "end"))
        splits = SPLITS[SPLITS.index(first):SPLITS.index(last) + 1]
        assert run.tags["asr/shards"] == f"{lo}-{hi}" and run.tags["asr/split"] == ",".join(splits)
        covered += [feature_partition_key(split, shard) for shard in range(int(lo), int(hi) + 1) for split in splits]
    assert len(covered) == len(set(covered))
    materialized = dg.DagsterInstance.get().get_materialized_partitions(dg.AssetKey("squeezeformer_features"))
    assert set(covered) == materialized
    with_records = {feature_partition_key(split, shard) for split in SPLITS
                    for shard, tasks in plan_shard_tasks(RecordStore(settings.record_cache_path(split)),
                                                         SQUEEZEFORMER_HASH, range(64), 64).items() if tasks}
    assert with_records and with_records <= set(covered)
    (summary_run,) = [r for r in runs if r.job_name == "summary_job"]  # one run over the splits that changed
    assert summary_run.tags["asr/asset"] == "split_summary" and summary_run.tags["asr/split"] == ",".join(SPLITS)
    assert not [r for r in runs if r.job_name == "__ephemeral_asset_job__"]
    # nothing changed: the next materialize starts no run at all
    assert cli_main(["materialize", "--output", str(tmp_path / "out"), "--workers", "1"]) == 0
    assert len(instance.get_runs()) == len(runs)


def _torn(payload: bytes) -> bytes:
    """An SFCF32L1 payload cut short after its header (as a torn write leaves it)."""
    return payload[:16] + b"\x00" * 12


@pytest.fixture
def payload_reads(monkeypatch) -> list[str]:
    """Names of the parts whose payloads any ShardedParquetFeatureCache reads (footers are not payloads)."""
    reads: list[str] = []
    original, original_raw = ShardedParquetFeatureCache._payloads, ShardedParquetFeatureCache._raw_payloads

    def spy(self, part, rows):
        reads.extend([Path(part).name] * len(rows))
        return original(self, part, rows)

    def spy_raw(part, spans):  # the raw pread path of parts laid out for it
        reads.extend([Path(part).name] * len(spans))
        return original_raw(part, spans)

    monkeypatch.setattr(ShardedParquetFeatureCache, "_payloads", spy)
    monkeypatch.setattr(ShardedParquetFeatureCache, "_raw_payloads", staticmethod(spy_raw))
    return reads


def test_feature_check_verifies_the_parts_its_run_wrote_and_no_others(tmp_path, monkeypatch, payload_reads):
    settings = Settings(manifests=tuple(bundled_sample_manifests()), output=str(tmp_path / "out"), workers=1)
    build_record_cache(settings, "train")
    build_feature_shards(settings, "squeezeformer", "train", range(64))
    root = settings.feature_split_root("train")
    ids = [r["utterance_id"] for r in RecordStore(settings.record_cache_path("train"))]
    new_uid, old_uid = ids[0], ids[1]
    new_key, old_key = cache_key(new_uid, SQUEEZEFORMER_HASH), cache_key(old_uid, SQUEEZEFORMER_HASH)
    good = ShardedParquetFeatureCache(root).load(new_uid)
    # an older part (not written by the runs below) holding a torn payload of old_uid
    with ShardWriter(root, shard_index(old_key), metadata={"frontend_hash": SQUEEZEFORMER_HASH}) as writer:
        writer.add_payload(old_key, _torn(b"SFCF32L1" + b"\x05\x00\x00\x00\x50\x00\x00\x00"))
    old_part = list_parts(shard_dir(root, shard_index(old_key)))[-1].name
    tombstone_keys(root, shard_index(new_key), SQUEEZEFORMER_HASH, [new_key])  # the run computes it again...
    original_add = ShardWriter.add_payload

    def tearing(self, key, payload):  # ... and storage tears it on the way to disk
        return original_add(self, key, _torn(payload) if key == new_key else payload)

    graph = build_graph(settings)
    everything = [graph.manifests, graph.record_cache, *graph.feature_assets, *graph.checks]
    instance = dg.DagsterInstance.ephemeral()
    shards = sorted({shard_index(new_key), shard_index(old_key)})
    tags = {"dagster/asset_partition_range_start": feature_partition_key("train", shards[0]),
            "dagster/asset_partition_range_end": feature_partition_key("train", shards[-1])}

    def run():
        payload_reads.clear()
        res = dg.materialize(everything, selection=list(graph.feature_assets), instance=instance,
                             resources=graph.resources, tags=tags, raise_on_error=False)
        (evaluation,) = res.get_asset_check_evaluations()
        mats = res.asset_materializations_for_node("squeezeformer_features")
        return evaluation, {name for m in mats for name in m.metadata["new_parts"].value}, mats

    with monkeypatch.context() as patch:
        patch.setattr(ShardWriter, "add_payload", tearing)
        evaluation, new_parts, mats = run()
    assert not evaluation.passed
    invalid = json.dumps(evaluation.metadata["invalid_features"].value)
    assert new_uid in invalid and old_uid not in invalid
    assert evaluation.metadata["tombstoned_for_recompute"].value == 1
    assert evaluation.metadata["payloads_verified"].value == 1 and evaluation.metadata["new_parts_read"].value == 1
    assert len(new_parts) == 1 and set(payload_reads) <= new_parts and old_part not in payload_reads

    evaluation, new_parts, mats = run()  # recomputed, verified, and the old part still not read
    assert evaluation.passed and sum(m.metadata["computed"].value for m in mats) == 1
    assert evaluation.metadata["payloads_verified"].value == 1 and set(payload_reads) == new_parts
    np.testing.assert_array_equal(ShardedParquetFeatureCache(root).load(new_uid), good)

    evaluation, new_parts, mats = run()  # nothing new: no payload read at all
    assert evaluation.passed and evaluation.metadata["payloads_verified"].value == 0
    assert payload_reads == [] and new_parts == set()
    assert evaluation.metadata["records_checked"].value == sum(m.metadata["records"].value for m in mats)
    with pytest.raises(CacheCorruptError):  # untouched since: the check of the run that wrote it owns it
        ShardedParquetFeatureCache(root).load(old_uid)


def test_feature_check_counts_come_from_the_index_without_reading_payloads(tmp_path, payload_reads):
    settings = Settings(manifests=tuple(bundled_sample_manifests()), output=str(tmp_path / "out"), workers=1)
    build_record_cache(settings, "train")
    build_feature_shards(settings, "squeezeformer", "train", range(64))
    frontend = settings.frontend("squeezeformer")
    root = settings.feature_split_root("train")
    uid = RecordStore(settings.record_cache_path("train"))[0]["utterance_id"]
    shard = shard_index(cache_key(uid, SQUEEZEFORMER_HASH))
    intact = verify_feature_shard(settings, frontend, "train", shard, new_parts=[])
    assert intact.unaccounted == [] and intact.with_features == intact.records >= 1
    lost = set(ShardedParquetFeatureCache(root).shard_entries(shard))
    for part in list_parts(shard_dir(root, shard)):
        part.unlink()  # features gone, and no failure report for them
    result = verify_feature_shard(settings, frontend, "train", shard, new_parts=[])
    assert uid in result.unaccounted and len(result.unaccounted) == result.records == len(lost)
    assert result.with_features == 0 and result.payloads_read == 0 and payload_reads == []


def test_feature_runs_are_boxes_over_stretches_of_busy_shards():
    from asr_assets.cli.materialize import feature_ranges

    busy = {"train": [0, 1, 2, 20, 40], "validation": [6], "test": [2, 41]}
    # 0..6 is one stretch (gaps of at most 5 shards), 20 alone, 40..41 with the splits busy there
    assert feature_ranges(busy, merge_gap=5) == [("00|train", "06|test"), ("20|train", "20|train"),
                                                 ("40|train", "41|test")]
    assert feature_ranges({"validation": [3]}) == [("03|validation", "03|validation")]
    assert feature_ranges({"train": [0, 17], "test": [40]}) == [("00|train", "17|train"), ("40|test", "40|test")]
    assert feature_ranges(busy, merge_gap=63) == [("00|train", "41|test")]  # one run, as before
    assert feature_ranges({}) == []


def test_feature_partition_keys_in_a_range_are_dagsters_own_and_computed_once():
    """The memo behind ``add_asset_metadata``'s per-call range check gives Dagster's keys, in
    Dagster's order, for boxes of every shape, and a caller's changes to a result do not leak."""
    from asr_assets.defs.partitions import feature_partitions, shard_partitions, split_partitions

    plain = dg.MultiPartitionsDefinition({"split": split_partitions, "shard": shard_partitions})
    for start, end in [("00|train", "63|test"), ("07|validation", "07|validation"), ("02|train", "34|validation"),
                       ("40|validation", "41|test")]:
        bounds = dg.PartitionKeyRange(start, end)
        keys = feature_partitions.get_partition_keys_in_range(bounds)
        assert keys == plain.get_partition_keys_in_range(bounds) and len(keys) == len(set(keys))
        keys.append("99|train")
        assert feature_partitions.get_partition_keys_in_range(bounds) == plain.get_partition_keys_in_range(bounds)
    assert len(feature_partitions.get_partition_keys_in_range(dg.PartitionKeyRange("00|train", "63|test"))) == 192
    assert feature_partitions == plain  # the same definition to Dagster (mappings, snapshots)
