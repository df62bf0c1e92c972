"""Segments of long recordings (LibriHeavy/GigaSpeech layout): manifest rows with ``offset``/``start``
and ``duration`` into a long file.

A 30-minute recording is built at test time from the in-repo real speech (every clip decoded,
resampled with soxr to 22.05 kHz mono, concatenated with a different gain per pass until 30 min)
and written as 16-bit FLAC with soundfile, and as FLAC in Matroska with PyAV (the PyAV seek path:
libsndfile cannot read Matroska). It is cut into 300 segments: the first and the last sample of the
file, 40 overlapping ones, offsets on and off the sample grid, 0.3 s to 15 s.

"The same samples cut out by hand", the reference every segment's features must equal exactly:
decode the *whole* file with the same decoder (``decode_audio``: libsndfile for the FLAC, PyAV for
the MKA), cut samples ``[round(offset * 22050), round(offset * 22050) + round(duration * 22050))``,
resample that cut with ``resample`` (soxr HQ, 22.05 -> 16 kHz) and run the frontend on it.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile as sf

from asr_assets.audio import DecodeConfig, SegmentReader, decode_audio, decode_segment, resample
from asr_assets.errors import AudioDecodeError
from asr_assets.feature_cache import ShardedParquetFeatureCache
from asr_assets.manifests import iter_manifest_rows
from asr_assets.pipeline import build_feature_shards, build_record_cache
from asr_assets.record_cache import RecordStore
from asr_assets.records import SPLITS, build_records
from asr_assets.settings import Settings

RATE = 22050
SECONDS = 30 * 60
N_SEGMENTS = 300


def _speech(test_data) -> np.ndarray:
    """Every real-speech clip of the in-repo data that libsndfile reads, at RATE, mono."""
    paths = sorted((test_data / "nl_cv" / "clips").glob("*.ogg"))
    paths += [test_data / "formats" / "audio" / "jfk__flac_16000_mono.flac",
              test_data / "broken" / "audio" / "arctic_a0007.wav", test_data / "broken" / "audio" / "arctic_a0009.wav"]
    clips = []
    for path in paths:
        samples, rate = decode_audio(path)
        clips.append(resample(samples, rate, RATE))
    return np.concatenate(clips)


@pytest.fixture(scope="module")
def recording(tmp_path_factory, test_data):
    """The 30-minute recording: FLAC (soundfile) and Matroska/FLAC (PyAV) of the same int16 samples."""
    import av

    root = tmp_path_factory.mktemp("long")
    speech = _speech(test_data)
    total = SECONDS * RATE
    passes = []
    k = 0
    while sum(map(len, passes)) < total:  # a different gain per pass: no two passes are alike
        passes.append(speech * (0.35 + 0.5 * ((k * 0.377) % 1.0)))
        k += 1
    pcm = np.clip(np.round(np.concatenate(passes)[:total] * 32767), -32768, 32767).astype(np.int16)
    flac = root / "audio" / "book.flac"
    flac.parent.mkdir()
    sf.write(flac, pcm, RATE, subtype="PCM_16")
    mka = root / "audio" / "book.mka"
    with av.open(str(mka), "w", format="matroska") as container:
        stream = container.add_stream("flac", rate=RATE, layout="mono")
        for i in range(0, total, 4096):
            frame = av.AudioFrame.from_ndarray(pcm[i:i + 4096].reshape(1, -1), format="s16", layout="mono")
            frame.sample_rate, frame.pts = RATE, i
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return root, flac, mka, total


def _segments(total: int) -> list[tuple[float, float]]:
    """300 (offset, duration) pairs: first, last, overlapping, varied; all inside the file."""
    rng = np.random.default_rng(20240610)
    length = total / RATE
    segments = [(0.0, 3.21), (length - 4.5, 4.5)]  # the file's first and last sample
    for _ in range(20):  # overlapping pairs: the second starts inside the first
        offset, duration = float(rng.uniform(1, length - 30)), float(rng.uniform(2, 8))
        segments += [(offset, duration), (offset + duration / 2, float(rng.uniform(1, 6)))]
    while len(segments) < N_SEGMENTS:
        duration = float(rng.uniform(10, 15)) if rng.random() < 0.04 else float(rng.uniform(0.3, 5))
        offset = float(rng.uniform(0, length - duration))
        if rng.random() < 0.5:  # LibriHeavy-style two decimals; else any float (off the sample grid)
            offset, duration = round(offset, 2), round(duration, 2)
        segments.append((offset, duration))
    return segments


def _by_hand(full: np.ndarray, offset: float, duration: float, frontend) -> np.ndarray:
    start, n = round(offset * RATE), round(duration * RATE)
    cut = full[start:start + n]
    return frontend(resample(cut, RATE, 16000, quality=DecodeConfig().resample_quality), 16000)


def _features(settings, frontend_name="squeezeformer") -> dict[str, np.ndarray]:
    found = {}
    for split in SPLITS:
        cache = ShardedParquetFeatureCache(settings.feature_split_root(split))
        for record in RecordStore(settings.record_cache_path(split)):
            feats = cache.load(record["utterance_id"], frontend=frontend_name)
            if feats is not None:
                found[record["utterance_id"]] = feats
    return found


class _CountingSoundFile:
    """Counts libsndfile opens and decoded frames of one file (the test's own meter, not the library's)."""

    def __init__(self, monkeypatch, path):
        self.opens, self.frames, path = 0, 0, str(path)
        init, read = sf.SoundFile.__init__, sf.SoundFile.read
        meter = self

        def counting_init(self, file, *args, **kwargs):
            init(self, file, *args, **kwargs)
            if str(file) == path:
                meter.opens += 1

        def counting_read(self, *args, **kwargs):
            out = read(self, *args, **kwargs)
            if str(self.name) == path:
                meter.frames += int(out.shape[0])
            return out

        monkeypatch.setattr(sf.SoundFile, "__init__", counting_init)
        monkeypatch.setattr(sf.SoundFile, "read", counting_read)


def test_300_segments_of_a_30_minute_flac_equal_the_samples_cut_by_hand(recording, tmp_path, monkeypatch):
    root, flac, _, total = recording
    segments = _segments(total)
    rows = [f"seg{i:04d}\taudio/{flac.name}\tsegment number {i}\t{o!r}\t{d!r}" for i, (o, d) in enumerate(segments)]
    length = total / RATE
    rows += [f"past_end\taudio/{flac.name}\tpast the end\t{length + 5.0!r}\t2.0",
             f"negative\taudio/{flac.name}\tnegative offset\t-1.5\t2.0",
             f"no_duration\taudio/{flac.name}\tno duration\t12.0\t",
             f"over_decode_cap\taudio/{flac.name}\tover the decode cap\t100.0\t25.0",
             f"over_record_cap\taudio/{flac.name}\tover the record cap\t200.0\t40.0"]
    manifest = root / "segments.tsv"
    manifest.write_text("id\tpath\tsentence\toffset\tduration\n" + "\n".join(rows) + "\n", encoding="utf-8")
    # In this process (workers=1, no time limit) so that the test's meter sees every libsndfile call.
    settings = Settings(manifests=(str(manifest),), output=str(tmp_path / "out"), workers=1,
                        utterance_timeout_s=None, max_decode_s=20.0)

    rejected = {}
    for split in SPLITS:
        result = build_record_cache(settings, split)
        rejected.update({r.utterance_id: r for r in result.rejections})
    # Manifest-row errors and the record cap (30 s), which is the segment's: 300 segments of an 1800 s file pass.
    assert set(rejected) == {"negative", "no_duration", "over_record_cap"}
    assert rejected["negative"].stage == "manifest" and "negative" in rejected["negative"].reason
    assert rejected["no_duration"].stage == "manifest" and "no positive duration" in rejected["no_duration"].reason
    assert rejected["over_record_cap"].stage == "filter" and "duration 40 s > max 30" in rejected["over_record_cap"].reason

    # The record cache carries the segment: upstream's six keys unchanged, two added, sidecars of the segment.
    records = {}
    for split in SPLITS:
        path = settings.record_cache_path(split)
        lines = path.read_bytes().splitlines()
        for line, record in zip(lines, RecordStore(path)):
            assert list(json.loads(line)) == ["audio_path", "audio_blob_path", "transcript", "utterance_id",
                                              "speaker_id", "has_speaker_id", "offset_seconds", "duration_seconds"]
            records[record["utterance_id"]] = record
    assert len(records) == N_SEGMENTS + 2  # + past_end, over_decode_cap
    for i, (offset, duration) in enumerate(segments):
        record = records[f"seg{i:04d}"]
        assert (record["offset_seconds"], record["duration_seconds"]) == (offset, duration)
        assert record["audio_path"] == str(flac) and record["audio_blob_path"] is None
        assert record["num_samples"] == max(1, round(duration * 16000))
        assert record["estimated_frames"] == max(record["num_samples"], 400) // 160 + 1

    meter = _CountingSoundFile(monkeypatch, flac)
    failures = {}
    for split in SPLITS:
        for stats in build_feature_shards(settings, "squeezeformer", split, range(settings.num_shards)).values():
            failures.update({f.utterance_id: f for f in stats.failures})
    monkeypatch.undo()

    # Per-row failures, not a crash: past the end of the file, and the decode cap (20 s) of the segment.
    assert set(failures) == {"past_end", "over_decode_cap"}
    assert failures["past_end"].stage == "decode" and "past the end of the file" in failures["past_end"].error
    assert "longer than max_duration_s=20.0" in failures["over_decode_cap"].error

    # One open per extraction run (one per split) for 300 segments, and only the segments' samples
    # decoded (plus at most 0.25 s read on instead of seeking, per segment): not 300 decodes from the start.
    wanted = sum(round(d * RATE) for _, d in segments)
    assert meter.opens == len(SPLITS)
    assert wanted <= meter.frames <= wanted + N_SEGMENTS * round(0.25 * RATE)
    assert meter.frames < 0.8 * total  # the file (30 min) was not even decoded once

    full, rate = decode_audio(flac)
    assert (rate, len(full)) == (RATE, total)
    frontend = settings.frontend("squeezeformer")
    got = _features(settings)
    assert len(got) == N_SEGMENTS
    for i, (offset, duration) in enumerate(segments):
        expected = _by_hand(full, offset, duration, frontend)
        np.testing.assert_array_equal(got[f"seg{i:04d}"], expected, err_msg=f"segment {i} ({offset}, {duration})")

    # The training reader's lazy mode decodes the same segments (the extractor's code path).
    from asr_assets.data import FeatureDataset

    dataset = FeatureDataset(settings.output, "train", mode="lazy")
    for index in range(0, len(dataset), 25):
        item = dataset[index]
        np.testing.assert_array_equal(item["features"].numpy(), got[item["utterance_id"]])

    # Upstream's warmer over the record cache (`asr-assets warm --input-record-cache`) decodes only the segments too.
    from asr_assets.extraction import ExtractionConfig
    from asr_assets.warm import iter_record_cache_batches, warm_feature_cache

    warmed = tmp_path / "warmed"
    summary = warm_feature_cache(iter_record_cache_batches(settings.record_cache_path("validation")), warmed, frontend,
                                 ExtractionConfig(workers=1, utterance_timeout_s=None))
    cache = ShardedParquetFeatureCache(warmed)
    ids = [r["utterance_id"] for r in RecordStore(settings.record_cache_path("validation")) if r["utterance_id"] in got]
    assert ids and summary.written == len(ids)
    for uid in ids:
        np.testing.assert_array_equal(cache.load(uid), got[uid])


def test_segments_through_pyav_and_worker_processes_equal_the_samples_cut_by_hand(recording, tmp_path):
    """Matroska/FLAC goes through PyAV (container.seek + trim by timestamps), in worker processes
    with the per-utterance time limit; lossless, so exact. Parquet manifest, ``start`` column."""
    root, flac, mka, total = recording
    segments = _segments(total)[::3]  # 100 of them: the first, overlapping pairs' halves, the rest
    table = pa.table({"utterance_id": [f"mka{i:04d}" for i in range(len(segments))],
                      "path": [str(mka)] * len(segments),
                      "text": [f"matroska segment {i}" for i in range(len(segments))],
                      "start": [o for o, _ in segments], "duration": [d for _, d in segments]})
    manifest = tmp_path / "manifest" / "segments.parquet"
    manifest.parent.mkdir()
    pq.write_table(table, manifest)
    settings = Settings(manifests=(str(manifest),), output=str(tmp_path / "out"), workers=2)
    failures = []
    for split in SPLITS:
        assert not [r for r in build_record_cache(settings, split).rejections]
        for stats in build_feature_shards(settings, "squeezeformer", split, range(settings.num_shards)).values():
            failures += stats.failures
    assert failures == []

    full, rate = decode_audio(mka)  # the same decoder as the segments (PyAV), whole file
    assert rate == RATE and np.array_equal(full, decode_audio(flac)[0])  # lossless: the FLAC's samples
    frontend = settings.frontend("squeezeformer")
    got = _features(settings)
    assert len(got) == len(segments)
    for i, (offset, duration) in enumerate(segments):
        np.testing.assert_array_equal(got[f"mka{i:04d}"], _by_hand(full, offset, duration, frontend),
                                      err_msg=f"segment {i} ({offset}, {duration})")


def test_segment_reader_seeks_reuses_and_refuses(recording):
    _, flac, mka, total = recording
    full, _ = decode_audio(flac)
    with SegmentReader(max_open=1) as reader:
        # Samples at the native rate, exactly the cut; files alternate, so with one slot each is reopened.
        for path in (flac, mka, flac):
            samples, rate = reader.decode(path, 1000.001, 2.5)
            start = round(1000.001 * RATE)
            assert rate == RATE and np.array_equal(samples, full[start:start + round(2.5 * RATE)])
        assert reader.stats["opens"] == 3
        # Consecutive segments read on without a seek.
        seeks = reader.stats["seeks"]
        for k in range(5):
            samples, _ = reader.decode(flac, 1002.501 + 2 * k, 2.0)
            start = round((1002.501 + 2 * k) * RATE)
            assert np.array_equal(samples, full[start:start + 2 * RATE])
        assert reader.stats["seeks"] == seeks and reader.stats["opens"] == 3
        # The end of the file: the last sample, a segment cut short, one past the end.
        samples, _ = reader.decode(flac, (total - 1) / RATE, 1.0)
        assert np.array_equal(samples, full[-1:])
        with pytest.raises(AudioDecodeError, match="past the end of the file"):
            reader.decode(flac, total / RATE + 0.5, 1.0)
        with pytest.raises(AudioDecodeError, match="past the end of the file"):
            reader.decode(mka, total / RATE + 0.5, 1.0)
        with pytest.raises(AudioDecodeError, match="offset must be a finite number of seconds >= 0"):
            reader.decode(flac, -0.5, 1.0)
        # The cap is the segment's: a 30 min file gives 10 s segments under a 20 s cap, not a 25 s one.
        capped = DecodeConfig(max_duration_s=20.0)
        assert len(reader.decode(flac, 500.0, 10.0, config=capped)[0]) == 10 * RATE
        with pytest.raises(AudioDecodeError, match="longer than max_duration_s=20.0"):
            reader.decode(flac, 500.0, 25.0, config=capped)
    with pytest.raises(AudioDecodeError, match="longer than max_duration_s"):
        decode_audio(flac, config=capped)  # the whole file is over it


def test_mp3_segments_seek_with_preroll(tmp_path, test_data):
    """MP3 (libsndfile/mpg123) needs the frames before a seek point: a 0.5 s pre-roll makes the segment
    the whole-file decode's to 1.2e-7 (float rounding; not bit-exact, 1/270 of a 16-bit step)."""
    speech = _speech(test_data)[: 120 * RATE]
    path = tmp_path / "two_minutes.mp3"
    sf.write(path, speech * 0.8, RATE, format="MP3", subtype="MPEG_LAYER_III")
    full, rate = decode_audio(path)
    assert rate == RATE
    rng = np.random.default_rng(7)
    worst, reader = 0.0, SegmentReader()
    for _ in range(40):
        offset, duration = float(rng.uniform(0, 110)), float(rng.uniform(0.5, 8))
        samples, _ = reader.decode(path, offset, duration)
        start, n = round(offset * RATE), round(duration * RATE)
        assert len(samples) == n
        worst = max(worst, float(np.abs(samples - full[start:start + n]).max()))
    reader.close()
    assert worst <= 2.5e-7
    # Without the pre-roll the bit reservoir is missing after a seek: visibly wrong samples.
    import asr_assets.audio as audio_module

    handle = audio_module._SoundfileHandle(str(path), ".mp3", audio_module._read_head(str(path)))
    try:
        handle.preroll = 0
        stats = {"seeks": 0, "frames_decoded": 0}
        errors = []
        for offset in (13.37, 41.0, 77.7, 99.9):
            start = round(offset * RATE)
            errors.append(float(np.abs(handle.read(start, RATE, stats) - full[start:start + RATE]).max()))
    finally:
        handle.close()
    assert max(errors) > 1e-3


def test_manifest_offset_columns_and_row_errors(tmp_path):
    audio = tmp_path / "a.flac"
    sf.write(audio, np.zeros(16000, dtype=np.float32), 16000)
    (tmp_path / "m.tsv").write_text(
        "id\tpath\tsentence\tstart\tduration\n"
        "whole\ta.flac\tno offset\t\t1.0\n"
        "seg\ta.flac\ta segment\t0.25\t0.5\n"
        "bad\ta.flac\tbad offset\tsoon\t0.5\n"
        "inf\ta.flac\tinfinite offset\tinf\t0.5\n", encoding="utf-8")
    rows = list(iter_manifest_rows([tmp_path / "m.tsv"]))
    assert [(r.offset_s, r.offset_error) for r in rows[:2]] == [(None, None), (0.25, None)]
    assert rows[2].offset_error == "unparseable offset 'soon'"
    out = {getattr(r, "utterance_id"): r for r in build_records(rows, splits=SPLITS)}
    assert out["whole"].offset_s is None and out["whole"].duration_s == 1.0  # today's meaning
    assert (out["seg"].offset_s, out["seg"].duration_s, out["seg"].num_samples) == (0.25, 0.5, 8000)
    assert out["bad"].stage == "manifest" and out["bad"].reason == "unparseable offset 'soon'"
    assert out["inf"].stage == "manifest" and "not finite" in out["inf"].reason
    samples, rate = decode_segment(audio, 0.25, 0.5)
    assert (len(samples), rate) == (8000, 16000)
