"""Incremental graph: manifest_sensor through a drop, a change, a removal and a no-op (build_sensor_context);
re-materializing after a new manifest keeps every existing part byte-identical and adds exactly the new
utterances; a further run writes nothing; removed records become tombstones; compaction merges parts
atomically; staleness follows data and code versions."""

from __future__ import annotations

import json
import os
import shutil

import dagster as dg
import numpy as np
import pyarrow.parquet as pq

from asr_assets import ShardedParquetFeatureCache
from asr_assets.cli import main as cli_main
from asr_assets.definitions import build_definitions, build_graph
from asr_assets.defs.sensors import manifest_sensor
from asr_assets.feature_cache import compact_shard, list_parts, shard_dir
from asr_assets.pipeline import build_feature_shards, build_record_cache
from asr_assets.record_cache import RecordStore
from asr_assets.settings import SPLITS, Settings, bundled_sample_manifests


def _copy_sample(dst):
    """The bundled TSV corpus split into two drops: first 5 rows, then the other 3."""
    src = bundled_sample_manifests()[1]
    shutil.copytree(os.path.join(src, "clips"), dst / "clips")
    lines = open(os.path.join(src, "manifest.tsv"), encoding="utf-8").read().splitlines()
    (dst / "drop1.tsv").write_text("\n".join(lines[:6]) + "\n", encoding="utf-8")
    return lines[0], lines[6:]


def _parts(output):
    return {p: p.read_bytes() for p in sorted((output / "feature-cache").rglob("part_*.parquet"))}


def test_manifest_sensor_drop_change_removal_noop(tmp_path):
    header, rest = _copy_sample(tmp_path)
    graph = build_graph(Settings(manifests=(str(tmp_path),), output=str(tmp_path / "out")))
    instance = dg.DagsterInstance.ephemeral()

    def tick(cursor):
        context = dg.build_sensor_context(instance=instance, cursor=cursor, resources=graph.resources)
        return manifest_sensor(context)

    first = tick(None)
    assert sorted(r.partition_key for r in first.run_requests) == sorted(SPLITS)
    assert first.asset_events[0].asset_key == dg.AssetKey("manifests")
    noop = tick(first.cursor)
    assert not noop.run_requests and "no new, changed or removed manifests" in noop.skip_reason.skip_message
    (tmp_path / "drop2.tsv").write_text(header + "\n" + "\n".join(rest) + "\n", encoding="utf-8")  # a drop
    drop = tick(first.cursor)
    assert len(drop.run_requests) == 3 and drop.cursor != first.cursor
    assert {r.run_key for r in drop.run_requests}.isdisjoint({r.run_key for r in first.run_requests})
    with open(tmp_path / "drop2.tsv", "a", encoding="utf-8") as handle:  # a change
        handle.write("")
        handle.write(rest[0].replace(rest[0].split("\t")[0], "extra", 1) + "\n")
    change = tick(drop.cursor)
    assert len(change.run_requests) == 3 and change.cursor != drop.cursor
    os.remove(tmp_path / "drop2.tsv")  # a removal
    removal = tick(change.cursor)
    assert len(removal.run_requests) == 3
    assert json.loads(removal.cursor) == json.loads(first.cursor)  # cursor = one digest per root
    assert len(removal.cursor) < 200


def test_increments_keep_parts_and_compute_only_new(tmp_path, capsys):
    header, rest = _copy_sample(tmp_path)
    out = tmp_path / "out"
    args = ["materialize", "--manifests", str(tmp_path), "--output", str(out), "--workers", "1"]
    assert cli_main(args) == 0
    before = _parts(out)
    n_before = sum(len(RecordStore(out / "record_cache" / f"{s}.jsonl")) for s in SPLITS)
    assert n_before == 5 and before

    (tmp_path / "drop2.tsv").write_text(header + "\n" + "\n".join(rest) + "\n", encoding="utf-8")
    capsys.readouterr()
    assert cli_main(args) == 0
    log = capsys.readouterr().out
    for split in SPLITS:  # one pass rebuilt every split: none is logged as untouched
        assert f"record_cache[{split}]: " in log and f"record_cache[{split}]: up to date" not in log, log
    after = _parts(out)
    assert {p: after[p] for p in before} == before  # every existing part byte-identical
    new_parts = [p for p in after if p not in before]
    new_keys = [k for p in new_parts for k in pq.read_table(p).column("key").to_pylist()]
    assert len(new_keys) == 3  # exactly the three new utterances

    assert cli_main(args) == 0
    assert _parts(out) == after  # nothing new: nothing written


def test_removed_records_become_tombstones_and_compaction(tmp_path):
    header, rest = _copy_sample(tmp_path)
    (tmp_path / "drop2.tsv").write_text(header + "\n" + "\n".join(rest) + "\n", encoding="utf-8")
    settings = Settings(manifests=(str(tmp_path),), output=str(tmp_path / "out"), workers=1, rows_per_part=1)
    for split in SPLITS:
        build_record_cache(settings, split)
        build_feature_shards(settings, "squeezeformer", split, range(64))
    ids = {s: [r["utterance_id"] for r in RecordStore(settings.record_cache_path(s))] for s in SPLITS}
    os.remove(tmp_path / "drop2.tsv")
    for split in SPLITS:
        build_record_cache(settings, split)
        stats = build_feature_shards(settings, "squeezeformer", split, range(64))
        kept = {r["utterance_id"] for r in RecordStore(settings.record_cache_path(split))}
        gone = [u for u in ids[split] if u not in kept]
        assert sum(s.tombstoned for s in stats.values()) == len(gone)
        cache = ShardedParquetFeatureCache(settings.feature_split_root(split))
        assert all(cache.load(u) is None for u in gone)
        assert all(cache.load(u) is not None for u in kept)
    # compaction: one part per touched shard, same answers, tombstones dropped
    train = settings.feature_split_root("train")
    cache = ShardedParquetFeatureCache(train)
    expected = {u: cache.load(u) for u in ids["train"]}
    assert cli_main(["compact", "--output", settings.output, "--split", "train"]) == 0
    for shard in range(64):
        assert len(list_parts(shard_dir(train, shard))) <= 1
    fresh = ShardedParquetFeatureCache(train)
    for uid, feats in expected.items():
        got = fresh.load(uid)
        assert (got is None and feats is None) or np.array_equal(got, feats)
    hashes = {p: p.read_bytes() for p in train.rglob("part_*.parquet")}
    fh = cache._frontend_hash("squeezeformer")
    assert all(compact_shard(train, s, fh)["parts_before"] <= 1 for s in range(64))  # idempotent
    assert {p: p.read_bytes() for p in train.rglob("part_*.parquet")} == hashes


def test_staleness_follows_manifests_and_frontend_config(tmp_path):
    header, rest = _copy_sample(tmp_path)
    settings = Settings(manifests=(str(tmp_path),), output=str(tmp_path / "out"), workers=1)
    instance = dg.DagsterInstance.ephemeral()
    graph = build_graph(settings)
    everything = [graph.manifests, graph.record_cache, *graph.feature_assets, *graph.checks]

    def versions():
        out = {}
        for split in SPLITS:
            res = dg.materialize(everything, selection=[graph.record_cache], partition_key=split, instance=instance,
                                 resources=graph.resources)
            (mat,) = res.asset_materializations_for_node("record_cache")
            out[split] = (mat.tags["dagster/data_version"], len(RecordStore(settings.record_cache_path(split))))
        return out

    v1 = versions()
    assert versions() == v1  # same records, same data versions: nothing downstream goes stale
    (tmp_path / "drop2.tsv").write_text(header + "\n" + "\n".join(rest) + "\n", encoding="utf-8")
    v2 = versions()
    for split in SPLITS:  # only splits whose records changed get a new data version
        assert (v2[split][0] != v1[split][0]) == (v2[split][1] != v1[split][1])
    assert any(v2[s][1] != v1[s][1] for s in SPLITS) and any(v2[s][1] == v1[s][1] for s in SPLITS)
    # a changed frontend config changes the feature asset's code version (its partitions go stale)
    code = build_definitions(settings).get_assets_def("squeezeformer_features").code_versions_by_key
    changed = build_definitions(settings.with_(frontends=("zipformer",))).get_assets_def("zipformer_features").code_versions_by_key
    assert code[dg.AssetKey("squeezeformer_features")].endswith("0a48384efcf3")
    assert changed[dg.AssetKey("zipformer_features")].endswith("4d9c4bc8f09a")


def test_sensor_tick_only_stats_files_even_with_thousands_of_manifests(tmp_path, monkeypatch):
    import builtins

    import pyarrow.csv
    import pyarrow.parquet

    for i in range(3000):
        sub = tmp_path / f"drop{i // 500:02d}"
        sub.mkdir(exist_ok=True)
        (sub / f"part-{i:05d}.tsv").write_text("id\tpath\tsentence\tduration\n", encoding="utf-8")
    graph = build_graph(Settings(manifests=(str(tmp_path),), output=str(tmp_path / "out")))
    instance = dg.DagsterInstance.ephemeral()

    def refuse(*args, **kwargs):
        raise AssertionError(f"the sensor tick read a file: {args[:1]}")

    monkeypatch.setattr(builtins, "open", refuse)
    monkeypatch.setattr(pyarrow.csv, "open_csv", refuse)
    monkeypatch.setattr(pyarrow.parquet, "ParquetFile", refuse)
    result = manifest_sensor(dg.build_sensor_context(instance=instance, resources=graph.resources))
    assert len(result.run_requests) == 3
    assert result.asset_events[0].metadata["roots"].value[str(tmp_path)]["files"] == 3000
    monkeypatch.undo()
    assert len(result.cursor) < 200  # one digest per root, not a file list
