"""Manifests and records: discovery (recursive, sorted, TSV wins), column aliases, HF audio structs,
path resolution per root / source_base, transcript normalization, filters, split scores (spec §1.6–1.8, §2)."""

from __future__ import annotations

import shutil
import unicodedata

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from asr_assets.errors import ConfigError, ManifestError
from asr_assets.manifests import discover_manifests, iter_manifest_rows
from asr_assets.records import Record, RecordConfig, Rejection, assign_split, build_records, normalize_transcript, split_score


def _tsv(path, header, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\t".join(header) + "\n" + "".join("\t".join(r) + "\n" for r in rows), encoding="utf-8")


def test_split_scores_match_spec_vectors():
    # spec §1.8 derived vectors, seed 13
    assert split_score("spk0") == pytest.approx(0.474702, abs=1e-6)
    assert split_score("spk7") == pytest.approx(0.842525, abs=1e-6)
    assert split_score("spk12") == pytest.approx(0.800793, abs=1e-6)
    assert split_score("spk19") == pytest.approx(0.969814, abs=1e-6)
    assert split_score("utt2") == pytest.approx(0.793731, abs=1e-6)
    assert [assign_split(k) for k in ("spk0", "spk7", "spk12", "spk19", "utt2")] == [
        "train", "validation", "validation", "test", "train"]


@pytest.mark.parametrize("raw, expected", [
    ("Привіт , світе!", "Привіт, світе!"),
    ("  It’s   a `test` ʼok ", "It's a 'test' 'ok"),
    ("«quoted» “twice” ; end ?", '"quoted" "twice"; end?'),
    ("Case Kept", "Case Kept"),
])
def test_normalize_transcript(raw, expected):
    assert normalize_transcript(raw) == expected


def test_lowercase_option():
    assert normalize_transcript("ABC Def", lowercase=True) == "abc def"


def test_record_frames_from_duration():
    rec = Record("u", "train", "x", None, b"x", None, 1.0, "s")
    assert (rec.num_samples, rec.estimated_frames) == (16000, 101)
    assert Record("u", "train", "x", None, b"x", None, 0.2, "s").estimated_frames == 21  # 3200 samples
    assert Record("u", "train", "x", None, b"x", None, 1e-9, "s").num_samples == 1


def test_discovery_tsv_wins_recursive_sorted(tmp_path):
    _tsv(tmp_path / "b" / "z.tsv", ["path", "sentence"], [])
    _tsv(tmp_path / "a.tsv", ["path", "sentence"], [])
    pq.write_table(pa.table({"path": ["x"]}), tmp_path / "c.parquet")
    assert discover_manifests(tmp_path) == [tmp_path / "a.tsv", tmp_path / "b" / "z.tsv"]
    only_parquet = tmp_path / "p"
    only_parquet.mkdir()
    pq.write_table(pa.table({"path": ["x"]}), only_parquet / "2.parquet")
    pq.write_table(pa.table({"path": ["x"]}), only_parquet / "1.parquet")
    assert [p.name for p in discover_manifests(only_parquet)] == ["1.parquet", "2.parquet"]
    with pytest.raises(ManifestError, match="does not exist"):
        discover_manifests(tmp_path / "missing")


def test_rows_resolve_paths_per_root_and_source_base(tmp_path):
    _tsv(tmp_path / "r1" / "sub" / "m.tsv", ["id", "path", "text", "duration_seconds", "speaker"],
         [["u1", "clips/a.wav", "hello", "1.5", "s1"]])
    pq.write_table(pa.table({
        "utterance_id": ["u2"], "audio": [{"bytes": b"RIFF", "path": "b.wav"}], "transcription": ["hi"],
        "audio_duration": [2.0], "client_id": [None], "speaker_id": ["spk"]}), tmp_path / "r2.parquet")
    rows = list(iter_manifest_rows([tmp_path / "r1", tmp_path / "r2.parquet"]))
    assert rows[0].audio_path == str(tmp_path / "r1" / "clips" / "a.wav")  # against the folder root
    assert (rows[0].utterance_id, rows[0].transcript, rows[0].duration_s, rows[0].speaker_id) == ("u1", "hello", 1.5, "s1")
    assert rows[1].audio_path == str(tmp_path / "b.wav") and rows[1].audio_bytes == b"RIFF"  # file's parent
    assert rows[1].speaker_id == "spk" and rows[1].utterance_id == "u2"
    based = list(iter_manifest_rows([tmp_path / "r1"], source_base=tmp_path / "base"))
    assert based[0].audio_path == str(tmp_path / "base" / "clips" / "a.wav")


def test_top_level_path_wins_over_struct_bytes(tmp_path):
    pq.write_table(pa.table({"path": ["x.wav"], "audio": [{"bytes": b"abc", "path": "y.wav"}], "text": ["t"]}),
                   tmp_path / "m.parquet")
    (row,) = iter_manifest_rows([tmp_path / "m.parquet"])
    assert row.audio_path == str(tmp_path / "x.wav") and row.audio_bytes is None


def test_filters_in_order_and_every_row_accounted(tmp_path):
    audio = tmp_path / "a.wav"
    audio.write_bytes(b"present")
    rows = [
        ["u1", "a.wav", "Привіт , світе!", "1.0", "spk0"],
        ["u2", "a.wav", "", "1.0", "spk0"],            # no transcript
        ["u3", "missing.wav", "text", "1.0", "spk0"],  # file not found
        ["u4", "a.wav", "text", "31", "spk0"],         # too long
        ["u5", "a.wav", "!!!???", "1.0", "spk0"],      # symbol ratio
        ["u6", "a.wav", "text", "abc", "spk0"],        # bad duration
        ["u1", "a.wav", "again", "1.0", "spk0"],       # duplicate id
        ["u7", "a.wav", "x" * 401, "1.0", "spk0"],     # transcript too long
    ]
    _tsv(tmp_path / "m.tsv", ["id", "path", "sentence", "duration", "client_id"], rows)
    out = list(build_records(iter_manifest_rows([tmp_path / "m.tsv"]), RecordConfig()))
    assert len(out) == len(rows)  # spk0 -> train: every row yields one item
    assert isinstance(out[0], Record) and out[0].transcript == "Привіт, світе!"
    reasons = [o.reason for o in out[1:]]
    assert all(isinstance(o, Rejection) for o in out[1:])
    assert reasons[0] == "no transcript"
    assert reasons[1].startswith("audio file not found")
    assert reasons[2].startswith("duration 31 s > max")
    assert reasons[3].startswith("symbol ratio")
    assert reasons[4] == "unparseable duration 'abc'"
    assert reasons[5] == "duplicate utterance_id 'u1'"
    assert reasons[6].startswith("transcript length 401")


def test_missing_or_zero_duration_is_probed(tmp_path):
    (tmp_path / "a.wav").write_bytes(b"x")
    (tmp_path / "b.wav").write_bytes(b"x")
    _tsv(tmp_path / "m.tsv", ["path", "sentence", "duration"], [["a.wav", "one", ""], ["b.wav", "two", "0.000"]])
    probed = []

    def probe(row):
        probed.append(row.transcript)
        return 2.5

    out = list(build_records(iter_manifest_rows([tmp_path / "m.tsv"]), RecordConfig(val_fraction=0, test_fraction=0),
                             probe_duration=probe))
    assert probed == ["one", "two"]
    assert [o.duration_s for o in out] == [2.5, 2.5]
    # no id column: the resolved path is the utterance id (upstream)
    assert [o.utterance_id for o in out] == [str(tmp_path / "a.wav"), str(tmp_path / "b.wav")]
    failing = list(build_records(iter_manifest_rows([tmp_path / "m.tsv"]), RecordConfig(val_fraction=0, test_fraction=0),
                                 probe_duration=lambda row: 1 / 0))
    assert [(o.stage, o.reason) for o in failing] == [("probe", "cannot read duration from audio header: division by zero")] * 2


def test_config_validation():
    with pytest.raises(ConfigError):
        RecordConfig(val_fraction=0.6, test_fraction=0.4)
    with pytest.raises(ConfigError):
        RecordConfig(min_transcript_chars=0)


def test_probed_durations_are_remembered_across_builds(test_data, tmp_path, monkeypatch):
    import asr_assets.pipeline as pipeline
    from asr_assets.pipeline import build_record_cache
    from asr_assets.record_cache import RecordStore
    from asr_assets.settings import Settings

    root = tmp_path / "cv"
    (root / "clips").mkdir(parents=True)
    lines = (test_data / "nl_cv" / "validated.tsv").read_text(encoding="utf-8").splitlines()[:6]
    for line in lines[1:]:
        name = line.split("\t")[1]
        (root / name).write_bytes((test_data / "nl_cv" / name).read_bytes())
    (root / "validated.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    settings = Settings(manifests=(str(root),), output=str(tmp_path / "out"), validation_manifests=())
    calls = []
    real = pipeline.probe_duration
    monkeypatch.setattr(pipeline, "probe_duration", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    first = {s: len(RecordStore(build_record_cache(settings, s).summary.path)) for s in ("train", "validation", "test")}
    assert sum(first.values()) == 5 and len(calls) == 5  # each clip probed once, by its own split
    durations = [r["num_samples"] for s in ("train", "validation", "test") for r in RecordStore(settings.record_cache_path(s))]
    assert all(16000 < n < 16000 * 30 for n in durations)
    calls.clear()
    for s in ("train", "validation", "test"):
        build_record_cache(settings, s)  # a rebuild (e.g. after a manifest drop) probes nothing again
    assert calls == []
    assert [r["num_samples"] for s in ("train", "validation", "test") for r in RecordStore(settings.record_cache_path(s))] == durations


def test_ragged_tsv_rows_are_skipped_and_reported(tmp_path):
    (tmp_path / "a.wav").write_bytes(b"x")
    (tmp_path / "m.tsv").write_text(
        "id\tpath\tsentence\tduration\n"
        "u1\ta.wav\tfine\t1.0\n"
        "u2\ta.wav\ttoo\tmany\tcells\n"
        "u3\ta.wav\n"
        "u4\ta.wav\talso fine\t2.0\n", encoding="utf-8")
    errors = []
    rows = list(iter_manifest_rows([tmp_path / "m.tsv"], on_error=lambda m, n, e: errors.append(str(e))))
    assert [r.utterance_id for r in rows] == ["u1", "u4"]
    assert errors == ["line 3 skipped: expected 4 cells, got 5: 'u2\\ta.wav\\ttoo\\tmany\\tcells'",
                      "line 4 skipped: expected 4 cells, got 2: 'u3\\ta.wav'"]
    with pytest.raises(ManifestError):
        list(iter_manifest_rows([tmp_path / "m.tsv"]))


def test_unchanged_inputs_rewrite_nothing_and_changes_rebuild(tmp_path, monkeypatch):
    """A split whose manifests (stat fingerprint), record settings and code version are those of
    its last build is reported up to date without reading a manifest or writing a file."""
    import shutil

    from asr_assets import pipeline
    from asr_assets.pipeline import build_record_cache
    from asr_assets.settings import Settings, bundled_sample_manifests

    src = bundled_sample_manifests()[1]
    shutil.copytree(src, tmp_path / "cv")
    settings = Settings(manifests=(str(tmp_path / "cv"),), output=str(tmp_path / "out"))
    first = build_record_cache(settings, "train")
    assert not first.up_to_date and first.summary.utterances > 0
    files = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in (tmp_path / "out").rglob("*") if p.is_file()}
    monkeypatch.setattr(pipeline, "read_ahead_manifest_batches", lambda *a, **k: (_ for _ in ()).throw(AssertionError("read")))
    again = build_record_cache(settings, "train")
    assert again.up_to_date and again.summary.sha256 == first.summary.sha256
    assert again.summary.utterances == first.summary.utterances
    assert sum(again.summary.duration_counts) == first.summary.utterances
    assert again.summary.duration_counts == first.summary.duration_counts
    assert [r.to_report() for r in again.rejections] == [r.to_report() for r in first.rejections]
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in files} == files  # nothing rewritten
    monkeypatch.undo()
    # a changed manifest, a changed record setting, a new code version: rebuilt
    manifest = tmp_path / "cv" / "manifest.tsv"
    manifest.write_text(manifest.read_text(encoding="utf-8").rsplit("\n", 2)[0] + "\n", encoding="utf-8")
    dropped = build_record_cache(settings, "train")
    assert not dropped.up_to_date and dropped.summary.utterances <= first.summary.utterances
    assert build_record_cache(settings, "train").up_to_date
    assert not build_record_cache(settings.with_(require_readable_audio=False), "train").up_to_date
    monkeypatch.setattr(pipeline, "RECORD_CACHE_CODE_VERSION", "test-bump")
    assert not build_record_cache(settings, "train").up_to_date
    # a damaged JSONL is never reported up to date
    jsonl = settings.record_cache_path("train")
    jsonl.write_bytes(jsonl.read_bytes()[:-5])
    assert not build_record_cache(settings, "train").up_to_date


def test_common_voice_layout_with_bare_clip_names_says_how_to_fix_it(tmp_path):
    """Common Voice's own TSVs name bare files that live in ``clips/``; relative paths resolve
    against the manifest's folder (spec §2.3), so those rows are not found. The reason says
    where the file is and the fix; with ``source_base`` = ``clips/`` every row is cached."""
    from asr_assets.pipeline import build_record_caches
    from asr_assets.settings import SPLITS, Settings, bundled_sample_manifests

    corpus = tmp_path / "cv"
    shutil.copytree(bundled_sample_manifests()[1], corpus)
    manifest = corpus / "manifest.tsv"
    manifest.write_text(manifest.read_text(encoding="utf-8").replace("\tclips/", "\t"), encoding="utf-8")
    results = build_record_caches(Settings(manifests=(str(corpus),), output=str(tmp_path / "a")), SPLITS)
    reasons = [r.reason for res in results.values() for r in res.rejections]
    assert sum(res.summary.utterances for res in results.values()) == 0 and len(reasons) == 8
    clips = corpus / "clips"
    names = sorted(p.name for p in clips.iterdir())
    assert sorted(reasons) == sorted(f"audio file not found: {corpus / name} (a file of that name is in {clips}/, "
                                     f"Common Voice's layout: pass --source-base {clips} (Settings.source_base))"
                                     for name in names)
    fixed = build_record_caches(Settings(manifests=(str(corpus),), output=str(tmp_path / "b"), source_base=str(clips)),
                                SPLITS)
    assert sum(res.summary.utterances for res in fixed.values()) == 8


def test_path_in_the_other_unicode_normalization_is_named(tmp_path):
    """A manifest in NFC naming a file stored in NFD (copied from macOS) is "not found", as
    upstream (paths are never normalized); the reason names the form that is on disk."""
    from asr_assets.pipeline import build_record_caches
    from asr_assets.settings import SPLITS, Settings, bundled_sample_manifests

    corpus = tmp_path / "cv"
    shutil.copytree(bundled_sample_manifests()[1], corpus)
    manifest = corpus / "manifest.tsv"
    text = manifest.read_text(encoding="utf-8")
    first = next(p for p in sorted((corpus / "clips").iterdir()) if f"clips/{p.name}" in text)
    nfc = "caf\u00e9_" + first.name  # 'é' as one code point; on disk as e + U+0301
    first.rename(first.with_name(unicodedata.normalize("NFD", nfc)))
    manifest.write_text(text.replace(f"clips/{first.name}", f"clips/{nfc}"), encoding="utf-8")
    results = build_record_caches(Settings(manifests=(str(corpus),), output=str(tmp_path / "a")), SPLITS)
    reasons = [r.reason for res in results.values() for r in res.rejections]
    on_disk = str(corpus / "clips" / unicodedata.normalize("NFD", nfc))
    assert reasons == [f"audio file not found: {corpus / 'clips' / nfc} (the path exists in Unicode NFD form: "
                       f"{on_disk!r}; the manifest's is {str(corpus / 'clips' / nfc)!r}: write the manifest's "
                       "paths in the form the file system has)"]
    assert sum(res.summary.utterances for res in results.values()) == 7
