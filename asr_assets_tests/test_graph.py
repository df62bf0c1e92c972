"""The Dagster graph end to end: definitions load; record_cache and squeezeformer_features materialize
in-process on real speech; the result is checked with an independent reader that knows only spec §3;
re-running computes nothing; the CLI covers the test corpora (every usable row cached, every broken
row reported) and the documented ``dagster asset materialize`` form."""

from __future__ import annotations

import hashlib
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import dagster as dg
import numpy as np
import pyarrow.parquet as pq

from asr_assets import compute_features
from asr_assets.audio import load_audio
from asr_assets.cli import main as cli_main
from asr_assets.definitions import build_definitions, build_graph
from asr_assets.defs.partitions import feature_partition_key
from asr_assets.record_cache import RecordStore
from asr_assets.settings import SPLITS, Settings, bundled_sample_manifests

SQUEEZEFORMER_HASH = "0a48384efcf3"


def independent_features(split_root: Path, utterance_id: str, frontend_hash: str = SQUEEZEFORMER_HASH):
    """Spec §3 only: key, shard, newest part wins, last row wins, tombstones, SFCF32L1."""
    key = hashlib.sha256(f"{utterance_id}:{frontend_hash}".encode()).hexdigest()
    directory = split_root / "feature_shards" / f"features_{int(key[:8], 16) % 64:02d}"
    if not directory.is_dir():
        return None
    parts = sorted((p for p in directory.iterdir() if p.name.startswith("part_") and p.suffix == ".parquet"),
                   key=lambda p: (p.stat().st_mtime_ns, p.name), reverse=True)
    for part in parts:
        rows = [r for r in pq.read_table(part).to_pylist() if r["key"] == key]
        if rows:
            row = rows[-1]
            if row["deleted"] or row["payload"] is None:
                return None
            payload = row["payload"]
            magic, n_rows, n_cols = struct.unpack_from("<8sII", payload)
            assert magic == b"SFCF32L1" and len(payload) == 16 + n_rows * n_cols * 4
            return np.frombuffer(payload, "<f4", offset=16).reshape(n_rows, n_cols)
    return None


def _range_tags(start: str, end: str) -> dict:
    return {"dagster/asset_partition_range_start": start, "dagster/asset_partition_range_end": end}


def test_definitions_load_with_expected_graph():
    defs = build_definitions(Settings(frontends=("squeezeformer",)))
    dg.Definitions.validate_loadable(defs)
    keys = sorted(k.to_user_string() for k in defs.resolve_all_asset_keys())
    assert keys == ["manifests", "record_cache", "split_summary", "squeezeformer_features"]
    assert feature_partition_key("train", 7) == "07|train"
    features = defs.get_assets_def("squeezeformer_features")
    assert len(features.partitions_def.get_partition_keys()) == 3 * 64
    assert features.code_versions_by_key[dg.AssetKey("squeezeformer_features")].endswith(SQUEEZEFORMER_HASH)


def test_materialize_bundled_sample_in_process(tmp_path):
    settings = Settings(manifests=tuple(bundled_sample_manifests()), output=str(tmp_path / "out"), workers=2)
    graph = build_graph(settings)
    everything = [graph.manifests, graph.record_cache, *graph.feature_assets, *graph.checks]
    instance = dg.DagsterInstance.ephemeral()
    res = dg.materialize(everything, selection=[graph.record_cache], instance=instance, resources=graph.resources,
                         tags=_range_tags("train", "test"))
    assert res.success
    meta = {m.partition: m.metadata for m in res.asset_materializations_for_node("record_cache")}
    assert set(meta) == set(SPLITS)
    assert sum(m["dagster/row_count"].value for m in meta.values()) == 22  # 14 Parquet + 8 TSV rows
    assert all(e.passed for e in res.get_asset_check_evaluations())
    for split in SPLITS:
        res = dg.materialize(everything, selection=list(graph.feature_assets), instance=instance, resources=graph.resources,
                             tags=_range_tags(feature_partition_key(split, 0), feature_partition_key(split, 63)))
        assert res.success
        mats = res.asset_materializations_for_node("squeezeformer_features")
        assert len(mats) == 64
        assert sum(m.metadata["computed"].value for m in mats) == len(RecordStore(settings.record_cache_path(split)))
        assert sum(m.metadata["failures"].value for m in mats) == 0
        (evaluation,) = res.get_asset_check_evaluations()
        assert evaluation.passed  # it read the payloads of the parts this run wrote, each once
        assert evaluation.metadata["payloads_verified"].value == len(RecordStore(settings.record_cache_path(split)))
        assert evaluation.metadata["new_parts_read"].value == sum(len(m.metadata["new_parts"].value) for m in mats)

    checked = 0
    for split in SPLITS:
        for record in RecordStore(settings.record_cache_path(split)):
            feats = independent_features(settings.feature_split_root(split), record["utterance_id"])
            assert feats is not None, record["utterance_id"]
            source = record["audio_blob_abspath"] or record["audio_path"]
            samples = load_audio(source, hint=record["audio_path"])
            assert feats.shape == (max(len(samples), 400) // 160 + 1, 80)
            np.testing.assert_allclose(feats, compute_features(samples, 16000), atol=1e-5)
            checked += 1
    assert checked == 22

    # a second run computes nothing and leaves every part byte-identical
    parts = {p: p.read_bytes() for p in (tmp_path / "out" / "feature-cache").rglob("part_*.parquet")}
    res = dg.materialize(everything, selection=list(graph.feature_assets), instance=instance, resources=graph.resources,
                         tags=_range_tags(feature_partition_key("train", 0), feature_partition_key("train", 63)))
    assert res.success
    mats = res.asset_materializations_for_node("squeezeformer_features")
    assert sum(m.metadata["computed"].value for m in mats) == 0
    assert {p: p.read_bytes() for p in (tmp_path / "out" / "feature-cache").rglob("part_*.parquet")} == parts
    (evaluation,) = res.get_asset_check_evaluations()  # nothing new: counts from the index, no payload read
    assert evaluation.passed and evaluation.metadata["payloads_verified"].value == 0
    assert evaluation.metadata["records_checked"].value == len(RecordStore(settings.record_cache_path("train")))

    # the summary of every split, downstream of the record cache and all 64 shards of its features
    res = dg.materialize([*everything, graph.summary], selection=[graph.summary], instance=instance,
                         resources=graph.resources, tags=_range_tags("train", "test"))
    assert res.success
    summaries = {m.partition: m.metadata for m in res.asset_materializations_for_node("split_summary")}
    for split in SPLITS:
        records = len(RecordStore(settings.record_cache_path(split)))
        meta = summaries[split]
        assert meta["dagster/row_count"].value == meta["squeezeformer_with_features"].value == records
        assert meta["squeezeformer_failures"].value == 0
        # the latest run of train's shards computed nothing; the others' only run computed all
        assert meta["squeezeformer_computed"].value == (0 if split == "train" else records)
        assert meta["squeezeformer_already_cached"].value == (records if split == "train" else 0)
        assert meta["summary"].value.count("data:image/png;base64,") == 3


def _report_ids(reports: Path) -> set[str]:
    ids = set()
    for path in reports.rglob("*.jsonl"):
        for line in path.read_text(encoding="utf-8").splitlines():
            ids.add(json.loads(line)["utterance_id"])
    return ids


def _manifest_rows(root: Path) -> int:
    """Data rows of a corpus, counted without the library: TSV lines after the header, Parquet rows."""
    tsv = sum(len(p.read_text(encoding="utf-8").splitlines()) - 1 for p in root.rglob("*.tsv"))
    return tsv + sum(pq.ParquetFile(p).metadata.num_rows for p in root.rglob("*.parquet"))


def test_cli_on_test_corpora_caches_every_usable_row(test_data, tmp_path):
    out = tmp_path / "x"
    args = ["materialize", "--output", str(out)]
    rows = {}
    for name in ("en_hf", "nl_cv", "formats"):
        args += ["--manifests", str(test_data / name)]
        rows[name] = _manifest_rows(test_data / name)
    assert all(n >= 10 for n in rows.values()), rows  # full set: 44, 400, 93
    assert cli_main(args) == 0
    total = 0
    for split in SPLITS:
        store = RecordStore(out / "record_cache" / f"{split}.jsonl")
        for record in store:
            feats = independent_features(out / "feature-cache" / split, record["utterance_id"])
            assert feats is not None and feats.shape[1] == 80, record["utterance_id"]
        total += len(store)
    assert total == sum(rows.values())  # every row of the three corpora is usable
    assert _report_ids(out / "reports") == set()


def test_cli_on_broken_files_reports_every_broken_row(test_data, tmp_path):
    out = tmp_path / "b"
    assert cli_main(["materialize", "--manifests", str(test_data / "broken"), "--output", str(out), "--workers", "2"]) == 0
    reported = _report_ids(out / "reports")
    cached = {r["utterance_id"] for s in SPLITS for r in RecordStore(out / "record_cache" / f"{s}.jsonl")
              if independent_features(out / "feature-cache" / s, r["utterance_id"]) is not None}
    manifest_ids = {line.split("\t")[0] for line in (test_data / "broken" / "manifest.tsv").read_text().splitlines()[1:]}
    assert reported | cached == manifest_ids and not reported & cached
    assert {"bad_empty_flac", "bad_empty_wav", "bad_random_bytes_wav", "bad_wav_zero_channels_wav",
            "bad_float32_nan_inf_1pct_wav", "bad_ps_evil_wav", "bad_tiny_1_sample_wav",
            "bad_truncated_half_flac", "bad_truncated_half_mp3"} <= reported
    assert {"good_jfk", "good_arctic_a0007", "bad_flac_named_as_wav", "bad_opus_named_as_ogg"} <= cached


def test_cli_configuration_errors_exit_2(tmp_path, capsys):
    assert cli_main(["materialize", "--manifests", str(tmp_path / "nope"), "--output", str(tmp_path)]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert cli_main(["materialize", "--frontend", "no-such-frontend", "--output", str(tmp_path)]) == 2
    assert "squeezeformer" in capsys.readouterr().err  # lists the available frontends


def test_dagster_cli_materializes_one_partition(tmp_path):
    env = {**os.environ, "ASR_ASSETS_OUTPUT": str(tmp_path / "out"), "ASR_ASSETS_WORKERS": "1",
           "DAGSTER_HOME": str(tmp_path / "dh")}
    (tmp_path / "dh").mkdir()
    (tmp_path / "dh" / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    dagster = [sys.executable, "-m", "dagster", "asset", "materialize", "-m", "asr_assets.definitions"]
    subprocess.run([*dagster, "--select", "record_cache", "--partition", "train"], env=env, check=True,
                   capture_output=True, timeout=300)
    store = RecordStore(tmp_path / "out" / "record_cache" / "train.jsonl")
    assert len(store) > 0
    key = hashlib.sha256(f"{store[0]['utterance_id']}:{SQUEEZEFORMER_HASH}".encode()).hexdigest()
    partition = feature_partition_key("train", int(key[:8], 16) % 64)
    subprocess.run([*dagster, "--select", "squeezeformer_features", "--partition", partition], env=env, check=True,
                   capture_output=True, timeout=300)
    assert independent_features(tmp_path / "out" / "feature-cache" / "train", store[0]["utterance_id"]) is not None


def test_resource_and_settings_defaults_agree():
    from asr_assets.defs.resources import RESOURCE_FIELDS, AsrAssetsConfig

    settings = Settings()
    resource = AsrAssetsConfig.from_settings(settings)
    assert resource.settings() == settings
    for name in RESOURCE_FIELDS:
        field = AsrAssetsConfig.model_fields[name]
        if not field.is_required():
            default = field.get_default(call_default_factory=True)
            assert (tuple(default) if isinstance(default, list) else default) == getattr(settings, name), name
