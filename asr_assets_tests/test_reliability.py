"""Reliability: SIGKILL at random moments then a re-run gives the records and features of an
uninterrupted run; fail_fast; resource bombs are refused with bounded memory; two writers of one
partition leave one consistent result; a worker that crashes costs one utterance, not the run;
results do not depend on the number of workers; audio paths
can be confined to the manifest roots; payloads are never unpickled; hostile transcripts keep the
JSONL and offsets intact."""

from __future__ import annotations

import multiprocessing
import os
import pickle
import random
import signal
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile as sf

from asr_assets import RecordStore, ShardedParquetFeatureCache
from asr_assets.cli import main as cli_main
from asr_assets.errors import CacheCorruptError
from asr_assets.extraction import ExtractionConfig, extract_shards
from asr_assets.feature_cache import cache_key, shard_dir, shard_index
from asr_assets.frontends.logmel import SQUEEZEFORMER_CONFIG, LogMelFrontend
from asr_assets.pipeline import build_feature_shards, build_record_cache
from asr_assets.record_cache import record_store_is_valid
from asr_assets.settings import SPLITS, Settings, bundled_sample_manifests


def _materialize_cmd(out: Path) -> list[str]:
    return [sys.executable, "-m", "asr_assets.cli", "materialize", "--output", str(out), "--workers", "2"]


def _snapshot(out: Path) -> tuple[dict, dict]:
    records, features = {}, {}
    for split in SPLITS:
        path = out / "record_cache" / f"{split}.jsonl"
        records[split] = path.read_bytes()
        cache = ShardedParquetFeatureCache(out / "feature-cache" / split)
        for item in RecordStore(path):
            features[(split, item["utterance_id"])] = cache.load(item["utterance_id"])
    return records, features


def test_sigkill_at_random_moments_then_rerun_matches_uninterrupted(tmp_path):
    env = {**os.environ, "DAGSTER_HOME": str(tmp_path / "dh")}
    reference = tmp_path / "reference"
    subprocess.run(_materialize_cmd(reference), env=env, check=True, capture_output=True, timeout=600)
    expected_records, expected_features = _snapshot(reference)

    out = tmp_path / "killed"
    rng = random.Random(1234)
    for _ in range(4):
        proc = subprocess.Popen(_materialize_cmd(out), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
        time.sleep(rng.uniform(1.0, 9.0))
        os.killpg(proc.pid, signal.SIGKILL)  # the CLI and its extraction workers
        proc.wait()
    subprocess.run(_materialize_cmd(out), env=env, check=True, capture_output=True, timeout=600)
    records, features = _snapshot(out)
    assert records == expected_records
    assert features.keys() == expected_features.keys()
    for key, feats in expected_features.items():
        assert feats is not None and features[key] is not None, key
        np.testing.assert_allclose(features[key], feats, atol=1e-5)
    for split in SPLITS:
        assert record_store_is_valid(out / "record_cache" / f"{split}.jsonl")


def test_fail_fast_stops_on_first_bad_utterance(test_data, tmp_path):
    out = tmp_path / "ff"
    assert cli_main(["materialize", "--manifests", str(test_data / "broken"), "--output", str(out),
                     "--workers", "1", "--fail-fast"]) == 1
    assert cli_main(["materialize", "--manifests", str(test_data / "broken"), "--output", str(out), "--workers", "1"]) == 0


def _corpus(tmp_path: Path, rows: list[tuple[str, str, str, str]]) -> Path:
    root = tmp_path / "corpus"
    root.mkdir(exist_ok=True)
    lines = ["id\tpath\tsentence\tduration\tclient_id"] + ["\t".join(r) + "\tspk0" for r in rows]
    (root / "m.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


def test_resource_bomb_is_refused_with_bounded_memory(tmp_path):
    root = tmp_path / "corpus"
    root.mkdir()
    silence = np.zeros(16000 * 3600, dtype=np.int16)  # one hour of digital silence: a tiny FLAC
    sf.write(root / "hour.flac", silence, 16000, format="FLAC")
    del silence
    assert (root / "hour.flac").stat().st_size < 2_000_000
    _corpus(tmp_path, [("bomb", "hour.flac", "claims five seconds", "5.0")])
    settings = Settings(manifests=(str(root),), output=str(tmp_path / "out"), workers=1, max_decode_s=60)
    build_record_cache(settings, "train")
    stats = build_feature_shards(settings, "squeezeformer", "train", range(64))
    failures = [f for s in stats.values() for f in s.failures]
    assert [f.utterance_id for f in failures] == ["bomb"]
    assert "longer than max_duration_s=60" in failures[0].error
    # the worker (a separate process, even with workers=1) never held the hour: 230 MB as float32
    assert 0 < max(s.worker_peak_rss_mib for s in stats.values()) < 200
    # and the decoder itself, traced in this process, stops before holding it
    from asr_assets.audio import DecodeConfig, load_audio
    from asr_assets.errors import AudioDecodeError

    tracemalloc.start()
    with pytest.raises(AudioDecodeError, match="longer than max_duration_s=60"):
        load_audio(root / "hour.flac", config=DecodeConfig(max_duration_s=60))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 64 * 2**20


def _run_shards(settings_kwargs: dict) -> None:
    settings = Settings(**settings_kwargs)
    build_feature_shards(settings, "squeezeformer", "train", range(64))


def test_two_writers_of_the_same_partition_leave_one_result(tmp_path):
    settings = Settings(manifests=(bundled_sample_manifests()[1],), output=str(tmp_path / "out"), workers=1)
    build_record_cache(settings, "train")
    kwargs = {"manifests": settings.manifests, "output": settings.output, "workers": 1}
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_run_shards, args=(kwargs,)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(300)
        assert p.exitcode == 0
    store = RecordStore(settings.record_cache_path("train"))
    keys = [k for part in (tmp_path / "out").rglob("part_*.parquet") for k in pq.read_table(part).column("key").to_pylist()]
    assert len(keys) == len(set(keys)) == len(store)  # each utterance written once
    cache = ShardedParquetFeatureCache(settings.feature_split_root("train"))
    assert all(cache.load(r["utterance_id"]) is not None for r in store)


def test_same_features_whatever_the_number_of_workers(tmp_path):
    payloads = {}
    for workers in (1, 2):
        settings = Settings(manifests=tuple(bundled_sample_manifests()), output=str(tmp_path / f"w{workers}"), workers=workers)
        build_record_cache(settings, "train")
        build_feature_shards(settings, "squeezeformer", "train", range(64))
        payloads[workers] = {}
        for part in Path(settings.output).rglob("part_*.parquet"):
            table = pq.read_table(part)
            payloads[workers].update(zip(table.column("key").to_pylist(), table.column("payload").to_pylist()))
    assert payloads[1] and payloads[1] == payloads[2]  # byte-identical SFCF32L1 payloads


def test_audio_paths_can_be_confined_to_the_manifest_roots(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    t = np.arange(16000) / 16000
    sf.write(outside / "secret.wav", (0.1 * np.sin(2 * np.pi * 300 * t)).astype(np.float32), 16000)
    root = tmp_path / "corpus"
    root.mkdir()
    sf.write(root / "ok.wav", (0.1 * np.sin(2 * np.pi * 300 * t)).astype(np.float32), 16000)
    (root / "link.wav").symlink_to(outside / "secret.wav")
    _corpus(tmp_path, [("inside", "ok.wav", "fine", "1.0"), ("dotdot", "../outside/secret.wav", "up", "1.0"),
                       ("absolute", str(outside / "secret.wav"), "abs", "1.0"), ("symlink", "link.wav", "link", "1.0")])
    confined = Settings(manifests=(str(root),), output=str(tmp_path / "c"), confine_audio_paths=True, workers=1)
    result = build_record_cache(confined, "train")
    assert [r["utterance_id"] for r in RecordStore(confined.record_cache_path("train"))] == ["inside"]
    assert sorted(r.utterance_id for r in result.rejections) == ["absolute", "dotdot", "symlink"]
    assert all("outside the allowed roots" in r.reason for r in result.rejections)
    open_ = Settings(manifests=(str(root),), output=str(tmp_path / "o"), workers=1)
    assert len(RecordStore(build_record_cache(open_, "train").summary.path)) == 4  # off by default (upstream)


class _Exploit:
    def __reduce__(self):
        return (open, ("/tmp/asr_assets_pwned_marker", "w"))


def test_payloads_are_never_unpickled(tmp_path):
    marker = Path("/tmp/asr_assets_pwned_marker")
    marker.unlink(missing_ok=True)
    key = cache_key("evil", "0a48384efcf3")
    directory = shard_dir(tmp_path, shard_index(key))
    directory.mkdir(parents=True)
    pq.write_table(pa.table({"key": [key], "payload": [pickle.dumps(_Exploit())], "deleted": [False]}),
                   directory / "part_evil.parquet")
    with pytest.raises(CacheCorruptError):
        ShardedParquetFeatureCache(tmp_path).load("evil")
    assert not marker.exists()


def test_hostile_transcripts_keep_jsonl_and_offsets_intact(tmp_path):
    root = tmp_path / "corpus"
    root.mkdir()
    t = np.arange(16000) / 16000
    sf.write(root / "a.wav", (0.1 * np.sin(2 * np.pi * 300 * t)).astype(np.float32), 16000)
    weird = ["ctrl\x01\x07bell", "עברית RTL \u202e override", "line\u2028sep\u2029para", "tab\u000bvt\u000cff", "nul\x00byte"]
    rows = [(f"u{i}", "a.wav", text, "1.0") for i, text in enumerate(weird)]
    rows.append(("huge", "a.wav", "x" * (10 * 2**20), "1.0"))
    _corpus(tmp_path, rows)
    settings = Settings(manifests=(str(root),), output=str(tmp_path / "out"))
    result = build_record_cache(settings, "train")
    store = RecordStore(settings.record_cache_path("train"))
    assert record_store_is_valid(settings.record_cache_path("train"))
    assert [r["transcript"] for r in store] == [" ".join(w.split()) for w in weird]
    assert [r.utterance_id for r in result.rejections] == ["huge"]
    assert result.rejections[0].reason.startswith("transcript length 10485760")


class CrashOnLongClips(LogMelFrontend):
    """squeezeformer that dies with SIGSEGV on clips over 10 s, like a decoder crash on hostile input."""

    def __call__(self, samples, sample_rate):
        if len(samples) > 10 * sample_rate:
            os.kill(os.getpid(), signal.SIGSEGV)
        return super().__call__(samples, sample_rate)


def test_a_crashing_worker_costs_one_utterance_not_the_run(tmp_path):
    settings = Settings(manifests=tuple(bundled_sample_manifests()), output=str(tmp_path / "out"), workers=2)
    for split in SPLITS:
        build_record_cache(settings, split)
    frontend = CrashOnLongClips("squeezeformer", SQUEEZEFORMER_CONFIG)
    crashed, computed = [], 0
    for split in SPLITS:
        stats = extract_shards(RecordStore(settings.record_cache_path(split)), settings.feature_split_root(split),
                               frontend, range(64), ExtractionConfig(workers=2))
        crashed += [f.utterance_id for s in stats.values() for f in s.failures]
        computed += sum(s.computed for s in stats.values())
    assert crashed == ["jfk"]  # the only clip over 10 s
    assert computed == 21


def test_decoder_warnings_on_stderr_are_logged_with_the_file(tmp_path, monkeypatch, caplog, capfd):
    """libmpg123 (inside libsndfile) prints "Warning: Xing stream size off..." for a truncated
    MP3 straight to file descriptor 2, naming no file. In probe and feature workers it is
    captured and logged by the main process with the file and utterance it belongs to, and
    nothing reaches stderr unnamed. 40 copies of the truncated MP3 of the test data, without a
    duration column, so durations are probed in worker processes too."""
    import asr_assets.pipeline as pipeline
    from asr_assets.logs import native_stderr
    from asr_assets_tests.conftest import require_test_data

    mp3 = require_test_data() / "broken" / "audio" / "truncated_half.mp3"
    with native_stderr() as said:  # in this process: fd 2 is borrowed and given back
        os.write(2, b"  one\n  two  ")
    os.write(2, b"after\n")
    assert said.text == "one two" and capfd.readouterr().err == "after\n"

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    lines = ["path\tsentence\tclient_id"]
    for i in range(40):
        (corpus / f"clip{i:02d}.mp3").write_bytes(mp3.read_bytes())
        lines.append(f"clip{i:02d}.mp3\tthe same half sentence\tspeaker{i}")
    (corpus / "train.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    settings = Settings(manifests=(str(corpus),), output=str(tmp_path / "out"), workers=2)
    monkeypatch.setattr(pipeline, "_POOL_MIN_PROBES", 8)
    caplog.set_level("WARNING")
    capfd.readouterr()
    for split in SPLITS:
        build_record_cache(settings, split)
    probed = [r.getMessage() for r in caplog.records if r.getMessage().startswith("probing ")]
    caplog.clear()
    counts = {split: len(RecordStore(settings.record_cache_path(split))) for split in SPLITS}
    stats = {split: build_feature_shards(settings, "squeezeformer", split, range(64)) for split in SPLITS}
    featurized = [r.getMessage() for r in caplog.records if "the decoder wrote" in r.getMessage()]
    err = capfd.readouterr().err  # (the named lines too, if a CLI test configured the stderr handler)
    assert err.count("Xing") == err.count("the decoder wrote: Warning: Xing")  # none unnamed
    assert sum(counts.values()) == 40
    # probed durations are the full header's, so each decode is short of its record: reported
    failures = [f for split_stats in stats.values() for s in split_stats.values() for f in s.failures]
    assert len(failures) == 40 and {f.stage for f in failures} == {"decode"}
    assert all("but the record says" in f.error for f in failures)
    assert len(probed) == 40 and all("Xing stream size off" in m for m in probed)
    assert {m.split(":")[0] for m in probed} == {f"probing {corpus / f'clip{i:02d}.mp3'}" for i in range(40)}
    assert len(featurized) == 40 and all("Xing stream size off" in m and ".mp3" in m for m in featurized)
    assert {m.split(" (path:")[0] for m in featurized} == {f"utterance {corpus / f'clip{i:02d}.mp3'}" for i in range(40)}


def test_decoder_stderr_capture_without_a_file_descriptor_2():
    """A worker started with stderr closed (``2>&-``) decodes as usual: nothing to capture."""
    code = ("from asr_assets.logs import native_stderr\n"
            "with native_stderr() as said:\n    pass\n"
            "print('captured', repr(said.text))\n")
    done = subprocess.run([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, timeout=120,
                          preexec_fn=lambda: os.close(2))
    assert done.returncode == 0 and done.stdout == "captured ''\n"
