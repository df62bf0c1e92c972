"""The per-split summary (asr_assets.summary) on real speech, against an independent reading.

Covers: utterances, hours and speakers against the JSONL and sidecar files read here; computed
vs already cached after an incremental run; per-bin feature mean and std, merged from the shard
stats sidecars (no payload read by the summary), against every feature loaded with a spec-only
reader; compaction drops the per-bin entries of the parts it replaces and the report says what
is left out; the Markdown carries three PNG plots as data URIs that decode as images, the
same bytes whether this process or worker processes render them (this process draws them when a
worker dies).
"""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from asr_assets.feature_cache import ShardedParquetFeatureCache, compact_split, list_parts, shard_dir
from asr_assets.pipeline import build_feature_shards, build_record_cache, read_shard_stats, shard_stats_path
from asr_assets.settings import Settings, bundled_sample_manifests
from asr_assets.summary import summaries_markdown, summarize_split, summary_markdown

from .test_graph import independent_features

#: zipformer: un-normalized log-mel, so per-bin mean and std depend on which frames are counted
#: (squeezeformer standardizes each utterance: every subset has mean 0 and std 1)
ZIPFORMER_HASH = "4d9c4bc8f09a"


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def test_summary_matches_an_independent_reading(tmp_path, monkeypatch):
    hf, cv = (Path(p) for p in bundled_sample_manifests())
    shutil.copytree(hf, tmp_path / "hf")
    shutil.copytree(cv, tmp_path / "cv")
    first = Settings(manifests=(str(tmp_path / "hf"),), output=str(tmp_path / "out"), workers=1,
                     frontends=("zipformer",))
    build_record_cache(first, "train")
    build_feature_shards(first, "zipformer", "train", range(64))
    before = {r["utterance_id"] for r in _records(first.record_cache_path("train"))}
    settings = first.with_(manifests=(str(tmp_path / "hf"), str(tmp_path / "cv")))  # a second drop
    build_record_cache(settings, "train")
    build_feature_shards(settings, "zipformer", "train", range(64))

    def refuse(*args):
        raise AssertionError("the summary read a feature payload")

    monkeypatch.setattr(ShardedParquetFeatureCache, "_payloads", refuse)
    summary = summarize_split(settings, "train")
    monkeypatch.undo()

    path = settings.record_cache_path("train")
    records = _records(path)
    samples = np.fromfile(path.with_name(path.name + ".num_samples.u64"), dtype="<u8")
    assert summary.utterances == len(records) == len(samples) > len(before) > 0
    assert abs(summary.audio_seconds - samples.sum() / 16000) < 1e-9
    assert summary.speakers == len({r["speaker_id"] for r in records if r["has_speaker_id"]})
    (features,) = summary.features
    assert features.with_features == features.records == len(records) and features.failures == 0
    assert before <= {r["utterance_id"] for r in records}
    assert (features.computed, features.already_cached) == (len(records) - len(before), len(before))
    assert features.xrt_per_core > 0 and features.xrt_wall > 0

    root = settings.feature_split_root("train")
    every = np.concatenate([independent_features(root, r["utterance_id"], ZIPFORMER_HASH) for r in records]).astype(np.float64)
    assert (features.moments_utterances, features.moments_frames) == (len(records), len(every))
    np.testing.assert_allclose(features.mean, every.mean(axis=0), rtol=2e-5, atol=1e-5)  # float32 sums within an utterance
    np.testing.assert_allclose(features.std, every.std(axis=0), rtol=2e-5, atol=1e-5)  # float32 sums within an utterance

    # compaction rewrites the shards with two parts: their per-bin entries no longer apply
    multi = {shard for shard in range(64) if len(list_parts(shard_dir(root, shard))) > 1}
    assert multi
    cache = ShardedParquetFeatureCache(root)
    untouched = [r for r in records if cache.key(r["utterance_id"], ZIPFORMER_HASH) in
                 {k for s in set(range(64)) - multi for k in cache.shard_entries(s)}]
    assert 0 < len(untouched) < len(records)
    compact_split(root)
    after = summarize_split(settings, "train").features[0]
    assert after.with_features == len(records) and after.moments_utterances == len(untouched)
    kept = np.concatenate([independent_features(root, r["utterance_id"], ZIPFORMER_HASH) for r in untouched]).astype(np.float64)
    np.testing.assert_allclose(after.mean, kept.mean(axis=0), rtol=2e-5, atol=1e-5)  # float32 sums within an utterance
    summary.features = [after]
    markdown = summary_markdown(summary)
    assert f"leave out {len(records) - len(untouched)} utterances" in markdown


def test_markdown_has_the_numbers_and_three_png_plots(tmp_path):
    settings = Settings(manifests=tuple(bundled_sample_manifests()), output=str(tmp_path / "out"), workers=1)
    build_record_cache(settings, "train")
    build_feature_shards(settings, "squeezeformer", "train", range(64))
    summary = summarize_split(settings, "train")
    markdown = summary_markdown(summary)
    assert markdown.startswith(f"### train: {summary.utterances} utterances, {summary.audio_hours:.3f} h, "
                               f"{summary.speakers} speakers")
    assert f"| with features | {summary.utterances} of {summary.utterances} |" in markdown
    images = re.findall(r"!\[([^\]]+)\]\(data:image/png;base64,([A-Za-z0-9+/=]+)\)", markdown)
    assert [alt for alt, _ in images] == ["train durations", "train frames per utterance",
                                          "squeezeformer per-bin mean and std"]
    for _, data in images:
        image = Image.open(io.BytesIO(base64.b64decode(data)))
        assert image.format == "PNG" and 400 <= image.width <= 700 and 150 <= image.height <= 300
        colours = np.unique(np.asarray(image.convert("RGB")).reshape(-1, 3), axis=0)
        assert len(colours) > 10  # drawn, not a blank canvas
    assert "data:image" not in summary_markdown(summary, plots=False)
    # squeezeformer standardizes each utterance: the plot is flat by construction, and says so
    (features,) = summary.features
    assert np.abs(features.mean).max() < 1e-3 and np.abs(features.std - 1).max() < 1e-3
    assert "`squeezeformer` standardizes every bin" in markdown
    features.mean = features.mean + 0.5  # un-normalized log-mel (zipformer) gets no such note
    assert "standardizes every bin" not in summary_markdown(summary)


def test_summaries_rendered_by_worker_processes_are_the_same_bytes(tmp_path):
    """summaries_markdown with workers renders each split in a forkserver child: the Markdown,
    PNG bytes included, is exactly what this process renders, in the splits' order."""
    settings = Settings(manifests=tuple(bundled_sample_manifests()), output=str(tmp_path / "out"), workers=1)
    summaries = []
    for split in ("train", "validation"):
        build_record_cache(settings, split)
        build_feature_shards(settings, "squeezeformer", split, range(64))
        summaries.append(summarize_split(settings, split))
    here = [summary_markdown(s) for s in summaries]
    assert [m.splitlines()[0].split(":")[0] for m in here] == ["### train", "### validation"]
    assert here[0] != here[1] and all(m.count("data:image/png;base64,") == 3 for m in here)
    assert summaries_markdown(summaries, workers=2) == here
    assert summaries_markdown(summaries, workers=1) == here


def _die_in_a_worker():
    """Unpickled in a pool process: kills it, as the OOM killer would."""
    import os
    import signal

    os.kill(os.getpid(), signal.SIGKILL)


def test_summaries_are_drawn_here_when_a_worker_process_dies(tmp_path, caplog):
    from asr_assets.summary import SplitSummary

    class KillsItsWorker(SplitSummary):
        def __reduce__(self):  # what a pool process gets: a call that kills it
            return (_die_in_a_worker, ())

    settings = Settings(manifests=tuple(bundled_sample_manifests()), output=str(tmp_path / "out"), workers=1)
    summaries = []
    for split in ("train", "validation"):
        build_record_cache(settings, split)
        summaries.append(summarize_split(settings, split))
    here = [summary_markdown(s) for s in summaries]
    doomed = object.__new__(KillsItsWorker)
    doomed.__dict__.update(summaries[1].__dict__)
    with caplog.at_level("WARNING", logger="asr_assets.summary"):
        assert summaries_markdown([summaries[0], doomed], workers=2) == here
    assert "summary plots: worker processes failed (BrokenProcessPool" in caplog.text


def test_summary_imports_neither_dagster_nor_matplotlib():
    code = ("import sys, asr_assets.summary; "
            "print(sorted(m for m in ('dagster', 'matplotlib') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "[]"  # matplotlib loads when a plot is drawn


def test_parts_are_synced_and_a_stats_sidecar_left_short_counts_as_absent(tmp_path, monkeypatch):
    """Parts are fsynced before their rename; a shard's stats sidecar is not (a summary of the
    parts): one a power loss left empty or cut reads as absent, and the summary covers the other
    shards' utterances and says how many it covers."""
    import os

    settings = Settings(manifests=tuple(bundled_sample_manifests()), output=str(tmp_path / "out"), workers=1,
                        frontends=("zipformer",))
    build_record_cache(settings, "train")
    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd):
        synced.append(os.path.basename(os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    stats = build_feature_shards(settings, "zipformer", "train", range(64))
    monkeypatch.undo()
    written = [name for s in stats.values() for name in s.part_names]
    assert written and sorted(n.split(".tmp.")[0].lstrip(".") for n in synced if n.startswith(".part_")) == sorted(written)
    assert not [n for n in synced if ".stats-" in n or "asr_assets_index" in n], synced

    root = settings.feature_split_root("train")
    whole = summarize_split(settings, "train").features[0]
    busy = sorted(shard for shard, s in stats.items() if s.computed)
    cut, emptied = busy[0], busy[1]
    for shard, keep in ((cut, 0.5), (emptied, 0.0)):
        path = shard_stats_path(root, shard, ZIPFORMER_HASH)
        data = path.read_bytes()
        path.write_bytes(data[:int(len(data) * keep)])
        assert read_shard_stats(root, shard, ZIPFORMER_HASH) is None
    partial = summarize_split(settings, "train").features[0]
    lost = stats[cut].computed + stats[emptied].computed
    assert partial.with_features == whole.with_features == whole.records
    assert partial.moments_utterances == whole.moments_utterances - lost
    assert "Per-bin stats leave out" in summary_markdown(summarize_split(settings, "train"))
