"""What the Dagster UI shows: descriptions, checks, job names and run tags.

Scope: asset descriptions keep ``<split>`` (rendered as Markdown code, not swallowed as an HTML
tag); the checks are unpartitioned, so their status is their latest evaluation, and name the
partitions they covered; loading the definitions raises no Beta/Preview warnings; runs started
by ``asr-assets materialize`` are ``record_cache_job`` / ``features_job`` runs tagged with the
asset and split, as the Runs page lists them, and a materialize with nothing to do starts none.
"""

from __future__ import annotations

import warnings

import dagster as dg

from asr_assets.cli import main as cli_main
from asr_assets.definitions import build_definitions, build_graph
from asr_assets.settings import SPLITS, Settings


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


def test_cli_runs_are_named_jobs_tagged_with_asset_and_split(tmp_path):
    assert cli_main(["materialize", "--output", str(tmp_path / "out"), "--workers", "1"]) == 0
    instance = dg.DagsterInstance.get()  # DAGSTER_HOME is the test's own (conftest)
    runs = instance.get_runs()
    record_runs = [r for r in runs if r.job_name == "record_cache_job"]
    feature_runs = [r for r in runs if r.job_name == "features_job"]
    assert sorted(r.tags["asr/split"] for r in record_runs) == sorted(SPLITS)
    assert all(r.tags["asr/asset"] == "record_cache" and r.tags["dagster/partition"] == r.tags["asr/split"]
               for r in record_runs)
    assert sorted(r.tags["asr/split"] for r in feature_runs) == sorted(SPLITS)
    for r in feature_runs:  # one run per split, over the range of shards that had work
        lo, hi = (int(x) for x in r.tags["asr/shards"].split("-"))
        assert r.tags["asr/asset"] == "squeezeformer_features" and 0 <= lo <= hi <= 63
    assert not [r for r in runs if r.job_name == "__ephemeral_asset_job__"]
    # nothing changed: the next materialize starts no run at all
    assert cli_main(["materialize", "--output", str(tmp_path / "out"), "--workers", "1"]) == 0
    assert len(instance.get_runs()) == len(runs)
