"""Record cache: the upstream record-cache vector (spec §1.8), sidecar layout and sizes, blob naming
and preservation, atomic writes, RecordStore reading and the validity rule (spec §1.2–1.5)."""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import soundfile as sf

from asr_assets.pipeline import build_record_cache
from asr_assets.record_cache import SIDECARS, RecordStore, record_store_is_valid, sidecar_path, write_blob
from asr_assets.settings import Settings


def _wav(path, seconds=1.0, rate=16000):
    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(seconds * rate)) / rate
    sf.write(path, (0.1 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), rate)


def test_upstream_record_cache_vector(tmp_path):
    """tests/test_rust_feature_extension.py::test_rust_record_cache_subcommand_matches_python_store."""
    train, val = tmp_path / "train", tmp_path / "val"
    for d in (train, val):
        _wav(d / "audio" / "a.wav")
        _wav(d / "audio" / "b.wav")
    (train / "train.tsv").write_text(
        "id\tpath\tsentence\tduration\tclient_id\n"
        "utt1\taudio/a.wav\tПривіт , світе!\t1.0\tspk1\n"
        "utt2\taudio/b.wav\tДругий запис\t1.5\tspk2\n", encoding="utf-8")
    (val / "val.tsv").write_text(
        "id\tpath\tsentence\tduration\tclient_id\nval1\taudio/a.wav\tПеревірка\t2.0\tspk3\n", encoding="utf-8")
    settings = Settings(manifests=(str(train),), validation_manifests=(str(val),), output=str(tmp_path / "out"))
    for split in ("train", "validation", "test"):
        build_record_cache(settings, split)
    store = RecordStore(settings.record_cache_path("train"))
    validation = RecordStore(settings.record_cache_path("validation"))
    assert (len(store), len(validation), len(RecordStore(settings.record_cache_path("test")))) == (2, 1, 0)
    first = store[0]
    assert first["transcript"] == "Привіт, світе!"
    assert first["utterance_id"] == "utt1"
    assert (first["estimated_frames"], first["num_samples"], first["sample_rate"]) == (101, 16000, 16000)
    assert first["transcript_length"] == len("Привіт, світе!") and first["token_length"] == 0
    assert store[1]["num_samples"] == 24000 and store[1]["estimated_frames"] == 151
    for path, n in ((settings.record_cache_path("train"), 2), (settings.record_cache_path("validation"), 1)):
        for suffix, dtype in SIDECARS.items():
            assert sidecar_path(path, suffix).stat().st_size == n * np.dtype(dtype).itemsize
        assert record_store_is_valid(path)
    # Python json.dumps layout, key order, non-ASCII unescaped
    line = settings.record_cache_path("train").read_text(encoding="utf-8").splitlines()[0]
    assert line.startswith('{"audio_path": "') and '"transcript": "Привіт, світе!"' in line
    assert list(json.loads(line)) == ["audio_path", "audio_blob_path", "transcript", "utterance_id", "speaker_id", "has_speaker_id"]
    offsets = np.fromfile(sidecar_path(settings.record_cache_path("train"), ".offsets.u64"), dtype="<u8")
    raw = settings.record_cache_path("train").read_bytes()
    assert offsets[0] == 0 and raw[offsets[1] - 1:offsets[1]] == b"\n"
    # no temporary file is left behind
    assert not [p for p in (tmp_path / "out" / "record_cache").iterdir() if ".tmp." in p.name]


def test_blob_name_and_preservation(tmp_path):
    assert write_blob(tmp_path / "train.jsonl", b"abc") == \
        "train_audio_blobs/ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad.bin"
    # embedded bytes are kept when no readable local file exists at audio.path; not when one does
    _wav(tmp_path / "src" / "here.wav")
    buf = (tmp_path / "src" / "here.wav").read_bytes()
    pq.write_table(pa.table({
        "id": ["a", "b"], "text": ["one", "two"], "duration": [1.0, 1.0], "speaker_id": ["spk0", "spk0"],
        "audio": [{"bytes": buf, "path": "here.wav"}, {"bytes": buf[:-2] + b"\0\0", "path": "gone.wav"}],
    }), tmp_path / "src" / "m.parquet")
    settings = Settings(manifests=(str(tmp_path / "src" / "m.parquet"),), output=str(tmp_path / "out"))
    build_record_cache(settings, "train")
    store = RecordStore(settings.record_cache_path("train"))
    a, b = store[0], store[1]
    assert a["audio_blob_path"] is None and a["audio_path"] == str(tmp_path / "src" / "here.wav")
    digest = hashlib.sha256(buf[:-2] + b"\0\0").hexdigest()
    assert b["audio_blob_path"] == f"train_audio_blobs/{digest}.bin"
    assert open(b["audio_blob_abspath"], "rb").read() == buf[:-2] + b"\0\0"
    assert b["audio_path"] == str(tmp_path / "src" / "gone.wav")


def test_validity_rule(tmp_path):
    _wav(tmp_path / "a.wav")
    (tmp_path / "m.tsv").write_text("id\tpath\tsentence\tduration\tclient_id\nu\ta.wav\thi\t1.0\tspk0\n", encoding="utf-8")
    settings = Settings(manifests=(str(tmp_path / "m.tsv"),), output=str(tmp_path / "out"))
    build_record_cache(settings, "train")
    path = settings.record_cache_path("train")
    assert record_store_is_valid(path)
    frames = sidecar_path(path, ".estimated_frames.u32")
    frames.write_bytes(frames.read_bytes()[:3])  # misaligned
    assert not record_store_is_valid(path)
    build_record_cache(settings, "train")  # rebuild repairs it
    assert record_store_is_valid(path)
    os.remove(sidecar_path(path, ".offsets.u64"))
    assert not record_store_is_valid(path)
