"""The streaming record-cache build (one pass, batches, vectorized filters) against the per-row
reference (``reference_record_cache.py``: the implementation before it): the same bytes in every
JSONL, sidecar, blob and report, on the in-repo manifests, the hostile ones and generated
adversarial rows (unicode, punctuation, every whitespace character, digits, empty and very long
transcripts, odd durations, ids, paths, quotes, line endings, bad UTF-8, ragged lines), with
batches and read blocks small enough to cut through everything."""

from __future__ import annotations

import functools
import hashlib
import math
import os
import random
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from asr_assets import manifest_batches, manifests, pipeline
from asr_assets.errors import ManifestError
from asr_assets.manifest_batches import ManifestBatch, ManifestProblem, iter_manifest_batches, read_ahead_manifest_batches
from asr_assets.manifests import iter_manifest_rows
from asr_assets.pipeline import DurationProbe, build_record_caches
from asr_assets.record_batches import DigestClaims, filter_reason, normalize_and_count
from asr_assets.records import RecordConfig, _filter, normalize_transcript, symbol_ratio
from asr_assets.settings import SPLITS, Settings, bundled_sample_manifests
from asr_assets_tests.reference_record_cache import build_record_cache_reference

WHITESPACE = "".join(c for c in map(chr, range(0x3001)) if c.isspace())
#: Characters where Python and the usual regex/Unicode notions tend to differ, plus the ones the
#: normalization maps.
TRICKY = ("’`ʼ“”«»,.;:!?'-\"\\/_()[]{}<>@#$%^&*+=|~\t\x00\x01\x7f\x85\xa0\u200b\u2028\u2029\ufeff"
          "0123456789١٢٣߀²³½Ⅻ〇一二ा्ंः़\u0301éÉßİıΣσςǅ東京Привіт😀🇳🇱")


def _adversarial_transcripts(rng: random.Random, n: int) -> list[str]:
    pool = WHITESPACE + TRICKY + "abcdefghij ABC xyz"
    out = ["", " ", "\u3000", "a", "1", "?", "a ,b", "a , , b", " x  .  y ! ", "'-'", "a" * 401, "a" * 400,
           "😀" * 3, "!!! a", "a\u00a0\u00a0!", "Hello \u2028 , world", "x\x1c\x1d\x1e\x1f?"]
    for _ in range(n):
        k = rng.choice([1, 2, 5, 20, 80, 500])
        out.append("".join(rng.choice(pool) for _ in range(k)))
    return out


def test_normalization_and_filters_match_the_reference_on_adversarial_text():
    rng = random.Random(7)
    texts = _adversarial_transcripts(rng, 4000) + ["".join(map(chr, range(0x20, 0x3000)))]
    for lowercase in (False, True):
        got, counts = normalize_and_count(texts, lowercase=lowercase)
        assert got == [normalize_transcript(t, lowercase=lowercase) for t in texts]
        config = RecordConfig(max_chars_per_second=40, min_words_per_second=0.2, max_duration_per_char=0.5,
                              min_duration_per_word=0.01)
        for k, text in enumerate(got):
            if not text:
                continue
            assert counts["symbols"][k] / len(text) == symbol_ratio(text)
            assert counts["words"][k] == len(text.split())
            for duration in (0.005, 0.5, 3.0, 29.9, 31.0):
                assert filter_reason(int(counts["chars"][k]), int(counts["symbols"][k]), int(counts["alnum"][k]),
                                     int(counts["nonspace"][k]), int(counts["words"][k]), duration, config) \
                    == _filter(text, duration, config), (text, duration)


def test_digest_claims_first_row_wins_across_batches():
    rng = random.Random(3)
    keys = [f"id{rng.randrange(3000)}" for _ in range(20000)]
    claims, first, expected, got = DigestClaims(), {}, [], []
    for start in range(0, len(keys), 997):  # many batches: runs are merged on the way
        chunk = keys[start:start + 997]
        rows = list(range(start + 1, start + 1 + len(chunk)))
        splits = [SPLITS[r % 3] for r in rows]
        got += claims.claim(chunk, f"m{start // 5000}.tsv", rows, [r + 1 for r in rows], splits)
        for key, row, split in zip(chunk, rows, splits):
            if key in first:
                expected.append(first[key])
            else:
                first[key] = {"manifest": f"m{start // 5000}.tsv", "row": row, "line": row + 1, "split": split}
                expected.append(None)
    assert got == expected and claims.count == len(first)
    assert len(claims.runs) < 12  # merged, not one run per batch
    assert sum(high.nbytes + ordinals.nbytes for high, ordinals in claims.runs) == 12 * claims.count  # in memory
    assert claims.TABLE.itemsize == 29 and os.fstat(claims._table.fileno()).st_size == 29 * claims.count  # on disk


def _claim_in_batches(claims: DigestClaims, keys: list[str], batch: int) -> tuple[list, list, dict]:
    """Claim ``keys`` of one manifest in batches; returns (claims' answers, the answers of a
    dict of first rows, that dict)."""
    first, expected, got = {}, [], []
    for start in range(0, len(keys), batch):
        chunk = keys[start:start + batch]
        rows = list(range(start + 1, start + 1 + len(chunk)))
        got += claims.claim(chunk, "m.tsv", rows, rows, ["train"] * len(chunk))
        for key, row in zip(chunk, rows):
            expected.append(first.get(key))
            first.setdefault(key, {"manifest": "m.tsv", "row": row, "line": row, "split": "train"})
    return got, expected, first


def test_digest_claims_stop_merging_at_the_largest_run_and_still_find_every_id(monkeypatch):
    monkeypatch.setattr(DigestClaims, "MAX_MERGED_RUN", 1000)
    rng = random.Random(5)
    claims = DigestClaims()
    got, expected, first = _claim_in_batches(claims, [f"id{rng.randrange(6000)}" for _ in range(12000)], 250)
    sizes = [len(run[0]) for run in claims.runs]
    assert got == expected and claims.count == len(first) == sum(sizes)
    assert max(sizes) <= 1000 and len(sizes) >= len(first) // 1000  # capped runs, none lost


def test_digest_claims_exact_when_digests_share_their_first_eight_bytes(monkeypatch):
    # Look-ups go by the first 8 bytes first; digests that share them must still be told apart.
    def digests(keys):
        return np.frombuffer(b"".join(b"\0" * 8 + hashlib.blake2b(k.encode(), digest_size=8).digest() for k in keys),
                             dtype="S16")

    monkeypatch.setattr(DigestClaims, "digests", staticmethod(digests))
    rng = random.Random(4)
    claims = DigestClaims()
    got, expected, first = _claim_in_batches(claims, [f"id{rng.randrange(500)}" for _ in range(3000)], 101)
    assert got == expected and claims.count == len(first)


def _adversarial_corpus(root: Path, rng: random.Random) -> None:
    """A folder of TSVs (with clips) holding every kind of hostile row, plus a Parquet folder."""
    clips = Path(bundled_sample_manifests()[1]) / "clips"
    audio = root / "clips"
    audio.mkdir(parents=True)
    names = sorted(p.name for p in clips.iterdir())
    for name in names:
        shutil.copy(clips / name, audio / name)
    (audio / "sub").mkdir()
    shutil.copy(clips / names[0], audio / "sub" / "x.flac")
    paths = ([f"clips/{n}" for n in names] + ["clips/missing.flac", "./clips/" + names[0], "clips//" + names[1],
             "clips/sub/../" + names[2], "clips/sub/", "clips/./sub/x.flac", str(audio / names[0]), "clips", "",
             "  ", "https://example.com/a.flac", " clips/" + names[0] + " "])
    durations = ["1.5", "2", "0", "-1", "", " ", "nan", "inf", "-inf", "1e3", "1_0", " 2.5 ", "abc", "١٢", "0.004",
                 "30.0", "30.0000001", "5"]
    texts = _adversarial_transcripts(rng, 600)
    speakers = ["", " ", "spk1", "spk2", "\t", "0"] + [f"s{i}" for i in range(30)]
    ids = ["", " ", "dup", "dup", "0", " padded "] + [f"u{i}" for i in range(300)]
    header = "id\tpath\tsentence\tduration\tclient_id\tspeaker\n"
    lines = []
    for k in range(700):
        cells = [rng.choice(ids), rng.choice(paths), rng.choice(texts), rng.choice(durations), rng.choice(speakers),
                 rng.choice(speakers)]
        cells = [c.replace("\t", " ").replace("\n", " ").replace("\r", " ") for c in cells]
        if k % 37 == 0:
            cells[2] = '"' + cells[2].replace('"', '""') + '"'  # a quoted cell
        if k % 41 == 0:
            cells[2] = 'He said "stop'  # unbalanced quote
        line = "\t".join(cells)
        if k % 53 == 0:
            line += "\textra"  # ragged
        lines.append(line)
    body = "\n".join(lines).encode("utf-8")
    (root / "a.tsv").write_bytes(("\ufeff" + header).encode("utf-8") + body + b"\n")
    crlf = "\r\n".join(lines[:200]).encode("utf-8") + b"\r\n\r\nbad\xe9\tline\r" + b"\r".join(
        line.encode("utf-8") for line in lines[200:300])
    (root / "b_crlf.tsv").write_bytes(header.encode("utf-8") + crlf)
    (root / "c_empty.tsv").write_bytes(b"")
    (root / "d_nocols.tsv").write_text("foo,bar\n1,2\n", encoding="utf-8")
    (root / "e_dupcols.tsv").write_text("id\tpath\tsentence\tsentence\tduration\nz\tz.wav\ta\tb\t1.0\n", encoding="utf-8")
    (root / "f_audio.tsv").write_text(f"path\taudio\tsentence\tduration\n\tx\thello\t1.0\nclips/{names[0]}\tx\thi\t1\n",
                                      encoding="utf-8")
    (root / "ignored.parquet").write_bytes(b"PAR1 not read: TSV wins")
    hf = root.parent / "hf"
    hf.mkdir()
    blob = (clips / names[0]).read_bytes()
    pq.write_table(pa.table({
        "id": ["p1", "p2", "p3", "dup", None, "p6"],
        "audio": [{"bytes": blob, "path": "x.flac"}, {"bytes": b"\0" * 300_000, "path": "big.flac"},
                  {"bytes": None, "path": str(audio / names[1])}, {"bytes": blob, "path": None}, None,
                  {"bytes": blob, "path": str(audio / names[2])}],
        "text": ["one", "two", "three", "four", "five", "six"],
        "duration": [1.0, 2.0, None, 3.0, 1.0, 0.5],
        "speaker_id": [1, 2, None, 4, 5, 6],
    }), hf / "a.parquet")
    pq.write_table(pa.table({"id": ["q1", "q2"], "text": [b"bytes text", b"\xff\xfe"], "path": ["a.flac", "b.flac"],
                             "duration": ["1.5", "x"]}), hf / "b.parquet")
    (hf / "c.parquet").write_bytes(b"not parquet")
    _segment_manifests(root, hf, rng, names, blob)


def _segment_manifests(root: Path, hf: Path, rng: random.Random, names: list[str], blob: bytes) -> None:
    """Segments of long recordings (``offset``/``start`` + ``duration``): valid, overlapping, on and
    off the sample grid, negative/unparseable/non-finite offsets, missing or non-positive
    durations, over the duration cap, an empty offset (a whole file), the ``start`` alias, both
    columns (``offset`` wins), Parquet with ``start`` (floats, ints, strings, booleans, embedded
    bytes shared by several segments)."""
    clip = f"clips/{names[0]}"
    fixed = [  # (id, path, sentence, duration, offset)
        ("seg-a", clip, "a valid segment of the book", "4.0", "0"),
        ("seg-b", clip, "an overlapping segment of it", "4.0", "2.5"),
        ("seg-c", clip, "off the sample grid here", "3.3333333", "1.00001"),
        ("seg-neg", clip, "negative offset here", "2.0", "-0.5"),
        ("seg-nodur", clip, "missing duration here", "", "1.0"),
        ("seg-zero", clip, "zero duration here", "0", "1.0"),
        ("seg-negdur", clip, "negative duration here", "-2", "1.0"),
        ("seg-nandur", clip, "nan duration here", "nan", "1.0"),
        ("seg-infdur", clip, "infinite duration here", "inf", "1.0"),
        ("seg-cap", clip, "over the duration cap by far", "45.0", "3.0"),
        ("seg-capedge", clip, "just over the duration cap", "30.0000001", "3.0"),
        ("seg-nan", clip, "nan offset here", "2.0", "nan"),
        ("seg-inf", clip, "infinite offset here", "2.0", "inf"),
        ("seg-bad", clip, "unparseable offset here", "2.0", "soon"),
        ("seg-whole", clip, "empty offset is a whole file", "2.0", " "),
        ("seg-whole0", clip, "empty offset and no duration", "", ""),
        ("seg-minus0", clip, "minus zero offset here", "2.0", "-0"),
        ("seg-tiny", clip, "a tiny offset here", "2.0", "1e-7"),
        ("seg-underscore", clip, "an underscored offset", "2.0", "1_5"),
        ("seg-missing", "clips/missing.flac", "segment of a missing file", "2.0", "1.0"),
        ("seg-fast", clip, "way too many words for such a short segment of audio", "0.2", "5.0"),
        ("seg-a", clip, "a duplicate segment id", "1.0", "7.0"),
    ]
    offsets = ["0", "0.0", "1.25", "-0.5", "", " ", "abc", "nan", "inf", "-inf", "-0", "1e-7", "3", "  2.5 ", "1e3"]
    durations = ["1.5", "2", "0", "-1", "", "nan", "inf", "1e3", " 2.5 ", "abc", "0.004", "30.0", "30.0000001", "5"]
    texts = ["hello there", "a b c", "one two three four", "x", "?", "", "the quick brown fox jumps"]
    rows = list(fixed) + [(f"seg-r{k}", rng.choice([clip, f"clips/{names[1]}", "clips/missing.flac", ""]),
                           rng.choice(texts), rng.choice(durations), rng.choice(offsets)) for k in range(150)]
    body = "".join(f"{i}\t{p}\t{t}\t{d}\t{o}\n" for i, p, t, d, o in rows)
    (root / "g_segments.tsv").write_text("id\tpath\tsentence\tduration\toffset\n" + body, encoding="utf-8")
    alias = "".join(f"st-{i}\t{p}\t{t}\t{d}\t{o}\n" for i, p, t, d, o in rows[:60])
    (root / "h_start.tsv").write_text("id\tpath\ttext\tduration_seconds\tstart\n" + alias, encoding="utf-8")
    both = "".join(f"both-{i}\t{p}\t{t}\t{d}\t{o}\t99\n" for i, p, t, d, o in rows[:30])
    (root / "i_both.tsv").write_text("id\tpath\tsentence\tduration\toffset\tstart\n" + both, encoding="utf-8")
    pq.write_table(pa.table({
        "id": ["ps1", "ps2", "ps3", "ps4", "ps5", "ps6", "ps7", "ps8", "ps9"],
        "audio": [{"bytes": blob, "path": "book.flac"}] * 3 + [{"bytes": None, "path": str(root / clip)}] * 6,
        "text": ["first segment", "second segment", "third overlapping", "from a path", "negative start",
                 "no duration", "over the cap", "whole file", "integer start"],
        "duration": [2.0, 2.0, 3.0, 1.5, 1.0, None, 31.0, 1.0, 2.0],
        "start": [0.0, 2.0, 1.0, 0.25, -1.0, 1.0, 0.0, None, 3.0],
    }), hf / "d_start.parquet")
    pq.write_table(pa.table({"id": ["pt1", "pt2", "pt3", "pt4"], "path": [str(root / clip)] * 4,
                             "sentence": ["string start", "bad string start", "empty start", "int start"],
                             "duration": [1.0, 1.0, 1.0, 2],
                             "offset": ["0.5", "later", " ", "2"]}), hf / "e_offset_text.parquet")
    pq.write_table(pa.table({"id": ["pb1", "pb2"], "path": [str(root / clip)] * 2, "sentence": ["bool start", "bool start two"],
                             "duration": [1.0, 1.0], "start": [True, False]}), hf / "f_start_bool.parquet")


def _outputs(settings: Settings, splits=SPLITS) -> dict[str, bytes]:
    out = {}
    folder = settings.record_cache_path("train").parent
    for split in splits:
        for path in sorted(folder.glob(f"{split}.jsonl*")):
            if not path.name.endswith(".lock"):
                out[path.name] = path.read_bytes()
        for path in sorted(folder.glob(f"{split}_audio_blobs/*")):
            out[f"{split}_audio_blobs/{path.name}"] = path.read_bytes()
        out[f"report-{split}"] = settings.records_report_path(split).read_bytes()
    return out


def _compare(tmp_path: Path, name: str, monkeypatch, splits=SPLITS, reader_process=False, **fields) -> dict[str, bytes]:
    """Build with batches of 7 rows and 97-byte blocks, the manifests parsed in this process or
    (``reader_process``) by a reader process, and compare every file with the reference's."""
    monkeypatch.setattr(pipeline, "read_ahead_manifest_batches",
                        functools.partial(read_ahead_manifest_batches, batch_rows=7, block_bytes=97,
                                          min_bytes=0 if reader_process else 2**62))
    new = Settings(output=str(tmp_path / f"{name}-new"), **fields)
    ref = Settings(output=str(tmp_path / f"{name}-ref"), **fields)
    results = build_record_caches(new, splits)
    for split in splits:
        build_record_cache_reference(ref, split)
    got, expected = _outputs(new, splits), _outputs(ref, splits)
    assert got.keys() == expected.keys()
    for key in expected:
        assert got[key] == expected[key], (name, key)
    for split in splits:
        report = ref.records_report_path(split).read_text(encoding="utf-8")
        assert len(results[split].rejections) == len(report.splitlines())
    return got


@pytest.mark.parametrize("reader_process", [False, True], ids=["in_process", "reader_process"])
def test_in_repo_manifests_byte_identical_to_the_reference(tmp_path, test_data, monkeypatch, reader_process):
    sources = (*bundled_sample_manifests(), str(test_data / "formats"), str(test_data / "broken"),
               str(test_data / "en_hf"), str(test_data / "nl_cv"))
    got = _compare(tmp_path, "repo", monkeypatch, manifests=sources, max_blob_mb=0.25, reader_process=reader_process)
    assert sum(len(v.splitlines()) for k, v in got.items() if k.endswith(".jsonl")) > 20
    assert b"cannot read duration" in got["report-train"] + got["report-validation"] + got["report-test"]


@pytest.mark.parametrize("case", ["default", "default_reader_process", "lowercase_confined_capped",
                                  "external_validation"])
def test_adversarial_manifests_byte_identical_to_the_reference(tmp_path, monkeypatch, case):
    rng = random.Random(11)
    _adversarial_corpus(tmp_path / "corpus", rng)
    fields = {"manifests": (str(tmp_path / "corpus"), str(tmp_path / "hf"), str(tmp_path / "corpus")),
              "max_blob_mb": 0.25}
    if case == "lowercase_confined_capped":
        fields |= {"confine_audio_paths": True, "allowed_audio_roots": (str(tmp_path / "corpus" / "clips" / "sub"),),
                   "record_options": {"lowercase": True, "max_records": {"train": 5, "validation": 0},
                                      "max_words_per_second": 3.0, "seed": 5},
                   "require_readable_audio": False}
    if case == "external_validation":
        fields |= {"manifests": (str(tmp_path / "hf"),), "validation_manifests": (str(tmp_path / "corpus"),)}
    got = _compare(tmp_path, case, monkeypatch, reader_process=case.endswith("reader_process"), **fields)
    case = case.removesuffix("_reader_process")
    reports = b"".join(v for k, v in got.items() if k.startswith("report-"))
    if case == "lowercase_confined_capped":
        assert b"outside the allowed roots" in reports and got["train.jsonl"].count(b"\n") == 5
        assert got["validation.jsonl"] == b"" and got["report-validation"] == b""
        return
    for reason in (b"duplicate utterance_id", b"not valid UTF-8", b"expected 6 cells", b"unparseable duration",
                   b"is not finite", b"symbol ratio", b"no transcript", b"over the 0.25 MiB limit"):
        assert reason in reports, reason
    if case == "default":
        stores = b"".join(v for k, v in got.items() if k.endswith(".jsonl"))
        for reason in (b"is negative", b"s is not finite", b"has no positive duration (none given)",
                       b"unparseable offset 'soon'", b"unparseable offset 'later'", b"offset is a boolean",
                       b"> max 30"):
            assert reason in reports, reason
        assert stores.count(b'"offset_seconds": ') > 10 and b'"utterance_id": "seg-b"' in stores
        assert b'"utterance_id": "pt4", "speaker_id": null, "has_speaker_id": false, "offset_seconds": 2.0, ' \
               b'"duration_seconds": 2.0}' in stores
        assert b'"utterance_id": "ps2", "speaker_id": null, "has_speaker_id": false, "offset_seconds": 2.0, ' \
               b'"duration_seconds": 2.0}' in stores


def test_batches_are_the_per_row_readers_rows(tmp_path):
    rng = random.Random(5)
    _adversarial_corpus(tmp_path / "corpus", rng)
    sources = [tmp_path / "corpus", tmp_path / "hf"]
    errors = []
    rows = list(iter_manifest_rows(sources, on_error=lambda m, n, e: errors.append(("problem", m, n, str(e))),
                                   max_blob_bytes=2**18))
    merged_rows, merged = [], []
    for item in iter_manifest_batches(sources, max_blob_bytes=2**18, batch_rows=5, block_bytes=64):
        if isinstance(item, ManifestProblem):
            merged.append(("problem", item.manifest, item.rows_read, str(item.error)))
        else:
            assert isinstance(item, ManifestBatch) and 1 <= len(item) <= 5
            merged_rows += [item.row(i) for i in range(len(item))]
    assert [repr(r) for r in merged_rows] == [repr(r) for r in rows]  # repr: nan == nan
    assert [e for e in merged] == errors


def test_pooled_probing_matches_the_per_row_probe(tmp_path, test_data):
    src = test_data / "nl_cv" / "clips"
    files = sorted(src.iterdir())
    rows = []
    from asr_assets.manifests import ManifestRow

    for k in range(40):
        target = tmp_path / f"c{k}{files[k % len(files)].suffix}"
        shutil.copy(files[k % len(files)], target)
        rows.append(ManifestRow("s", "m", k + 1, None, str(target), None, "t", None, None))
    rows.append(ManifestRow("s", "m", 41, None, str(tmp_path / "missing.ogg"), None, "t", None, None))
    rows.append(ManifestRow("s", "m", 42, None, None, None, "t", None, None))
    pooled = DurationProbe(tmp_path / "a.parquet", workers=2)
    try:
        got = pooled.probe_many(rows)
    finally:
        pooled.close()
    single = DurationProbe(tmp_path / "b.parquet")
    for row, value in zip(rows, got):
        try:
            expected = float(single(row))
        except Exception as exc:  # noqa: BLE001
            assert isinstance(value, BaseException) and str(value) == str(exc)
        else:
            assert value == expected and math.isfinite(value)
    pooled.save()
    assert len(DurationProbe(tmp_path / "a.parquet").known) == 40


def test_one_pass_reads_each_manifest_once_and_a_second_build_reads_none(tmp_path, monkeypatch):
    settings = Settings(manifests=bundled_sample_manifests(), output=str(tmp_path / "out"))
    files = [str(p) for source in settings.manifests for p in manifests.scan_manifests(source).files]
    opened, walked = [], []
    for name in ("_tsv_batches", "_parquet_batches"):
        real = getattr(manifest_batches, name)
        monkeypatch.setattr(manifest_batches, name, functools.partial(
            lambda real, path, *a, **k: opened.append(str(path)) or real(path, *a, **k), real))
    real_walk = manifests._walk
    monkeypatch.setattr(manifests, "_walk", lambda root: walked.append(str(root)) or real_walk(root))
    first = pipeline.build_record_cache(settings, "validation")
    assert sorted(opened) == sorted(files) and not first.up_to_date
    folders = [s for s in settings.manifests if Path(s).is_dir()]
    assert sorted(walked) == sorted(folders)  # one walk per folder: fingerprinted and read from it
    assert all(pipeline.build_record_cache(settings, s).up_to_date for s in SPLITS)  # built in the same pass
    assert sorted(opened) == sorted(files)


def test_reader_process_stops_the_build_loudly_when_it_dies(tmp_path, monkeypatch):
    """A reader process that exits without its end message (killed, out of memory) raises
    ManifestError naming its exit code; a source the reader cannot open raises the same error
    as in this process."""
    rng = random.Random(3)
    _adversarial_corpus(tmp_path / "corpus", rng)
    sources = [str(tmp_path / "corpus")]
    with pytest.raises(ManifestError, match="does not exist") as in_process:
        list(iter_manifest_batches([str(tmp_path / "missing")]))
    with pytest.raises(ManifestError, match="does not exist") as child:
        list(read_ahead_manifest_batches([str(tmp_path / "missing")], min_bytes=0))
    assert str(child.value) == str(in_process.value)
    first = next(read_ahead_manifest_batches(sources, min_bytes=0))  # stopped after one item: no hang
    assert repr(first) == repr(next(iter_manifest_batches(sources)))  # repr: exceptions compare by identity
    monkeypatch.setattr("sys.executable", shutil.which("false"))  # a child that exits 1 at once
    with pytest.raises(ManifestError, match=r"reader process exited \(code 1\)"):
        list(read_ahead_manifest_batches(sources, min_bytes=0))
    # a request larger than the pipe holds: writing it meets the dead reader (broken pipe)
    missing = [str(tmp_path / f"missing-{i:04d}-{'x' * 100}") for i in range(2000)]
    with pytest.raises(ManifestError, match=r"reader process exited \(code 1\)"):
        list(read_ahead_manifest_batches(sources + missing, min_bytes=0))


def test_the_stored_unicode_classes_are_those_of_this_python(monkeypatch):
    """The build reads its character classes from ``asr_assets/_unicode_classes.py`` instead of
    scanning every code point; what it uses must equal the scan under this Python's Unicode
    database, and the file must be what the generator writes (regenerate when this fails)."""
    import unicodedata

    from asr_assets import _unicode_classes, record_batches

    scanned = {name: record_batches._ranges(pattern) for name, pattern in record_batches._CLASS_PATTERNS.items()}
    assert record_batches._class_ranges() == scanned
    assert "\\x{3000}" in scanned["space"] and "\\x{30}-\\x{39}" in scanned["alnum"]  # ideographic space; 0-9
    if _unicode_classes.UNIDATA_VERSION == unicodedata.unidata_version:
        assert Path(_unicode_classes.__file__).read_text(encoding="utf-8") == record_batches.unicode_classes_module()
    monkeypatch.setattr(_unicode_classes, "UNIDATA_VERSION", "0.0.0")  # another Python: scanned, same result
    monkeypatch.setattr(_unicode_classes, "ALNUM", "")
    assert record_batches._class_ranges() == scanned


def test_the_build_keeps_its_duplicate_id_table_beside_the_record_cache_and_leaves_nothing(tmp_path, monkeypatch):
    # /tmp may be RAM-backed: the 29 B per id of the table go to the output's disk.
    seen = []
    original = DigestClaims.__init__

    def init(self, directory=None):
        seen.append(directory)
        original(self, directory)

    monkeypatch.setattr(DigestClaims, "__init__", init)
    settings = Settings(manifests=tuple(bundled_sample_manifests()), output=str(tmp_path / "out"))
    results = build_record_caches(settings, SPLITS)
    folder = tmp_path / "out" / "record_cache"
    assert seen == [str(folder)] and sum(r.summary.utterances for r in results.values()) > 0
    assert not [p for p in tmp_path.rglob("*") if "claims" in p.name]
